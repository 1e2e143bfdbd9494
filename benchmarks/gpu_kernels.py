"""GPU decode kernels against the GPU's own memory bandwidth, measured in the same run.

Usage: python benchmarks/gpu_kernels.py [--reps 50] [--json out.json] [--small]
       [--programs-per-sm 8,32] [--mla-precision tf32]

Decode is memory-bound: one token's GEMV reads every weight byte once, so the figure of merit
is bytes of the GPU format read per second against a device-to-device copy's bandwidth
(read + write bytes per second), measured here. Shapes: DeepSeek-V3's dense matrices (q_a,
q_b, kv_a, attn_output, shared-expert gate/up/down, output head) in each GPU format (Q4_K ->
Int4Rows, Q6_K / Q8_0 / Q5_K (with mins) -> Int8Rows), 1 token; beside each, torch's bfloat16 matmul on the same
shape (cuBLAS reading 16-bit weights) as the peer. Then the gathered expert GEMV (8 of 256
V3 experts, gate + up + down), R1's float16 W_UK stack as a legacy kv_b file derives it
(Triton against torch), and the MLA decode attention over 4096 cached positions.
On CUDA each call is captured in a CUDA graph (as the decode step runs) over enough copies of
small weights to read 256 MiB, so neither Python's launch cost nor the L2 cache is timed.
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
from gpu_ops.matmul import float_stack_matmul, gpu_matmul, repack, triton_runs_on  # noqa: E402

V3_DENSE = {  # name: (out, in)
    "q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "attn_output": (7168, 16384),
    "shexp_gate/up": (2048, 7168), "shexp_down": (7168, 2048), "output": (129280, 7168),
}  # fmt: skip


def nbytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in vars(w).values() if isinstance(t, torch.Tensor))


def copies_of(w, n_bytes: int, rotate_bytes: int):
    """Enough copies of w (GpuWeights or a tensor) that cycling through them reads rotate_bytes:
    a weight that fits in the L2 cache (H200: 50 MB) would otherwise be timed from the cache."""
    import copy

    n = max(1, min(64, -(-rotate_bytes // n_bytes)))
    if isinstance(w, torch.Tensor):
        return [w] + [w.clone() for _ in range(n - 1)]
    out = [w]
    for _ in range(n - 1):
        c = copy.copy(w)
        for name, t in vars(w).items():
            if isinstance(t, torch.Tensor):
                setattr(c, name, t.clone())
        out.append(c)
    return out


def timed(fns, reps: int, device, graph: bool = True) -> list[float]:
    """Seconds per call. On CUDA the calls (one per weight copy) are captured in one graph and
    the replays timed with events, as the decode step runs them: no Python launch cost, no
    cache reuse. Elsewhere (or graph=False) the clock around each call of the first."""
    import time

    for fn in fns:
        fn()
    if device.type == "cuda" and not graph:
        out = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fns[0]()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        return out
    if device.type != "cuda":
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fns[0]()
            out.append(time.perf_counter() - t0)
        return out
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / len(fns))
    return out


def copy_bandwidth(device, mib: int, reps: int) -> float:
    """Device-to-device copy: bytes read + written per second. Not from a graph: captured, the
    copy becomes a memcpy node (the copy engines, 2.7 TB/s on an H200) rather than the SM
    kernel torch launches eagerly (4.2 TB/s), which is the ceiling a kernel can reach."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / statistics.median(timed([lambda: dst.copy_(src)], reps, device, graph=False))


