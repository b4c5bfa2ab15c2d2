#!/usr/bin/env bash
# Installs a CUDA 13.0 toolkit from PyPI wheels into a cache folder and makes it usable for
# cudarc's and candle's build scripts on a machine without a GPU (see ../shared/GPU.md):
#   - lib64 -> lib, unversioned .so links,
#   - a link-time stub libcuda.so (soname libcuda.so.1) defining every cu* symbol cudarc declares.
# Idempotent: a second run only re-prints the environment.
# Usage: eval "$(scripts/install-cuda-toolkit.sh)"     (prints `export ...` lines on stdout)
set -euo pipefail

DIR="${CUDA_TOOLKIT_CACHE:-$HOME/.cache/candle-sparse-attn/cuda-13.0}"
ROOT="$DIR/nvidia/cu13"
STAMP="$DIR/.complete"

log() { echo "install-cuda-toolkit: $*" >&2; }

if [ ! -f "$STAMP" ]; then
  log "installing CUDA 13.0 wheels into $DIR (about 1.1 GB)"
  rm -rf "$DIR"
  mkdir -p "$DIR"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$DIR" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14 >&2

  ln -sfn lib "$ROOT/lib64"
  (
    cd "$ROOT/lib"
    for pair in libcublas.so:libcublas.so.13 libcublasLt.so:libcublasLt.so.13 \
      libcurand.so:libcurand.so.10 libnvrtc.so:libnvrtc.so.13 libcudart.so:libcudart.so.13; do
      name=${pair%%:*} target=${pair#*:}
      [ -e "$target" ] || target=$(ls ${name}.* 2>/dev/null | head -n1)
      [ -n "$target" ] && ln -sfn "$target" "$name"
    done
  )

  # Link-time stub for the driver library: every cu* entry point cudarc declares.
  sys_rs=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | head -n1 || true)
  if [ -z "$sys_rs" ]; then
    log "cudarc sources not found: run 'cargo fetch' first"
    exit 1
  fi
  mkdir -p "$ROOT/lib/stubs"
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$sys_rs" | awk '{print $4}' | sort -u |
    sed 's/.*/void &(void) {}/' > "$DIR/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$DIR/libcuda_stub.c"
  ln -sfn libcuda.so "$ROOT/lib/stubs/libcuda.so.1"
  "$ROOT/bin/nvcc" --version >&2
  touch "$STAMP"
  log "done"
else
  log "already installed in $DIR"
fi

cat <<ENV
export CUDA_HOME="$ROOT"
export CUDA_PATH="$ROOT"
export PATH="$ROOT/bin:\$PATH"
export LIBRARY_PATH="$ROOT/lib/stubs:$ROOT/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
ENV
