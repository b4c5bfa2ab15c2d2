#!/usr/bin/env bash
# Training-step speed on the GPU machine (EXPERIMENTS.md, "Fused training ops"): the per-op table of
# bench_train_ops, then phase-timed char-LM runs, one per attention kind; prints phase times and
# appends "CONTEXT KIND <last log.csv row>" to $OUT/step.csv (the last field is training tokens/s
# of the second half of the run).
# Needs $CARRY/bin/{train_char_lm,bench_train_ops,shakespeare.txt}[.xz]
# (CARRY=DIR scripts/pack-gpu.sh train_char_lm bench_train_ops, plus the data, xz-compressed).
# Usage: CARRY=DIR [SKIP_BENCH=1] scripts/gpu-step.sh CONTEXT STEPS BATCH KIND...
#   e.g. CARRY=.carry-step scripts/gpu-step.sh 8192 16 4 dense hash_sparse:16 sparsek:256,256
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
bin="$CARRY/bin"
for f in "$bin"/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
chmod +x "$bin"/train_char_lm "$bin"/bench_train_ops 2>/dev/null
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(python3 -c 'import nvidia,os;print(os.path.join(nvidia.__path__[0],"cu13","lib"))')
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/step.log"
if [ -x "$bin/bench_train_ops" ] && [ -z "${SKIP_BENCH:-}" ]; then
  "$bin/bench_train_ops" --device cuda 2>&1 | tee -a "$OUT/ops.md"
fi
ctx=$1 steps=$2 batch=$3
shift 3
for kind in "$@"; do
  name=$(echo "$kind" | tr ':,.' '___')
  "$bin/train_char_lm" train --data "$bin/shakespeare.txt" --out "/tmp/runs/$name" --overwrite \
    --n-layer 6 --n-head 6 --n-embd 384 --block-size "$ctx" --batch-size "$batch" \
    --max-steps "$steps" --warmup-steps $((steps / 10)) --lr 1e-3 --min-lr 1e-4 \
    --eval-interval $((steps / 2)) --eval-batches 2 --attention "$kind" --sample-len 0 \
    --phase-timing 2>&1 | grep -vE "^\s*$" | tail -n 4 | tee -a "$OUT/step.log"
  echo "$ctx $kind $(tail -n 1 "/tmp/runs/$name/log.csv")" | tee -a "$OUT/step.csv"
done
