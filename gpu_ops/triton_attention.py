"""Triton MLA decode attention (see gpu_ops.attention), imported only where Triton runs.

Split over positions (flash-decoding): program (h, j) takes BLOCK_H heads and the j-th run of
SPLIT_LEN positions, walks the valid ones BLOCK_S at a time keeping a running max, sum and
latent output per head (an online softmax), and writes those three partials; a few torch ops
merge the runs. Splitting is what fills the GPU: V3's 128 heads make only 8 blocks of 16, so
without it 8 SMs of an H100's 132 would read the whole cache. The split count depends on the
cache's size only (not on the valid length, which lives on the device), so a captured graph
replays the same launch at every position; runs past the valid length write a zero sum and
drop out of the merge.
"""

import torch
import triton
import triton.language as tl

from gpu_ops.triton_kernels import programs_wanted

BLOCK_H = 16
BLOCK_S = 16
# Checked on the sm_90 compile (tests/test_gpu_compile.py): software pipelining (num_stages 2-3)
# made a bfloat16 cache spill 2-8 KiB of registers; a run is only a few blocks of positions
# long anyway, and 8 warps with one stage compile to 92-112 registers and no spills.
LAUNCH = {"num_warps": 8, "num_stages": 1}
PROGRAMS_PER_SM = 2
# float32 products. "tf32" ran 3.8x faster over 4096 positions on an H200 (372 -> 98 us,
# docs/benchmarks.md) at 1e-3 of the largest latent instead of 1e-6; kept exact until the
# kernel's structure, not its precision, is fixed (it reaches 1% of the copy bandwidth).
DOT_PRECISION = "ieee"


@triton.jit
def _mla_decode_kernel(ql_ptr, qr_ptr, cache_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, H, R, P, ROW, SPLIT_LEN, scale,
                       BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    h_ok = heads < H
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    p = tl.arange(0, BLOCK_P)
    p_ok = p < P
    ql = tl.load(ql_ptr + heads[:, None] * R + r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    qr = tl.load(qr_ptr + heads[:, None] * P + p[None, :], mask=h_ok[:, None] & p_ok[None, :], other=0.0)
    first = split * SPLIT_LEN
    end = tl.minimum(tl.load(len_ptr), first + SPLIT_LEN)
    best = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), tl.float32)
    for start in range(first, end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < end
        lat = tl.load(cache_ptr + s[:, None] * ROW + r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0)
        kr = tl.load(cache_ptr + s[:, None] * ROW + R + p[None, :], mask=s_ok[:, None] & p_ok[None, :], other=0.0)
        lat, kr = lat.to(tl.float32), kr.to(tl.float32)  # a bfloat16 cache widens as it loads
        score = tl.dot(ql, tl.trans(lat), input_precision=DOT_PRECISION) + tl.dot(
            qr, tl.trans(kr), input_precision=DOT_PRECISION
        )
        score = tl.where(s_ok[None, :], score * scale, float("-inf"))  # [BLOCK_H, BLOCK_S]
        new_best = tl.maximum(best, tl.max(score, axis=1))
        keep = tl.exp(best - new_best)
        weight = tl.exp(score - new_best[:, None])
        total = total * keep + tl.sum(weight, axis=1)
        acc = acc * keep[:, None] + tl.dot(weight, lat, input_precision=DOT_PRECISION)
        best = new_best
    row = split * H + heads
    tl.store(m_ptr + row, best, mask=h_ok)
    tl.store(l_ptr + row, total, mask=h_ok)
    tl.store(acc_ptr + row[:, None] * R + r[None, :], acc, mask=h_ok[:, None] & r_ok[None, :])


def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, cache_rows: torch.Tensor, length: torch.Tensor,
               scale: float) -> torch.Tensor:  # fmt: skip
    h, r = q_latent.shape
    p = q_rope.shape[1]
    if cache_rows.stride(1) != 1:
        raise ValueError("cache rows must be contiguous")
    head_blocks = triton.cdiv(h, BLOCK_H)
    positions = cache_rows.shape[0]
    wanted = programs_wanted(q_latent.device, PROGRAMS_PER_SM)
    splits = max(1, min(triton.cdiv(positions, BLOCK_S), triton.cdiv(wanted, head_blocks)))
    split_len = triton.cdiv(triton.cdiv(positions, splits), BLOCK_S) * BLOCK_S
    splits = triton.cdiv(positions, split_len)
    dev = q_latent.device
    best = torch.empty(splits, h, dtype=torch.float32, device=dev)
    total = torch.empty(splits, h, dtype=torch.float32, device=dev)
    acc = torch.empty(splits, h, r, dtype=torch.float32, device=dev)
    _mla_decode_kernel[(head_blocks, splits)](
        q_latent.float(), q_rope.float(), cache_rows, length, best, total, acc, h, r, p, cache_rows.stride(0),
        split_len, scale, BLOCK_H=BLOCK_H, BLOCK_S=BLOCK_S, BLOCK_R=triton.next_power_of_2(r),
        BLOCK_P=triton.next_power_of_2(p), DOT_PRECISION=DOT_PRECISION, **LAUNCH,
    )  # fmt: skip
    weight = torch.exp(best - best.max(0).values)  # [splits, H]; 0 for runs past the valid length
    return (weight[..., None] * acc).sum(0) / (weight * total).sum(0)[:, None]
