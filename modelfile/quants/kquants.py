"""The 256-value super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS.

Each function maps uint8 blocks [N, type_size] to float32 [N, 256]. A super-block is split
into sub-blocks that share a small integer scale (and, for Q2/Q4/Q5_K, a min); the super-block
carries the float16 factors `d` (and `dmin`) that those integers multiply.
"""

import torch

from modelfile.quants.legacy import IQ4_LEVELS, f16


def _shifted(x: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    """x [..., L] -> [..., len(shifts), L]: x >> s for each shift, as a new axis."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device)
    return x.unsqueeze(-2) >> s.view(-1, 1)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (the Q4_K/Q5_K packing).

    bytes 0..3 : scale[0..3] (bits 0-5) | scale[4..7] bits 4-5 (bits 6-7)
    bytes 4..7 : min[0..3]   (bits 0-5) | min[4..7]   bits 4-5 (bits 6-7)
    bytes 8..11: scale[4..7] bits 0-3 (low nibble) | min[4..7] bits 0-3 (high nibble)
    """
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def q2_k(blocks):
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = f16(blocks[:, 80:82]), f16(blocks[:, 82:84])
    # qs: two halves of 32 bytes; each byte holds four 2-bit values, one per 32-value group.
    q = (_shifted(qs.reshape(n, 2, 32), (0, 2, 4, 6)) & 3).reshape(n, 16, 16).float()
    sc, mn = (scales & 0x0F).float(), (scales >> 4).float()
    return (d.view(n, 1, 1) * sc.unsqueeze(-1) * q - dmin.view(n, 1, 1) * mn.unsqueeze(-1)).reshape(n, 256)


def q3_k(blocks):
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = f16(blocks[:, 108:110])
    low = _shifted(scales[:, :8], (0, 4)).reshape(n, 16) & 0x0F
    high = _shifted(scales[:, 8:12], (0, 2, 4, 6)).reshape(n, 16) & 3
    sc = (low | (high << 4)).float() - 32
    ql = (_shifted(qs.reshape(n, 2, 32), (0, 2, 4, 6)) & 3).reshape(n, 16, 16)
    hbit = (_shifted(hmask, tuple(range(8))) & 1).reshape(n, 16, 16)
    q = ql.float() - 4 * (1 - hbit.float())  # a clear high bit means "subtract 4"
    return (d.view(n, 1, 1) * sc.unsqueeze(-1) * q).reshape(n, 256)


def q4_k(blocks):
    n = blocks.shape[0]
    d, dmin = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    q = _shifted(blocks[:, 16:144].reshape(n, 4, 32), (0, 4)).reshape(n, 8, 32) & 0x0F
    return (d.view(n, 1, 1) * sc.unsqueeze(-1) * q.float() - (dmin * mn).unsqueeze(-1)).reshape(n, 256)


def q5_k(blocks):
    n = blocks.shape[0]
    d, dmin = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    qh = _shifted(blocks[:, 16:48], tuple(range(8))) & 1  # [n, 8, 32]: bit j -> sub-block j
    ql = _shifted(blocks[:, 48:176].reshape(n, 4, 32), (0, 4)).reshape(n, 8, 32) & 0x0F
    q = (ql | (qh << 4)).float()
    return (d.view(n, 1, 1) * sc.unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, 256)


def q6_k(blocks):
    n = blocks.shape[0]
    ql, qh = blocks[:, :128].reshape(n, 2, 64), blocks[:, 128:192].reshape(n, 2, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = f16(blocks[:, 208:210])
    # Per 128-value half: low nibbles of ql[0:32], ql[32:64], then high nibbles; qh adds 2 bits each.
    lo = _shifted(ql.reshape(n, 2, 2, 32), (0, 4)).transpose(2, 3).reshape(n, 2, 4, 32) & 0x0F
    hi = _shifted(qh, (0, 2, 4, 6)) & 3
    q = (lo | (hi << 4)).float().reshape(n, 16, 16) - 32
    return (d.view(n, 1, 1) * scales.unsqueeze(-1) * q).reshape(n, 256)


def iq4_xs(blocks):
    n = blocks.shape[0]
    d = f16(blocks[:, 0:2])
    scales_h = blocks[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF
    scales_l = blocks[:, 4:8]
    low = _shifted(scales_l, (0, 4)).transpose(1, 2).reshape(n, 8).int() & 0x0F
    shifts = 2 * torch.arange(8, device=blocks.device, dtype=torch.int32)
    high = (scales_h >> shifts) & 3
    ls = (low | (high << 4)).float() - 32
    q = _shifted(blocks[:, 8:136].reshape(n, 8, 16), (0, 4)).reshape(n, 8, 32) & 0x0F
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=blocks.device)
    return ((d * ls).unsqueeze(-1) * levels[q.long()]).reshape(n, 256)
