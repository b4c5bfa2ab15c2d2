#!/usr/bin/env bash
# Runs on the GPU machine, over binaries packed by scripts/pack-gpu.sh (carried in .carry/).
# Usage: [CARRY=DIR] scripts/gpu-run.sh tests|sanitize|bench|profile [filter]    writes logs and JSON under $OUT.
# profile: the sparse modes' phases (bench_attention --phases) at the char-LM shapes (B4 H6 8k,
# B2 H6 16k) and the SCFA shape (B4 H48 16k), then per-kernel GPU times (ncu) of one B4 H6 8k run.
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
  profile)
    common=(--device cuda --keep-pool --reps 7 --warmup 2)
    for s in "4x6x64 8192" "2x6x64 16384" "4x48x64 16384"; do
      set -- $s
      ./bench_attention "${common[@]}" --shape "$1" --seq "$2" --hash 16 --drop 50,70 --phases \
        --json "$OUT/profile_$1_$2.json" 2>&1 | tee -a "$OUT/profile.log"
    done
    for m in "hash 16" "drop 50"; do
      set -- $m
      ncu --clock-control none --metrics gpu__time_duration.sum --csv ./bench_attention --device cuda \
        --keep-pool --reps 1 --warmup 1 --shape 4x6x64 --seq 8192 --"$1" "$2" >"$OUT/ncu_$1$2.csv" 2>/dev/null
      python3 - "$OUT/ncu_$1$2.csv" <<'PY' | tee -a "$OUT/profile.log"
import collections, csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]
name, unit, value = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
times = collections.defaultdict(list)
for r in rows[1:]:
    times[(r[name][:60], r[unit])].append(float(r[value].replace(",", "")))
print("ncu", sys.argv[1])
for (k, u), v in times.items():
    print(f"  {k:60s} launches {len(v):3d} median {sorted(v)[len(v) // 2]:10.1f} {u}")
PY
    done
    ;;
  *) echo "usage: gpu-run.sh tests|sanitize|bench|profile [filter]"; exit 2 ;;
esac
