"""CPU kernel throughput against the machine's read bandwidth, measured in the same run.

Usage: python benchmarks/cpu_kernels.py [--rows 16384] [--k 7168] [--reps 7]
Weights are far larger than the caches, so every call streams them from DRAM.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from cpu_ops.q4k import gemv_q4k
from hetero.ops import quant_matmul
from placement.hardware import measure_read_bandwidth


def timed(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--k", type=int, default=7168)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    blocks = args.k // 256
    w = rng.integers(0, 256, (args.rows, blocks * 144), dtype=np.uint8)
    w.reshape(args.rows, blocks, 144)[:, :, :4] = np.frombuffer(
        (rng.random(args.rows * blocks * 2) * 0.01).astype(np.float16).tobytes(), np.uint8
    ).reshape(args.rows, blocks, 4)
    x = rng.standard_normal(args.k).astype(np.float32)
    out = np.empty(args.rows, np.float32)
    bw = [measure_read_bandwidth(512) for _ in range(3)]
    q4k = timed(lambda: gemv_q4k(w, x, out), args.reps)
    ref = timed(lambda: quant_matmul(torch.from_numpy(x)[None], torch.from_numpy(w), T.Q4_K, args.k), 3)
    gb = w.nbytes / 1e9
    probe = statistics.median(bw) / 1e9
    med = statistics.median(q4k)
    print(f"weights {w.nbytes / 2**20:.0f} MiB Q4_K ({args.rows} x {args.k}), {torch.get_num_threads()} threads")
    print(f"read bandwidth probe: median {probe:.1f} GB/s (runs {min(bw) / 1e9:.1f}-{max(bw) / 1e9:.1f})")
    print(
        f"numba gemv_q4k: median {gb / med:.1f} GB/s (runs {gb / max(q4k):.1f}-{gb / min(q4k):.1f}), "
        f"{gb / med / probe:.0%} of the probe"
    )
    print(f"torch reference (dequantize + matmul): median {gb / statistics.median(ref):.2f} GB/s")


if __name__ == "__main__":
    main()
