"""A memory-bandwidth probe: the roofline every CPU kernel is measured against."""

import numba
import numpy as np


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)
def parallel_sum(values: np.ndarray) -> float:
    """Sum with all threads; each element is read once, so time = bytes / read bandwidth."""
    total = 0.0
    for i in numba.prange(values.shape[0]):
        total += values[i]
    return total
