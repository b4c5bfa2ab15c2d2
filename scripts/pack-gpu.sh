#!/usr/bin/env bash
# Builds every CUDA test binary and the benchmark examples here (no GPU needed) and packs them,
# stripped and xz-compressed, into .carry/bin/ (or $CARRY/bin/) for the GPU machine (see scripts/gpu-run.sh).
# Only the root crate's test binaries travel (the models' tests are CPU tests), to stay under the
# 64 MiB a run may carry.
# Usage: [CARRY=DIR] scripts/pack-gpu.sh [example ...]   (default examples: bench_attention;
# default CARRY: .carry; another folder lets several checkouts pack side by side)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-cuda-toolkit.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
examples=("${@:-bench_attention}")
carry="${CARRY:-.carry}"

rm -rf "$carry"/bin
mkdir -p "$carry"/bin
cargo test --workspace --release --features cuda --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]
            and "candle-sparse-models" not in m["package_id"]):
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  cp "$exe" "$carry/bin/test-$name"
done
for ex in "${examples[@]}"; do
  cargo build --release --features cuda --example "$ex" 2>&1 | grep -E '^error' -A5 || true
  cp "$CARGO_TARGET_DIR/release/examples/$ex" "$carry"/bin/
done
cp examples/*.py "$carry"/bin/
strip "$carry"/bin/test-* "${examples[@]/#/$carry/bin/}"
xz -T0 -6 "$carry"/bin/test-* "${examples[@]/#/$carry/bin/}"
du -sh "$carry"/bin
ls "$carry"/bin
