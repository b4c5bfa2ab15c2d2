#!/usr/bin/env python3
"""PyTorch SDPA baseline for examples/bench_attention.rs, on the same shapes.

Times torch.nn.functional.scaled_dot_product_attention (causal) with the FlashAttention-2
backend and the cuDNN backend, forward and forward+backward, median of triton.testing.do_bench,
and writes the records as JSON in the format bench_attention's --baseline reads.

    python3 examples/bench_sdpa.py --json sdpa.json [--seq 8192,16384] [--shape 4x48x64]
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench


def flops(b, h, n, d, fwd_bwd):
    f = 4.0 * n * n * d * h * b * 0.5
    return f * 3.5 if fwd_bwd else f


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--shape", default="4x48x64,2x16x128")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--json", default="sdpa.json")
    a = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    backends = [("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)]
    records = []
    for shape in a.shape.split(","):
        b, h, d = (int(x) for x in shape.split("x"))
        for n in (int(x) for x in a.seq.split(",")):
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn_like(q)
            for name, backend in backends:
                passes = [("fwd", False)] + ([] if a.fwd_only else [("fwd+bwd", True)])
                for pass_name, fwd_bwd in passes:
                    def run():
                        with sdpa_kernel(backend):
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                            if fwd_bwd:
                                o.backward(g)
                    try:
                        ms = do_bench(run, warmup=25, rep=100, return_mode="median")
                    except RuntimeError as e:
                        print(f"{name} {pass_name} B={b} H={h} N={n} D={d}: unavailable ({str(e)[:80]})")
                        continue
                    tf = flops(b, h, n, d, fwd_bwd) / ms / 1e9
                    print(f"{name:<22} {pass_name:<8} B={b:<2} H={h:<3} N={n:<6} D={d:<4} {ms:10.3f} ms {tf:8.1f} TFLOP/s", flush=True)
                    records.append(dict(method=name, pass_=pass_name, b=b, h=h, n=n, d=d, dtype=a.dtype,
                                        causal=True, ms=ms, tflops=tf))
                    q.grad = k.grad = v.grad = None
            del q, k, v, g
            torch.cuda.empty_cache()
    for r in records:
        r["pass"] = r.pop("pass_")
    with open(a.json, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
