"""Activations quantized to int8, the form every integer kernel consumes, rounded exactly as
llama.cpp's CPU backend rounds them, so that the integer dot products are identical and only
float summation order separates the two.

For each group of `group` values: 256 for the weight types with 256-value blocks (llama.cpp's
vec_dot_type Q8_K), 32 for the others (Q8_0). Both take iscale = 127 / max|x| in float32 and
q = round-half-even(x * iscale). The scale that multiplies the integer sums differs:
- Q8_K (`quantize_row_q8_K`, the scalar reference on x86 too): d = 1 / iscale, float32;
- Q8_0 (`quantize_row_q8_0`, the AVX2 path that AVX-512 builds run): d = max|x| / 127, stored
  as float16, so the kernels multiply by its float16 value.
(llama.cpp writes Q8_K with the sign of the largest-|x| value folded into d and q; products are
the same.) dx holds d once per 32 values, xs the integer sums of q per 16 (what K-quant mins
and zero points multiply). The rounding added is at most half a step per value. The float
values stay alongside for float weights.
"""

import math
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
def nearest_f16(x: float) -> np.float32:
    """x rounded to the nearest float16 (ties to even), as a float32: 11 significant bits for
    normal values, a fixed step of 2^-24 below 2^-14 (subnormals), infinity from 65520 on."""
    a = abs(x)
    if a == 0.0 or not math.isfinite(a):
        return np.float32(x)
    if a >= 65520.0:
        return np.float32(math.copysign(math.inf, x))
    e = max(math.frexp(a)[1], -13)  # a in [2^(e-1), 2^e)
    step = e - 11
    return np.float32(math.copysign(math.ldexp(np.rint(math.ldexp(a, -step)), step), x))


@numba.njit(nogil=True, cache=True)
def quantize_into(x: np.ndarray, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray, group: int) -> None:
    """x float32 [T, K] (K a multiple of group, group a multiple of 32) -> xq, dx, xs in place."""
    for t in range(x.shape[0]):
        for o in range(0, x.shape[1], group):
            amax = np.float32(0.0)
            for i in range(group):
                amax = max(amax, abs(x[t, o + i]))
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            if amax == 0:
                d = np.float32(0.0)
            elif group == 256:  # Q8_K
                d = np.float32(1.0) / inv
            else:  # Q8_0: the float16 the block stores
                d = nearest_f16(amax / np.float32(127.0))
            for s in range(o // 16, (o + group) // 16):
                total = 0
                for i in range(16 * s, 16 * s + 16):
                    q = np.int32(np.rint(np.float32(x[t, i] * inv)))
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
