"""MLA's per-token element-wise work for one decoded token, in one native call.

Between its matmuls, a decode step's attention only splits, normalizes and rotates a few
thousand values, but as torch ops that is ~40 calls of a few microseconds each per layer
(~0.5 ms of a 25 ms step on the V2-Lite-shaped file, four layers). Here it is one call. The
math is that of hetero.models.deepseek2 (rms_norm, apply_rope), which stays the reference.
"""

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def rms_norm_into(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out = x / sqrt(mean(x^2) + eps) * weight (sum of squares in float64)."""
    total = 0.0
    for v in x:
        total += np.float64(v) * v
    scale = np.float32(1.0 / np.sqrt(total / x.size + eps))
    for i in range(x.size):
        out[i] = x[i] * scale * weight[i]


@numba.njit(nogil=True, cache=True)
def rope_into(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray) -> None:
    """Adjacent pairs (x[2i], x[2i+1]) rotated by the angle whose cos/sin are cos[i], sin[i]."""
    for i in range(cos.size):
        even, odd = x[2 * i], x[2 * i + 1]
        out[2 * i] = even * cos[i] - odd * sin[i]
        out[2 * i + 1] = even * sin[i] + odd * cos[i]


@numba.njit(nogil=True, cache=True)
def split_and_rotate(
    q: np.ndarray,
    kv: np.ndarray,
    kv_norm: np.ndarray,
    eps: float,
    cos: np.ndarray,
    sin: np.ndarray,
    q_nope: np.ndarray,
    q_rope: np.ndarray,
    cache_row: np.ndarray,
) -> None:
    """One token: q [H*(N+P)] -> q_nope [H, N] and roped q_rope [H, P]; kv [R+P] -> the cache
    row [R+P]: the normalized latent, then the roped shared key."""
    n_head, nope = q_nope.shape
    rope = q_rope.shape[1]
    rank = kv.size - rope
    for h in range(n_head):
        base = h * (nope + rope)
        q_nope[h] = q[base : base + nope]
        rope_into(q[base + nope : base + nope + rope], cos, sin, q_rope[h])
    rms_norm_into(kv[:rank], kv_norm, eps, cache_row[:rank])
    rope_into(kv[rank:], cos, sin, cache_row[rank:])
