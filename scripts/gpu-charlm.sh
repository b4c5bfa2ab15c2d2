#!/usr/bin/env bash
# Long-context char-LM comparison on the GPU machine (EXPERIMENTS.md): same model, data, seed and
# steps for every attention kind; prints validation bpc and training tokens/s per kind (the
# tokens/s of the second half of the run, so start-up and kernel loading are excluded).
# Needs .carry/bin/train_char_lm (scripts/pack-gpu.sh train_char_lm) and data/shakespeare.txt.
# Usage: scripts/gpu-charlm.sh CONTEXT STEPS BATCH KIND...
#   e.g. scripts/gpu-charlm.sh 8192 2000 4 dense hash_sparse:16 qk_sparse:0.3,0.3 sparsek:256,256
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${CHARLM_BIN:-$root/.carry/bin}"
for f in "$bin"/train_char_lm.xz "$bin"/shakespeare.txt.xz; do [ -e "${f%.xz}" ] || [ ! -e "$f" ] || xz -dk "$f"; done
chmod +x "$bin/train_char_lm"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(python3 -c 'import nvidia,os;print(os.path.join(nvidia.__path__[0],"cu13","lib"))')
ctx=$1 steps=$2 batch=$3
shift 3
for kind in "$@"; do
  name=$(echo "$kind" | tr ':,.' '___')
  "$bin/train_char_lm" train --data "${CHARLM_DATA:-$root/data/shakespeare.txt}" --out "/tmp/runs/$name" --overwrite \
    --n-layer 6 --n-head 6 --n-embd 384 --block-size "$ctx" --batch-size "$batch" \
    --max-steps "$steps" --warmup-steps $((steps / 10)) --lr 1e-3 --min-lr 1e-4 \
    --eval-interval $((steps / 2)) --eval-batches 8 --attention "$kind" --sample-len 0 2>&1 |
    grep -vE "^\s*$" | tail -n 3 | tee -a "$OUT/charlm.log"
  echo "$kind $(tail -n 1 "/tmp/runs/$name/log.csv")" | tee -a "$OUT/charlm.csv"
done
