"""CPU kernel throughput against the machine's read bandwidth, measured in the same run.

Usage: python benchmarks/cpu_kernels.py [--mib 256] [--k 2048] [--threads N] [--reps 9] [--types Q4_K,Q6_K]

For each weight type: a random matrix of about --mib MiB (far beyond the L3 cache, so every
call streams it from DRAM) times one token's activations through CpuMatrix on the executor,
then the fused expert MLP on V2-Lite expert shapes (64 experts of 2048 -> 1408 -> 2048, 6 chosen
per token at random, several layers so the chosen experts are not cached). Each measurement is
interleaved with the bandwidth probe; medians and the spread (min-max) are printed.
"""

import argparse
import statistics
import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from cpu_ops.blocks import BLOCKS
from cpu_ops.executor import Executor
from cpu_ops.experts import CpuExperts, Stack
from cpu_ops.matmul import CpuMatrix
from modelfile.quants.types import with_scales
from placement.hardware import measure_read_bandwidth


def random_matrix(qtype, rows: int, k: int, rng) -> np.ndarray:
    """uint8 [rows, row_bytes] of random blocks with small finite float16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    if qtype in (T.F32, T.F16, T.BF16):
        vals = rng.standard_normal((rows, k), dtype=np.float32)
        if qtype == T.F16:
            vals = vals.astype(np.float16)
        elif qtype == T.BF16:
            vals = (vals.view(np.uint32) >> 16).astype(np.uint16)
        return vals.view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (rows * (k // block), size), dtype=np.uint8)
    return with_scales(qtype, raw, lambda n: rng.random(n) * 0.01).reshape(rows, -1)


def timed(fn, reps: int, probe: list[float]) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        probe.append(measure_read_bandwidth(256))
    return times


def line(name: str, nbytes: int, times: list[float], probe: float) -> str:
    gb = nbytes / 1e9
    med = gb / statistics.median(times)
    spread = f"{gb / max(times):.1f}-{gb / min(times):.1f}"
    return f"{name:<34} {med:6.1f} GB/s (runs {spread})  {med / probe:5.0%} of the probe"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--types", default=",".join(t.name for t in BLOCKS))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    probe: list[float] = []
    results = []
    with Executor(threads=args.threads) as ex:
        for name in args.types.split(","):
            qtype = T[name]
            block, size = GGML_QUANT_SIZES[qtype]
            rows = args.mib * 2**20 // (args.k // block * size)
            w = CpuMatrix(random_matrix(qtype, rows, args.k, rng), qtype, args.k)
            acts = w.quantize(rng.standard_normal((1, args.k), dtype=np.float32))
            results.append(
                (f"GEMV {name} {rows}x{args.k}", w.raw.nbytes, timed(lambda w=w, a=acts: w(ex, a), args.reps, probe))
            )
        for gate_t, down_t, f in ((T.Q4_K, T.Q5_0, 1408), (T.Q4_K, T.Q6_K, 1536)):
            layers, per_expert = [], 0
            for _ in range(4):
                gate, up = (
                    Stack(random_matrix(gate_t, 64 * f, 2048, rng).reshape(64, f, -1), gate_t, 2048) for _ in "gu"
                )
                down = Stack(random_matrix(down_t, 64 * 2048, f, rng).reshape(64, 2048, -1), down_t, f)
                layers.append(CpuExperts(gate, up, down, ex))
                per_expert = (gate.raw.nbytes + up.raw.nbytes + down.raw.nbytes) // 64
            x = rng.standard_normal((1, 2048), dtype=np.float32)

            def step(layers=layers, x=x):
                for layer in layers:
                    ids = rng.choice(64, 6, replace=False)[None]
                    layer.submit(x, ids, np.full((1, 6), 1 / 6, np.float32)).wait()

            nbytes = 4 * 6 * per_expert
            results.append((f"experts {gate_t.name}/{down_t.name} F={f}, 4x6", nbytes, timed(step, args.reps, probe)))
        threads = ex.n_threads
    bw = statistics.median(probe) / 1e9
    print(
        f"{threads} threads; read bandwidth probe median {bw:.1f} GB/s "
        f"(runs {min(probe) / 1e9:.1f}-{max(probe) / 1e9:.1f})"
    )
    for name, nbytes, times in results:
        print(line(name, nbytes, times, bw))


if __name__ == "__main__":
    main()
