"""Activations quantized per 32 values, the form every integer kernel consumes.

For each group of 32: int8 values q = round(x / dx) with dx = max|x| / 127, the float scale dx,
and the integer sums of q per 16 (what K-quant mins and zero points multiply). One group per
32 values is finer than llama.cpp's Q8_K (one scale per 256), so the rounding added here is at
most dx / 2 per value. The float values stay alongside for float weights.
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
def quantize_into(x: np.ndarray, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray) -> None:
    """x float32 [T, K] (K a multiple of 32) -> xq, dx, xs in place."""
    for t in range(x.shape[0]):
        for g in range(x.shape[1] // 32):
            o = g * 32
            amax = np.float32(0.0)
            for i in range(32):
                amax = max(amax, abs(x[t, o + i]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if amax > 0 else np.float32(0.0)
            for h in range(2):
                total = 0
                for i in range(16):
                    q = np.int32(np.rint(x[t, o + 16 * h + i] * inv))
                    xq[t, o + 16 * h + i] = q
                    total += q
                xs[t, 2 * g + h] = total
            dx[t, g] = d


def quantize(x: np.ndarray) -> QuantizedActivations:
    """float32 [T, K] -> QuantizedActivations (K must be a multiple of 32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % 32:
        raise ValueError(f"activations must be [tokens, K] with K a multiple of 32, got {x.shape}")
    t, k = x.shape
    a = QuantizedActivations(
        np.empty((t, k), np.int8), np.empty((t, k // 32), np.float32), np.empty((t, k // 16), np.int32), x
    )
    quantize_into(x, a.xq, a.dx, a.xs)
    return a
