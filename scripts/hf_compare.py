#!/usr/bin/env python3
"""Checks our Llama decoder against `transformers` on the GPU machine (issue #8).

Input: a directory written by `examples/generate.rs export-hf` (model.safetensors f32,
config.json, tokenizer.json, our_logits.safetensors with `ids` and our f32 `logits`).

1. Logits: LlamaForCausalLM in f32 on CUDA (TF32 off) on the same ids; prints the max relative
   error max|ours - theirs| / max|theirs| (target <= 1e-3), the relative Frobenius error and the
   argmax agreement.
2. Throughput of transformers + SDPA in bf16 at batch 1 for each --lengths prompt (tokens of
   --text-file): prefill tokens/s (one forward over the prompt) and greedy decode tokens/s
   (`generate` with N+1 new tokens minus `generate` with 1, over N tokens).

Writes everything to --json and prints it.
"""
import argparse
import json
import time

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM


def timed(fn, reps=1):
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--text-file", required=True)
    ap.add_argument("--lengths", default="2048,8064")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0)}

    ours = load_file(f"{args.dir}/our_logits.safetensors")
    ids = ours["ids"].to(torch.long)
    model = LlamaForCausalLM.from_pretrained(args.dir, dtype=torch.float32,
                                             attn_implementation="eager").cuda().eval()
    with torch.no_grad():
        theirs = model(ids[None].cuda()).logits[0].float().cpu()
    mine = ours["logits"].float()
    diff = (mine - theirs).abs()
    result["logits"] = {
        "tokens": int(ids.numel()),
        "max_rel_err": float(diff.max() / theirs.abs().max()),
        "max_abs_err": float(diff.max()),
        "rel_frobenius_err": float((mine - theirs).norm() / theirs.norm()),
        "argmax_agreement": float((mine.argmax(-1) == theirs.argmax(-1)).float().mean()),
    }
    print(json.dumps(result["logits"]), flush=True)
    del model
    torch.cuda.empty_cache()

    model = LlamaForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16,
                                             attn_implementation="sdpa").cuda().eval()
    text = open(args.text_file, encoding="utf-8").read()
    tokens = Tokenizer.from_file(f"{args.dir}/tokenizer.json").encode(text, add_special_tokens=False).ids
    n = args.new_tokens
    result["sdpa_bf16"] = []
    for length in [int(x) for x in args.lengths.split(",")]:
        prompt = torch.tensor([tokens[:length]], device="cuda")
        assert prompt.shape[1] == length, f"text has only {len(tokens)} tokens"
        gen = lambda k: model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                       pad_token_id=0)
        with torch.no_grad():
            gen(4)  # warm-up
            prefill = timed(lambda: model(prompt), reps=3)
            one = timed(lambda: gen(1), reps=2)
            full = timed(lambda: gen(n + 1), reps=2)
        row = {"prompt_tokens": length, "prefill_tokens_per_s": length / prefill,
               "decode_tokens_per_s": n / (full - one), "new_tokens": n}
        print(json.dumps(row), flush=True)
        result["sdpa_bf16"].append(row)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
