"""GPU decode kernels against the GPU's own memory bandwidth, measured in the same run.

Usage: python benchmarks/gpu_kernels.py [--reps 50] [--json out.json] [--small]

Decode is memory-bound: one token's GEMV reads every weight byte once, so the figure of merit
is bytes of the GPU format read per second against a device-to-device copy's bandwidth
(read + write bytes per second), measured here. Shapes: DeepSeek-V3's dense matrices (q_a,
q_b, kv_a, attn_output, shared-expert gate/up/down, output head) in each GPU format (Q4_K ->
Int4Rows, Q6_K / Q8_0 -> Int8Rows), 1 token; beside each, torch's bfloat16 matmul on the same
shape (cuBLAS reading 16-bit weights) as the peer. Then the gathered expert GEMV (8 of 256
V3 experts, gate + up + down) and the MLA decode attention over 4096 cached positions.
Medians of --reps CUDA-event timings, spread min-max. --small runs tiny shapes (a smoke test
on any device; figures off CUDA mean nothing).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_kernels import random_matrix  # noqa: E402
from gpu_ops.attention import mla_decode  # noqa: E402
from gpu_ops.experts import GpuExperts  # noqa: E402
from gpu_ops.matmul import gpu_matmul, repack  # noqa: E402

V3_DENSE = {  # name: (out, in)
    "q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "attn_output": (7168, 16384),
    "shexp_gate/up": (2048, 7168), "shexp_down": (7168, 2048), "output": (129280, 7168),
}  # fmt: skip


def nbytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in vars(w).values() if isinstance(t, torch.Tensor))


def timed(fn, reps: int, device) -> list[float]:
    """Seconds per call: CUDA events around each call on CUDA, the wall clock elsewhere."""
    import time

    fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(device, mib: int, reps: int) -> float:
    """Device-to-device copy: bytes read + written per second."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / statistics.median(timed(lambda: dst.copy_(src), reps, device))


def row(name: str, n_bytes: int, times: list[float], bw: float) -> dict:
    gbs = [n_bytes / t / 1e9 for t in times]
    med = statistics.median(gbs)
    print(f"{name:<28} {med:8.1f} GB/s (runs {min(gbs):.0f}-{max(gbs):.0f})  {med * 1e9 / bw:5.0%} of copy")
    return {"name": name, "bytes": n_bytes, "gb_s": med, "gb_s_min": min(gbs), "gb_s_max": max(gbs),
            "of_copy": med * 1e9 / bw}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--small", action="store_true", help="tiny shapes: a smoke test on any device")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (figures mean nothing)"
    scale = 16 if args.small else 1
    rng = np.random.default_rng(0)
    bw = copy_bandwidth(device, 64 if args.small else 2048, args.reps)
    print(f"{name}: device copy {bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    for label, (out, k) in V3_DENSE.items():
        out, k = max(64, out // scale), max(256, k // scale // 256 * 256)
        x = torch.randn(1, k, device=device)
        for qtype in (T.Q4_K, T.Q6_K, T.Q8_0):
            w = repack(random_matrix(qtype, out, k, rng), qtype, k, device)
            rows.append(
                row(f"{label} {qtype.name}", nbytes(w), timed(lambda x=x, w=w: gpu_matmul(x, w), args.reps, device), bw)
            )
        dense = torch.randn(out, k, device=device, dtype=torch.bfloat16)
        xb = x.to(torch.bfloat16)
        rows.append(
            row(
                f"{label} bf16 torch",
                dense.numel() * 2,
                timed(lambda xb=xb, dense=dense: xb @ dense.T, args.reps, device),
                bw,
            )
        )
    # 64 of V3's 256 experts: the same bytes per call (8 experts), a quarter of the memory and set-up
    n_expert, d, f = (32, 512, 256) if args.small else (64, 7168, 2048)
    stack = [repack(random_matrix(T.Q4_K, n_expert * f, d, rng), T.Q4_K, d, device, n_expert) for _ in range(2)]
    down = repack(random_matrix(T.Q6_K, n_expert * d, f, rng), T.Q6_K, f, device, n_expert)
    experts = GpuExperts(*stack, down)
    x = torch.randn(1, d, device=device)
    ids = torch.from_numpy(rng.choice(n_expert, (1, 8), replace=False)).to(device)
    wts = torch.rand(1, 8, device=device)
    per_expert = (nbytes(stack[0]) + nbytes(stack[1]) + nbytes(down)) // n_expert
    rows.append(row("8 experts gathered", 8 * per_expert, timed(lambda: experts(x, ids, wts), args.reps, device), bw))
    h, r, p, s = (16, 512, 64, 256) if args.small else (128, 512, 64, 4096)
    cache = torch.randn(s, r + p, device=device)
    ql, qr = torch.randn(h, r, device=device), torch.randn(h, p, device=device)
    length = torch.tensor([s], device=device)
    attend = lambda: mla_decode(ql, qr, cache, length, 0.1)  # noqa: E731
    rows.append(row(f"MLA decode {s} positions", cache.numel() * 4, timed(attend, args.reps, device), bw))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "copy_gb_s": bw / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
