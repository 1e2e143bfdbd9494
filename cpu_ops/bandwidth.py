"""The CPU's two probes: memory bandwidth (decode's roofline) and prompt multiply-adds.

It must be bound by memory, not by the core: a float sum is a chain of dependent adds that
numba does not reorder (about 5 GB/s a core here, a fifth of what the memory gives), so the
probe adds 64-bit integers, which LLVM vectorizes freely (about 25 GB/s a core). It runs on the
same kind of pinned workers as the kernels (cpu_ops.executor), not on numba's OpenMP pool: once
that pool has run, its idle threads keep competing for the cores (a decode step took 1.9-2.1 x
as long after one numba `prange` region on the 2-core machine).
"""

import time

import numba
import numpy as np

from cpu_ops.executor import Executor
from cpu_ops.matmul import split

PREFILL_METHOD = "Q4_K rows {rows}x{k} times {tokens} tokens on {threads} pinned thread(s), best of {repeats}"
METHOD = "parallel int64 sum over {mib} MiB on {threads} pinned thread(s), best of {repeats}"


@numba.njit(nogil=True, cache=True)
def chunk_sum(values: np.ndarray, start: int, stop: int) -> int:
    """Sum of values[start:stop]; each element is read once, so time = bytes / read bandwidth."""
    total = 0
    for v in values[start:stop]:
        total += v
    return total


def read_bandwidth(megabytes: int = 256, threads: int | None = None, repeats: int = 3) -> tuple[float, str]:
    """(bytes/s, how it was measured) of a parallel read over a buffer far larger than the caches."""
    values = np.ones(megabytes * 2**20 // 8, dtype=np.int64)
    chunk_sum(values, 0, 1024)  # compile (cached on disk after the first run)
    with Executor(threads, limit_torch=False) as ex:
        parts = split(values.size, ex.n_threads, 4096)
        sums = [0] * len(parts)

        def task(k: int, a: int, b: int):
            return lambda: sums.__setitem__(k, chunk_sum(values, a, b))

        tasks = [task(k, a, b) for k, (a, b) in enumerate(parts)]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ex.run(tasks)
            best = min(best, time.perf_counter() - t0)
        n_threads = ex.n_threads
    if sum(sums) != values.size:  # every element read, none twice
        raise RuntimeError("the bandwidth probe summed the wrong elements")
    return values.nbytes / best, METHOD.format(mib=megabytes, threads=n_threads, repeats=repeats)


def prefill_macs(threads: int | None = None, repeats: int = 3) -> tuple[float, str]:
    """(int8 multiply-adds/s, how it was measured) of the engine's matmul over a prompt tile:
    random Q4_K rows (the type of most routed experts) times 128 tokens, rows split over the
    workers as a prompt's experts are. Compute-bound: the weights (1.1 MiB) stay in cache."""
    from gguf import GGMLQuantizationType as QType

    from cpu_ops.matmul import CpuMatrix
    from modelfile.quants.types import row_bytes, with_scales

    rows, k, tokens = 1024, 2048, 128
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (rows * k // 256, 144), dtype=np.uint8)
    raw = with_scales(QType.Q4_K, raw, lambda n: rng.uniform(1e-3, 2e-3, n)).reshape(rows, row_bytes(QType.Q4_K, k))
    matrix = CpuMatrix(raw, QType.Q4_K, k)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    with Executor(threads, limit_torch=False) as ex:
        matrix(ex, matrix.quantize(x))  # compile (cached on disk after the first run)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            matrix(ex, matrix.quantize(x))
            best = min(best, time.perf_counter() - t0)
        n_threads = ex.n_threads
    return rows * k * tokens / best, PREFILL_METHOD.format(rows=rows, k=k, tokens=tokens, threads=n_threads,
                                                           repeats=repeats)  # fmt: skip
