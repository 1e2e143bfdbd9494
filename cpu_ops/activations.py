"""Activations quantized to int8, the form every integer kernel consumes.

For each group of `group` values (32, or 256 for the weight types with 256-value blocks, as
llama.cpp's Q8_0 and Q8_K): int8 values q = round(x / dx) with dx = max|x| / 127, the scale
dx stored once per 32 values, and the integer sums of q per 16 (what K-quant mins and zero
points multiply). The rounding added is at most dx / 2 per value. The float values stay
alongside for float weights.
"""

from dataclasses import dataclass

import numba
import numpy as np


@dataclass
class QuantizedActivations:
    xq: np.ndarray  # int8 [T, K]
    dx: np.ndarray  # float32 [T, K / 32]
    xs: np.ndarray  # int32 [T, K / 16]
    xf: np.ndarray  # float32 [T, K], the input
    group: int  # values per scale: 32 or 256

    @property
    def n_tokens(self) -> int:
        return self.xf.shape[0]

    @property
    def width(self) -> int:
        return self.xf.shape[1]

    def dequantized(self) -> np.ndarray:
        """float64 [T, K]: what the integer kernels multiply (for tests and error budgets)."""
        return self.xq.astype(np.float64) * np.repeat(self.dx.astype(np.float64), 32, axis=1)


@numba.njit(nogil=True, cache=True)
def quantize_into(x: np.ndarray, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray, group: int) -> None:
    """x float32 [T, K] (K a multiple of group, group a multiple of 32) -> xq, dx, xs in place."""
    for t in range(x.shape[0]):
        for o in range(0, x.shape[1], group):
            amax = np.float32(0.0)
            for i in range(group):
                amax = max(amax, abs(x[t, o + i]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if amax > 0 else np.float32(0.0)
            for s in range(o // 16, (o + group) // 16):
                total = 0
                for i in range(16 * s, 16 * s + 16):
                    q = np.int32(np.rint(x[t, i] * inv))
                    xq[t, i] = q
                    total += q
                xs[t, s] = total
            for g in range(o // 32, (o + group) // 32):
                dx[t, g] = d


def quantize(x: np.ndarray, group: int = 32) -> QuantizedActivations:
    """float32 [T, K] -> QuantizedActivations (K must be a multiple of group; group 32 or 256)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if group not in (32, 256):
        raise ValueError(f"activation group must be 32 or 256, got {group}")
    if x.ndim != 2 or x.shape[1] % group:
        raise ValueError(f"activations must be [tokens, K] with K a multiple of {group}, got {x.shape}")
    t, k = x.shape
    a = QuantizedActivations(
        np.empty((t, k), np.int8), np.empty((t, k // 32), np.float32), np.empty((t, k // 16), np.int32), x, group
    )
    quantize_into(x, a.xq, a.dx, a.xs, group)
    return a
