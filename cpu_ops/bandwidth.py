"""A memory-bandwidth probe: the roofline every CPU kernel is measured against.

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
