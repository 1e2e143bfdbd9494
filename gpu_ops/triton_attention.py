"""Triton MLA decode attention (see gpu_ops.attention), imported only where Triton runs.

One program per BLOCK_H heads walks the valid positions BLOCK_S at a time and keeps a running
max, a running sum and a running latent output per head (an online softmax), so each cached
row is read once per block of heads and nothing of size [H, S] is ever stored.
"""

import torch
import triton
import triton.language as tl

BLOCK_H = 16
BLOCK_S = 16


@triton.jit
def _mla_decode_kernel(ql_ptr, qr_ptr, cache_ptr, len_ptr, o_ptr, H, R, P, ROW, scale,
                       BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_P: tl.constexpr):  # fmt: skip
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    p = tl.arange(0, BLOCK_P)
    p_ok = p < P
    ql = tl.load(ql_ptr + heads[:, None] * R + r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    qr = tl.load(qr_ptr + heads[:, None] * P + p[None, :], mask=h_ok[:, None] & p_ok[None, :], other=0.0)
    n = tl.load(len_ptr)
    best = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), tl.float32)
    for start in range(0, n, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < n
        lat = tl.load(cache_ptr + s[:, None] * ROW + r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0)
        kr = tl.load(cache_ptr + s[:, None] * ROW + R + p[None, :], mask=s_ok[:, None] & p_ok[None, :], other=0.0)
        score = tl.dot(ql, tl.trans(lat), input_precision="ieee") + tl.dot(qr, tl.trans(kr), input_precision="ieee")
        score = tl.where(s_ok[None, :], score * scale, float("-inf"))  # [BLOCK_H, BLOCK_S]
        new_best = tl.maximum(best, tl.max(score, axis=1))
        keep = tl.exp(best - new_best)
        weight = tl.exp(score - new_best[:, None])
        total = total * keep + tl.sum(weight, axis=1)
        acc = acc * keep[:, None] + tl.dot(weight, lat, input_precision="ieee")
        best = new_best
    o = acc / total[:, None]
    tl.store(o_ptr + heads[:, None] * R + r[None, :], o, mask=h_ok[:, None] & r_ok[None, :])


def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, cache_rows: torch.Tensor, length: torch.Tensor,
               scale: float) -> torch.Tensor:  # fmt: skip
    h, r = q_latent.shape
    p = q_rope.shape[1]
    if cache_rows.stride(1) != 1:
        raise ValueError("cache rows must be contiguous")
    o = torch.empty(h, r, dtype=torch.float32, device=q_latent.device)
    _mla_decode_kernel[(triton.cdiv(h, BLOCK_H),)](
        q_latent.float(), q_rope.float(), cache_rows, length, o, h, r, p, cache_rows.stride(0), scale,
        BLOCK_H=BLOCK_H, BLOCK_S=BLOCK_S, BLOCK_R=triton.next_power_of_2(r), BLOCK_P=triton.next_power_of_2(p),
    )  # fmt: skip
    return o
