"""Q4_K GEMV on the GGUF blocks as they are in the file (no repack), float32 activations.

A Q4_K block is 144 bytes for 256 values: d, dmin (float16), 12 bytes of packed 6-bit
sub-block scales and mins, 128 bytes of nibbles. For sub-block s of 32 values,
    w = d * sc[s] * q - dmin * m[s]
so   dot(w, x) = d * sc[s] * dot(q, x_s) - dmin * m[s] * sum(x_s),
and sum(x_s) is shared by every row: it is computed once per call, leaving one multiply-add
per weight in the inner loop. Bytes per value: 4.5 bits, so the kernel is bandwidth-bound.
"""

import numba
import numpy as np

BLOCK_VALUES, BLOCK_BYTES = 256, 144


@numba.njit(inline="always")
def _f16(lo: np.uint8, hi: np.uint8) -> np.float32:
    """IEEE half from two little-endian bytes (finite values; GGUF scales are finite)."""
    h = np.uint32(lo) | (np.uint32(hi) << 8)
    sign = -1.0 if h & 0x8000 else 1.0
    exp = (h >> 10) & 0x1F
    frac = h & 0x3FF
    if exp == 0:
        return np.float32(sign * frac * 2.0**-24)
    return np.float32(sign * (1.0 + frac / 1024.0) * 2.0 ** (np.int32(exp) - 15))


@numba.njit(inline="always")
def _scale_min(scales: np.ndarray, s: int) -> tuple[np.int32, np.int32]:
    if s < 4:
        return np.int32(scales[s] & 63), np.int32(scales[s + 4] & 63)
    sc = (scales[s + 4] & 0xF) | ((scales[s - 4] >> 6) << 4)
    m = (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4)
    return np.int32(sc), np.int32(m)


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _gemv_q4k(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    n_blocks = x.shape[0] // BLOCK_VALUES
    xsum = np.empty(n_blocks * 8, dtype=np.float32)  # sum of x over each 32-value sub-block
    for i in range(n_blocks * 8):
        acc = np.float32(0.0)
        for j in range(32):
            acc += x[i * 32 + j]
        xsum[i] = acc
    for row in numba.prange(w.shape[0]):
        wr = w[row]
        total = np.float32(0.0)
        for b in range(n_blocks):
            o = b * BLOCK_BYTES
            d = _f16(wr[o], wr[o + 1])
            dmin = _f16(wr[o + 2], wr[o + 3])
            base = b * BLOCK_VALUES
            for j in range(4):  # 64 values: sub-blocks 2j (low nibbles) and 2j+1 (high nibbles)
                lo = np.float32(0.0)
                hi = np.float32(0.0)
                q0 = o + 16 + 32 * j
                x0 = base + 64 * j
                for i in range(32):
                    q = np.int32(wr[q0 + i])
                    lo += x[x0 + i] * np.float32(q & 15)
                    hi += x[x0 + 32 + i] * np.float32(q >> 4)
                sc0, m0 = _scale_min(wr[o + 4 : o + 16], 2 * j)
                sc1, m1 = _scale_min(wr[o + 4 : o + 16], 2 * j + 1)
                s0 = b * 8 + 2 * j
                total += d * (sc0 * lo + sc1 * hi) - dmin * (m0 * xsum[s0] + m1 * xsum[s0 + 1])
        out[row] = total


def gemv_q4k(w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w: uint8 [rows, K/256*144] (GGUF Q4_K rows), x: float32 [K] -> float32 [rows]."""
    if w.dtype != np.uint8 or w.ndim != 2:
        raise ValueError(f"weights must be uint8 [rows, bytes], got {w.dtype} {w.shape}")
    if x.dtype != np.float32 or x.ndim != 1 or x.shape[0] % BLOCK_VALUES:
        raise ValueError(f"activations must be float32 [K] with K a multiple of 256, got {x.dtype} {x.shape}")
    if w.shape[1] != x.shape[0] // BLOCK_VALUES * BLOCK_BYTES:
        raise ValueError(f"weights of {w.shape[1]} bytes per row do not match K={x.shape[0]}")
    if out is None:
        out = np.empty(w.shape[0], dtype=np.float32)
    _gemv_q4k(w, np.ascontiguousarray(x), out)
    return out
