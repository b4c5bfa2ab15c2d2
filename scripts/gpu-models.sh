#!/usr/bin/env bash
# The issue #8 / Twilight checks on the GPU machine in one call (see EXPERIMENTS.md):
# reassembles the SmolLM2 GGUF from parts carried over two runs (the first part left in
# /root/smol by the previous call, the second in $CARRY), then: greedy "Paris" on CUDA, the
# transformers logits comparison, decode/prefill throughput (ours dense and the kinds given as
# arguments, e.g. Twilight or moa:PLAN, bf16, warm: one untimed run first; and
# transformers + SDPA) at 2k and 8k prompts, real SmolLM2 q/k/v for bench_twilight.
# Usage: CARRY=.carry-models bash scripts/gpu-models.sh [KIND ...]   (writes under $OUT)
set -uo pipefail
shopt -s nullglob
C="${CARRY:-.carry-models}"
W=/root/smol
mkdir -p "$W" "$OUT"
cp -n "$C"/smol.part.* "$W"/ 2>/dev/null
for f in "$C"/bin/*.xz; do [ -f "$W/$(basename "${f%.xz}")" ] || xz -dc "$f" > "$W/$(basename "${f%.xz}")"; done
chmod +x "$W"/generate "$W"/bench_twilight
cat "$W"/smol.part.* > "$W"/smol.gguf
sha256sum "$W"/smol.gguf | tee "$OUT"/sha.txt
grep -q "$(cat "$C"/smol.sha256)" "$OUT"/sha.txt || { echo "GGUF incomplete: parts $(ls "$W")"; exit 3; }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(python3 -c 'import nvidia,os;print(os.path.join(nvidia.__path__[0],"cu13","lib"))')
G="$W/generate"; M="$W/smol.gguf"; P="$C/prompt.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT"/gpu.txt
echo "== (c) greedy Paris on CUDA"
$G generate --model "$M" --prompt "The capital of France is" --max-new-tokens 3 2>&1 | tee "$OUT"/paris.txt
echo "== (a) logits vs transformers"
$G export-hf --model "$M" --out "$W"/hf --text-file "$P" --logits-tokens 128 2>&1 | tail -1
echo "== (b) ours: decode and prefill throughput, bf16"
for L in 2048 8064; do
  for A in dense "$@"; do
    echo "-- ours $A prompt $L"
    $G generate --model "$M" --dtype bf16 --prompt-file "$P" --prompt-tokens $L --max-new-tokens 65 \
      --ignore-eos --warmup --attention "$A" 2>&1 | grep -E "^prompt:|kept fraction" | cut -c1-200
  done
done 2>&1 | tee "$OUT"/ours.txt
echo "== (b) transformers + SDPA bf16, and (a) the logits check"
timeout 200 python3 "$C"/hf_compare.py --dir "$W"/hf --text-file "$P" --lengths 2048,8064 \
  --new-tokens 64 --json "$OUT"/hf.json 2>&1 | grep -v Warning | tail -8
echo "== (4) real q/k/v and bench_twilight"
$G dump-qkv --model "$M" --dtype bf16 --text-file "$P" --context 8191 --out "$W"/qkv.safetensors 2>&1 | tail -1
for B0 in 2048 1024; do
  "$W"/bench_twilight --device cuda --qkv "$W"/qkv.safetensors --batch 16 --heads 30 --kv-heads 10 \
    --head-dim 64 --context 8192 --budget $B0 --p 0.95 --json "$OUT"/bench_real_b$B0.json 2>&1 | grep -v "^{"
done
"$W"/bench_twilight --device cuda --batch 16 --heads 30 --kv-heads 10 --head-dim 64 --context 8192 \
  --budget 2048 --p 0.95 --json "$OUT"/bench_synth.json 2>&1 | grep -v "^{"
