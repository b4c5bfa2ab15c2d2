#!/usr/bin/env bash
# Runs on the GPU machine, over binaries packed by scripts/pack-gpu.sh (carried in .carry/).
# Usage: [CARRY=DIR] scripts/gpu-run.sh tests|sanitize|bench [filter]    writes logs and JSON under $OUT.
# CARRY (default .carry, relative to the repository root) is the folder pack-gpu.sh filled.
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." && cd "${CARRY:-.carry}/bin"
for f in *.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
chmod +x test-* bench_* 2>/dev/null
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(python3 -c 'import nvidia,os;print(os.path.join(nvidia.__path__[0],"cu13","lib"))')
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader | tee "$OUT/device.txt"
filter="${2:-}"
case "$1" in
  tests)
    for t in test-*; do
      [ "${t%.xz}" = "$t" ] || continue
      echo "== $t" | tee -a "$OUT/tests.log"
      ./"$t" --test-threads=1 $filter 2>&1 | tail -n 40 | tee -a "$OUT/tests.log"
    done
    ;;
  sanitize)
    for tool in memcheck racecheck; do
      for t in test-*; do
        [ "${t%.xz}" = "$t" ] || continue
        echo "== $tool $t" | tee -a "$OUT/sanitize.log"
        FLASH_QUICK=1 compute-sanitizer --tool "$tool" ./"$t" --test-threads=1 $filter 2>&1 |
          grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Hazard|test result" | tail -n 8 | tee -a "$OUT/sanitize.log"
      done
    done
    ;;
  bench)
    export PYTHONUNBUFFERED=1
    python3 bench_sdpa.py --json "$OUT/sdpa.json" ${SDPA_ARGS:-} 2>&1 | tee "$OUT/sdpa.log"
    ./bench_attention --device cuda --baseline "$OUT/sdpa.json" --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
    ;;
  *) echo "usage: gpu-run.sh tests|sanitize|bench [filter]"; exit 2 ;;
esac
