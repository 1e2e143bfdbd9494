"""A memory-bandwidth probe: the roofline every CPU kernel is measured against.

It runs on the same kind of pinned workers as the kernels (cpu_ops.executor), not on numba's
OpenMP pool: once that pool has run, its idle threads keep competing for the cores (a decode
step took 1.9-2.1 x as long after one numba `prange` region on the 2-core machine).
"""

import time

import numba
import numpy as np

from cpu_ops.executor import Executor
from cpu_ops.matmul import split


@numba.njit(nogil=True, cache=True, fastmath=True)
def chunk_sum(values: np.ndarray, start: int, stop: int) -> float:
    """Sum of values[start:stop]; each element is read once, so time = bytes / read bandwidth."""
    total = 0.0
    for i in range(start, stop):
        total += values[i]
    return total


def read_bandwidth(megabytes: int = 256, threads: int | None = None, repeats: int = 3) -> float:
    """Bytes/s of a parallel read over a buffer far larger than the caches (best of `repeats`)."""
    values = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    chunk_sum(values, 0, 1024)  # compile (cached on disk after the first run)
    with Executor(threads, limit_torch=False) as ex:
        tasks = [lambda a=a, b=b: chunk_sum(values, a, b) for a, b in split(values.size, ex.n_threads, 4096)]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ex.run(tasks)
            best = min(best, time.perf_counter() - t0)
    return values.nbytes / best
