"""Times PyTorch FlexAttention (torch.compile) on the MoA prefill shapes of `bench_attention
--moa-band`: causal attention to a sink of the first SINK tokens plus a band of the last BAND tokens,
bf16, forward (and forward+backward from a fixed random output gradient), beside our numbers in
the same device call (BENCHMARKS.md, issue #6).

Usage: python3 bench_flex.py [--seq 16384] [--heads 32] [--head-dim 128] [--sink 64]
                             [--band 8192,4096] [--reps 10] [--json FILE]
"""

import argparse
import json

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def median_ms(fn, reps):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--band", default="0,8192,4096", help="band widths; 0 = plain causal")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json")
    a = p.parse_args()
    n, dev = a.seq, "cuda"
    shape = (a.batch, a.heads, n, a.head_dim)
    q, k, v = (torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    flex = torch.compile(flex_attention)
    rows = []
    for band in [int(b) for b in a.band.split(",")]:
        def mask(b, h, qi, ki, band=band):
            causal = ki <= qi
            if band == 0:
                return causal
            return causal & ((ki < a.sink) | (qi - ki < band))

        bm = create_block_mask(mask, None, None, n, n, device=dev)
        fwd = median_ms(lambda: flex(q, k, v, block_mask=bm), a.reps)

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            flex(q, k, v, block_mask=bm).backward(g)

        fb = median_ms(fwd_bwd, a.reps)
        name = "flex causal" if band == 0 else f"flex sink={a.sink} band={band}"
        print(f"{name:32} B={a.batch} H={a.heads} N={n} D={a.head_dim}  fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms")
        rows.append({"name": name, "band": band, "sink": a.sink, "fwd_ms": fwd, "fwd_bwd_ms": fb})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