def row(name: str, n_bytes: int, times: list[float], bw: float, **extra) -> dict:
    gbs = [n_bytes / t / 1e9 for t in times]
    med = statistics.median(gbs)
    us = statistics.median(times) * 1e6
    print(f"{name:<34} {med:8.1f} GB/s (runs {min(gbs):.0f}-{max(gbs):.0f}) {us:8.1f} us  {med * 1e9 / bw:5.0%} of copy"
          + "".join(f"  {k} {v}" for k, v in extra.items()))  # fmt: skip
    return {"name": name, "bytes": n_bytes, "gb_s": med, "gb_s_min": min(gbs), "gb_s_max": max(gbs),
            "us": us, "of_copy": med * 1e9 / bw, **extra}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--small", action="store_true", help="tiny shapes: a smoke test on any device")
    ap.add_argument("--programs-per-sm", default="", help="also time the GEMVs at these launch sizes (e.g. 8,32)")
    ap.add_argument("--mla-precision", default="", help="also time MLA attention with these dot precisions (tf32)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (figures mean nothing)"
    scale = 16 if args.small else 1
    rotate = (8 if args.small else 256) << 20
    rng = np.random.default_rng(0)
    bw = copy_bandwidth(device, 64 if args.small else 2048, args.reps)
    print(f"{name}: device copy {bw / 1e9:.0f} GB/s (read + write)")
    import gpu_ops.triton_attention as ta
    import gpu_ops.triton_kernels as tk

    default_per_sm = tk.GEMV_PROGRAMS_PER_SM
    sweeps = [int(v) for v in args.programs_per_sm.split(",") if v]
    rows = []
    for label, (out, k) in V3_DENSE.items():
        out, k = max(64, out // scale), max(256, k // scale // 256 * 256)
        x = torch.randn(1, k, device=device)
        for qtype in (T.Q4_K, T.Q6_K, T.Q8_0, T.Q5_K):  # the dense types of Q4_K_M and the UD mixes
            w = repack(random_matrix(qtype, out, k, rng), qtype, k, device)
            ws = copies_of(w, nbytes(w), rotate)
            for per_sm in [default_per_sm, *sweeps]:
                tk.GEMV_PROGRAMS_PER_SM = per_sm
                tag = "" if per_sm == default_per_sm else f" @{per_sm}/SM"
                fns = [lambda x=x, w=w: gpu_matmul(x, w) for w in ws]
                rows.append(row(f"{label} {qtype.name}{tag}", nbytes(w), timed(fns, args.reps, device), bw))
            tk.GEMV_PROGRAMS_PER_SM = default_per_sm
            del ws, w
        dense = torch.randn(out, k, device=device, dtype=torch.bfloat16)
        xb = x.to(torch.bfloat16)
        fns = [lambda d=d, xb=xb: xb @ d.T for d in copies_of(dense, dense.numel() * 2, rotate)]
        rows.append(row(f"{label} bf16 torch", dense.numel() * 2, timed(fns, args.reps, device), bw))
        del fns, dense
    # 64 of V3's 256 experts: the same bytes per call (8 experts), a quarter of the memory and set-up
    n_expert, d, f = (32, 512, 256) if args.small else (64, 7168, 2048)
    stack = [repack(random_matrix(T.Q4_K, n_expert * f, d, rng), T.Q4_K, d, device, n_expert) for _ in range(2)]
    down = repack(random_matrix(T.Q6_K, n_expert * d, f, rng), T.Q6_K, f, device, n_expert)
    experts = GpuExperts(*stack, down)
    x = torch.randn(1, d, device=device)
    ids = torch.from_numpy(rng.choice(n_expert, (1, 8), replace=False)).to(device)
    wts = torch.rand(1, 8, device=device)
    per_expert = (nbytes(stack[0]) + nbytes(stack[1]) + nbytes(down)) // n_expert
    call = [lambda: experts(x, ids, wts)]
    rows.append(row("8 experts gathered", 8 * per_expert, timed(call, args.reps, device), bw))
    del call
    # W_UK derived from a legacy joint kv_b: float16 [H, R, N], one token per head, Triton against torch
    heads, rank, nope = (16, 512, 128) if args.small else (128, 512, 128)
    w_uk = torch.randn(heads, rank, nope, device=device).half()
    q = torch.randn(1, heads, nope, device=device)
    uk_copies = copies_of(w_uk, w_uk.numel() * 2, rotate)
    for triton, tag in ((True, "triton"), (False, "torch")):
        if triton and not triton_runs_on(device):  # the CPU without the interpreter: torch alone
            continue
        fns = [lambda w=w, triton=triton: float_stack_matmul(q, w, triton) for w in uk_copies]
        rows.append(row(f"W_UK f16 stack {tag}", w_uk.numel() * 2, timed(fns, args.reps, device), bw))
    del uk_copies, w_uk
    h, r, p, s = (16, 512, 64, 256) if args.small else (128, 512, 64, 4096)
    ql, qr = torch.randn(h, r, device=device), torch.randn(h, p, device=device)
    length = torch.tensor([s], device=device)
    default_precision = ta.DOT_PRECISION
    for dtype in (torch.float32, torch.bfloat16):
        cache = torch.randn(s, r + p, device=device).to(dtype)
        lat, kr = cache[:, :r].double(), cache[:, r:].double()
        scores = (ql.double() @ lat.T + qr.double() @ kr.T) * 0.1
        ref = torch.softmax(scores, -1) @ lat
        caches = copies_of(cache, cache.numel() * cache.element_size(), rotate)
        for precision in [default_precision, *(v for v in args.mla_precision.split(",") if v)]:
            ta.DOT_PRECISION = precision
            err = float((mla_decode(ql, qr, cache, length, 0.1) - ref).abs().max() / lat.abs().max())
            fns = [lambda c=c: mla_decode(ql, qr, c, length, 0.1) for c in caches]
            tag = "" if precision == default_precision else f" {precision}"
            rows.append(row(f"MLA decode {s} positions {str(dtype)[6:]}{tag}", cache.numel() * cache.element_size(),
                            timed(fns, args.reps, device), bw, err=f"{err:.1e}"))  # fmt: skip
        ta.DOT_PRECISION = default_precision
        del caches, cache
    if args.json:
        args.json.write_text(json.dumps({"device": name, "copy_gb_s": bw / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
