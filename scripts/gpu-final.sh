#!/usr/bin/env bash
# End-of-session validation on the GPU machine, in two calls over binaries packed by
# `CARRY=.carry-final scripts/pack-gpu.sh bench_attention bench_twilight` (test binaries in one
# carry folder, the benchmark binaries in another when both do not fit in one):
#   tests: every CUDA test suite, then compute-sanitizer (memcheck, racecheck) with FLASH_QUICK=1
#          on the lib's `cuda_matches_reference` (every flash kernel: Hopper forward and backward,
#          mma.sync, all visibility modes) and on tests/moa.rs (sink-band mode).
#   bench: dense and SCFA against PyTorch SDPA (`--keep-pool`), the MoA prefill rows, SparseK (if
#          test-sparsek is there), the Twilight decode step on real q/k/v (if qkv.safetensors[.xz]
#          is there, written by `generate dump-qkv`) and on synthetic inputs.
# Logs and JSON under $OUT.
# Usage: CARRY=DIR bash scripts/gpu-final.sh tests|bench
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
C="${CARRY:-.carry-final}"
case "${1:-}" in
  tests)
    CARRY="$C" bash scripts/gpu-run.sh tests >/dev/null 2>&1
    grep -E "^== |test result|FAILED|panicked" "$OUT/tests.log"
    cd "$C/bin"
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(python3 -c 'import nvidia,os;print(os.path.join(nvidia.__path__[0],"cu13","lib"))')
    for tool in memcheck racecheck; do
      for t in "test-candle_sparse_attn cuda_matches_reference" test-moa; do
        echo "== $tool $t"
        FLASH_QUICK=1 timeout 150 compute-sanitizer --tool "$tool" ./$t --test-threads=1 2>&1 |
          grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" | tee -a "$OUT/sanitize.log"
      done
    done
    ;;
  bench)
    cd "$C/bin"
    for f in *.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
    chmod +x bench_* test-* 2>/dev/null
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(python3 -c 'import nvidia,os;print(os.path.join(nvidia.__path__[0],"cu13","lib"))')
    export PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader | tee "$OUT/device.txt"
    shapes=(--seq 8192,16384,32768 --shape 4x48x64,2x16x128)
    python3 bench_sdpa.py --json "$OUT/sdpa.json" "${shapes[@]}" >"$OUT/sdpa.log" 2>&1
    ./bench_attention --device cuda --baseline "$OUT/sdpa.json" "${shapes[@]}" --hash 16,64 --drop 50,70 \
      --sparse-min-seq 16384 --reps 5 --keep-pool --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
    ./bench_attention --device cuda --seq 16384 --shape 1x32x128 --moa-band 8192,4096 --moa-density 0.5 \
      --reps 10 --keep-pool 2>&1 | tee "$OUT/bench_moa.log"
    if [ -x test-sparsek ]; then
      SPARSEK_BENCH_KEEP_POOL=1 SPARSEK_BENCH_SEQ=8192,16384,32768 ./test-sparsek cuda_bench --ignored --nocapture 2>&1 |
        grep -vE "^(running|test |$)" | tee "$OUT/sparsek_bench.log"
    fi
    if [ -e qkv.safetensors ]; then
      for b0 in 2048 1024; do
        ./bench_twilight --device cuda --keep-pool --qkv qkv.safetensors --batch 16 --heads 30 --kv-heads 10 \
          --head-dim 64 --context 8192 --p 0.95 --budget "$b0" 2>&1 | grep -v "^{" | tee -a "$OUT/twilight.log"
      done
    fi
    ./bench_twilight --device cuda --keep-pool 2>&1 | grep -v "^{" | tee -a "$OUT/twilight.log"
    ;;
  *) echo "usage: gpu-final.sh tests|bench"; exit 2 ;;
esac
