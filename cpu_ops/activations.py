"""Activations quantized to int8, the form every integer kernel consumes, rounded exactly as
llama.cpp's CPU backend rounds them, so that the integer dot products are identical and only
float summation order separates the two.

The format is the weight type's (its declaration's `activation_format`, llama.cpp's
vec_dot_type). All three take iscale = 127 / max|x| in float32 over a group of values and
q = round-half-even(x * iscale); the scale that multiplies the integer sums differs:
- Q8_K, per 256 values (`quantize_row_q8_K`, the scalar reference on x86 too): d = 1 / iscale,
  float32;
- Q8_0, per 32 (`quantize_row_q8_0`, the AVX2 path that AVX-512 builds run): d = max|x| / 127,
  stored as float16, so the kernels multiply by its float16 value;
- Q8_1, per 32 (`quantize_row_q8_1`, AVX2), for the types with a min (Q4_1, Q5_1): d as Q8_0,
  and s = d * sum(q) stored as float16, which the min multiplies. Both round from the float32
  d, so dx keeps that unrounded and the kernel rounds d and s to float16 itself.
(llama.cpp writes Q8_K with the sign of the largest-|x| value folded into d and q; products are
the same.) dx holds d once per 32 values, xs the integer sums of q per 16 (what K-quant mins
and zero points multiply). The rounding added is at most half a step per value.

Float weights take float activations, xf, in the weight's own format as llama.cpp converts them
(`ggml_cpu_fp32_to_fp16` / `_bf16`, round half to even): F16 weights meet x rounded to float16,
BF16 weights x rounded to bfloat16, F32 weights x itself. The float forms write only xf, the
int8 forms only xq, dx and xs (`quantize` then hands x itself as xf).
"""

import math
from dataclasses import dataclass

import numba
import numpy as np

# the formats as the numba kernels take them
Q8_0, Q8_1, Q8_K, F32, F16, BF16 = range(6)
FORMATS = {"Q8_0": Q8_0, "Q8_1": Q8_1, "Q8_K": Q8_K, "F32": F32, "F16": F16, "BF16": BF16}
GROUP = (32, 32, 256, 32, 32, 32)  # values per scale, by format (float weights: 32 at a time)


@dataclass
class QuantizedActivations:
    xq: np.ndarray  # int8 [T, K]
    dx: np.ndarray  # float32 [T, K / 32]
    xs: np.ndarray  # int32 [T, K / 16]
    xf: np.ndarray  # float32 [T, K], the input (rounded to F16 / BF16 in those forms)
    form: int  # one of FORMATS' values

    @property
    def n_tokens(self) -> int:
        return self.xf.shape[0]

    @property
    def width(self) -> int:
        return self.xf.shape[1]

    @property
    def group(self) -> int:
        return GROUP[self.form]

    def dequantized(self) -> np.ndarray:
        """float64 [T, K]: what the integer kernels multiply (for tests and error budgets)."""
        d = self.dx.astype(np.float16) if self.form == Q8_1 else self.dx
        return self.xq.astype(np.float64) * np.repeat(d.astype(np.float64), 32, axis=1)


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
def nearest_bf16(row: np.ndarray, out: np.ndarray) -> None:
    """out = row rounded to the nearest bfloat16 (ties to even), as float32; NaN stays NaN."""
    bits, rounded = row.view(np.uint32), out.view(np.uint32)
    for i in range(bits.size):
        b = bits[i]
        if b & 0x7FFFFFFF > 0x7F800000:
            rounded[i] = (b | 0x00400000) & 0xFFFF0000  # quiet NaN, as llama.cpp's
        else:
            rounded[i] = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16


@numba.njit(nogil=True, cache=True)
def float_values_buffer(x: np.ndarray, form: int) -> np.ndarray:
    """Where quantize_into puts the float values of x [T, K]: a new array where the form rounds
    them (F16, BF16), else x itself."""
    return np.empty_like(x) if form == F16 or form == BF16 else x


@numba.njit(nogil=True, cache=True)
def quantize_into(x: np.ndarray, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray, xf: np.ndarray, form: int) -> None:
    """x float32 [T, K] (K a multiple of the format's group) -> xq, dx, xs in place, or (float
    forms) xf; xf may be x itself in the int8 and F32 forms."""
    if form >= F32:
        for t in range(x.shape[0]):
            if form == BF16:
                nearest_bf16(x[t], xf[t])
            else:
                for i in range(x.shape[1]):
                    xf[t, i] = nearest_f16(x[t, i]) if form == F16 else x[t, i]
        return
    group = GROUP[form]
    for t in range(x.shape[0]):
        for o in range(0, x.shape[1], group):
            amax = np.float32(0.0)
            for i in range(group):
                amax = max(amax, abs(x[t, o + i]))
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            if amax == 0:
                d = np.float32(0.0)
            elif form == Q8_K:
                d = np.float32(1.0) / inv
            elif form == Q8_0:  # the float16 the block stores
                d = nearest_f16(amax / np.float32(127.0))
            else:  # Q8_1: the float32 that d and s are rounded from
                d = amax / np.float32(127.0)
            for s in range(o // 16, (o + group) // 16):
                total = 0
                for i in range(16 * s, 16 * s + 16):
                    q = np.int32(np.rint(np.float32(x[t, i] * inv)))
                    xq[t, i] = q
                    total += q
                xs[t, s] = total
            for g in range(o // 32, (o + group) // 32):
                dx[t, g] = d


def quantize(x: np.ndarray, form: int = Q8_0) -> QuantizedActivations:
    """float32 [T, K] -> QuantizedActivations (K must be a multiple of the format's group)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if form not in FORMATS.values():
        raise ValueError(f"activation format must be one of {sorted(FORMATS)}, got {form}")
    group = GROUP[form]
    if x.ndim != 2 or x.shape[1] % group:
        raise ValueError(f"activations must be [tokens, K] with K a multiple of {group}, got {x.shape}")
    t, k = x.shape
    xf = float_values_buffer(x, form)
    a = QuantizedActivations(
        np.empty((t, k), np.int8), np.empty((t, k // 32), np.float32), np.empty((t, k // 16), np.int32), xf, form
    )
    quantize_into(x, a.xq, a.dx, a.xs, xf, form)
    return a
