"""MLA's per-token element-wise work for one decoded token, in one native call.

Between its matmuls, a decode step's attention only splits and rotates a few thousand values,
but as torch ops that is ~30 calls of a few microseconds each per layer. Here it is one call,
with the rotation of hetero.rope.apply_rope, value for value. (The latent's RMS norm stays in
torch: a sum in another order would change the cached latent in its last bit, and a decoded
token must see the same cache as a prefill of the same tokens.)
"""

import numba
import numpy as np


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
    cos: np.ndarray,
    sin: np.ndarray,
    q_nope: np.ndarray,
    q_rope: np.ndarray,
    cache_row: np.ndarray,
) -> None:
    """One token: q [H*(N+P)] -> q_nope [H, N] and roped q_rope [H, P]; kv [R+P] -> the cache
    row [R+P]: the latent as it is (the caller normalizes it), then the roped shared key."""
    n_head, nope = q_nope.shape
    rope = q_rope.shape[1]
    rank = kv.size - rope
    for h in range(n_head):
        base = h * (nope + rope)
        q_nope[h] = q[base : base + nope]
        rope_into(q[base + nope : base + nope + rope], cos, sin, q_rope[h])
    cache_row[:rank] = kv[:rank]
    rope_into(kv[rank:], cos, sin, cache_row[rank:])
