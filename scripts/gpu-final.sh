#!/usr/bin/env bash
# End-of-session validation on the GPU machine in one call, over binaries packed by
# `CARRY=.carry-final scripts/pack-gpu.sh bench_attention bench_twilight bench_moa_decode`:
# every CUDA test suite, compute-sanitizer on the MoA prefill tests (sink-band mode of the flash
# kernels, D = 128 backward), then the benchmark tables: dense and SCFA against PyTorch SDPA, MoA
# prefill, SparseK, the Twilight and MoA decode steps. Logs and JSON under $OUT.
# Usage: CARRY=.carry-final bash scripts/gpu-final.sh
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
C="${CARRY:-.carry-final}"
CARRY="$C" bash scripts/gpu-run.sh tests >/dev/null 2>&1
grep -E "^== |test result|FAILED|panicked" "$OUT/tests.log"
cd "$C/bin"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(python3 -c 'import nvidia,os;print(os.path.join(nvidia.__path__[0],"cu13","lib"))')
for tool in memcheck racecheck; do
  echo "== $tool test-moa"
  FLASH_QUICK=1 timeout 120 compute-sanitizer --tool "$tool" ./test-moa --test-threads=1 2>&1 |
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" | tee -a "$OUT/sanitize.log"
done
export PYTHONUNBUFFERED=1
shapes=(--seq 8192,16384,32768 --shape 4x48x64,2x16x128)
python3 bench_sdpa.py --json "$OUT/sdpa.json" "${shapes[@]}" >"$OUT/sdpa.log" 2>&1
./bench_attention --device cuda --baseline "$OUT/sdpa.json" "${shapes[@]}" --hash 16,64 --drop 50,70 \
  --sparse-min-seq 16384 --reps 5 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
./bench_attention --device cuda --baseline "$OUT/sdpa.json" "${shapes[@]}" --hash 16,64 --drop 50,70 \
  --sparse-min-seq 16384 --reps 5 --keep-pool --json "$OUT/bench_keep_pool.json" >"$OUT/bench_keep_pool.log" 2>&1
./bench_attention --device cuda --seq 16384 --shape 1x32x128 --moa-band 8192,4096 --moa-density 0.5 \
  --reps 10 2>&1 | tee "$OUT/bench_moa.log"
SPARSEK_BENCH_SEQ=8192,16384,32768 ./test-sparsek cuda_bench --ignored --nocapture 2>&1 |
  grep -vE "^(running|test |$)" | tee "$OUT/sparsek_bench.log"
./bench_twilight --device cuda 2>&1 | grep -v "^{" | tee "$OUT/twilight.log"
./bench_moa_decode --device cuda 2>&1 | grep -v "^{" | tee "$OUT/moa_decode.log"
