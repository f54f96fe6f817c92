"""Which SDPA backend is fastest for RC-Attn's shapes at SD 1.5's largest attention layer?

At 512x512 the first down and last up blocks attend over 64x64 = 4096 tokens with 8 heads of
40 channels. Plain SD self-attention has N keys; RC-Attn 2N; the balanced editing branch 4N.
Times forward and forward+backward for each backend that accepts the shapes.

    python bench/attn_backends.py --frames 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "pytorch": None,  # PyTorch's own choice
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def bench(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--level", type=int, default=0, help="UNet level: 0 (4096 tokens, 8x40), 1 (1024, 8x80), 2 (256, 8x160)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    heads, d, n = 8, 40 * 2**args.level, 4096 // 4**args.level
    print(f"| keys | backend | fwd ms | fwd+bwd ms |  (F={args.frames}, {heads}x{d}, N={n}, {args.dtype})")
    print("|---|---|---|---|")
    for mult in (1, 2, 4):
        q = torch.randn(args.frames, heads, n, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(args.frames, heads, mult * n, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(args.frames, heads, mult * n, d, device="cuda", dtype=dtype, requires_grad=True)
        ref = None
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    out = F.scaled_dot_product_attention(q, k, v)
                    fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v))
                    grad = torch.randn_like(out)
                    both = bench(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad))
            except RuntimeError as err:
                print(f"| {mult}N | {name} | n/a | n/a ({str(err).splitlines()[0][:60]}) |")
                continue
            ref = out if ref is None else ref
            rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"| {mult}N | {name} | {fwd:.2f} | {both:.2f} | rel diff vs first {rel:.1e}")


if __name__ == "__main__":
    main()
