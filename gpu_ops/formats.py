"""GGUF blocks rearranged for the GPU, losslessly: the same numbers, in a layout made for loads.

Q4_K keeps each 256 values in one 144-byte block: two float16 super-scales, twelve bytes of
packed 6-bit sub-block scales and mins, then 128 bytes of 4-bit values. A GPU kernel wants the
4-bit values of a row contiguous (wide, coalesced loads along K) and the scales in arrays of
their own that it can index without unpacking bit fields. `Int4Rows` is that: the values keep
GGUF's order inside each 64-value chunk (byte b holds value b in its low nibble and value
32 + b in its high one), scales and mins become one byte each per 32 values, and the two
super-scales stay float16 per 256. Dequantization is then d * sc * q - dmin * m, in the same
order of float32 operations as GGUF's own, so the weights are bit-identical (tested). Memory:
4.625 bits per weight against Q4_K's 4.5.
"""

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

BLOCK, BLOCK_BYTES = GGML_QUANT_SIZES[QType.Q4_K]  # 256 values, 144 bytes


@dataclass
class Int4Rows:
    """A [rows, K] matrix of 4-bit values with per-32 scale/min bytes and per-256 float16 scales."""

    q: torch.Tensor  # uint8 [rows, K / 2]
    sc: torch.Tensor  # uint8 [rows, K / 32]
    mn: torch.Tensor  # uint8 [rows, K / 32]
    d: torch.Tensor  # float16 [rows, K / 256]
    dmin: torch.Tensor  # float16 [rows, K / 256]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * 2

    def to(self, device) -> "Int4Rows":
        return Int4Rows(*(t.to(device) for t in (self.q, self.sc, self.mn, self.d, self.dmin)))

    def rows(self, sel: slice) -> "Int4Rows":
        """A view of some rows (one expert of a stack)."""
        return Int4Rows(*(t[sel] for t in (self.q, self.sc, self.mn, self.d, self.dmin)))

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as float32 [stop - start, K], bit-identical to GGUF's dequantization."""
        return self.dequantize_index(slice(start, stop))

    def dequantize_index(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """The rows a slice or an index tensor selects, as float32 [n, K]."""
        q = self.q[rows]
        n, half = q.shape
        values = torch.stack([q & 15, q >> 4], dim=1)  # [n, 2, K/2]: low nibbles, then high
        values = values.view(n, 2, half // 32, 32).transpose(1, 2).reshape(n, -1, 32).float()  # [n, K/32, 32]
        d = self.d[rows].float().repeat_interleave(8, dim=1)
        dmin = self.dmin[rows].float().repeat_interleave(8, dim=1)
        scale = d * self.sc[rows].float()
        low = dmin * self.mn[rows].float()
        return (scale[..., None] * values - low[..., None]).reshape(n, -1)


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row of b [..., 2] as float16 (kept: float32 math on them is exact)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of each block [B, 12] -> 6-bit scales and mins [B, 8] each."""
    s = packed.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def repack_q4_k(raw: np.ndarray, in_features: int) -> Int4Rows:
    """Q4_K rows (uint8 [rows, row_bytes], e.g. a view of the file map) -> Int4Rows on the CPU."""
    if in_features % BLOCK:
        raise ValueError(f"Q4_K rows of {in_features} values: not a multiple of {BLOCK}")
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, in_features // BLOCK, BLOCK_BYTES)
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, mn = _scales_and_mins(blocks[..., 4:16].reshape(-1, 12))
    q = np.ascontiguousarray(blocks[..., 16:]).reshape(rows, in_features // 2)
    return Int4Rows(
        q=torch.from_numpy(q),  # a fresh array: ascontiguousarray of a strided slice copies
        sc=torch.from_numpy(sc.reshape(rows, -1)),
        mn=torch.from_numpy(mn.reshape(rows, -1)),
        d=torch.from_numpy(d),
        dmin=torch.from_numpy(dmin),
    )


@dataclass
class Int8Rows:
    """A [rows, K] matrix of signed 8-bit values, weight = d * q or d * sc * q.

    Q8_0 (d * q), Q5_0 (d * (q - 16)): one float16 d per 32 values. Q6_K (d * sc * (q - 32)):
    one float16 d per 256 and one int8 sc per 16. The values are the integers GGUF multiplies
    and the scales GGUF's own, multiplied in the same float32 order, so the weights are
    bit-identical. Memory: 8.5 bits per weight for Q8_0/Q5_0 (against 8.5/5.5), 8.56 for Q6_K
    (against 6.56): the price of one byte per value, which the kernel loads without unpacking.
    """

    q: torch.Tensor  # int8 [rows, K]
    d: torch.Tensor  # float16 [rows, K / d_group]
    sc: torch.Tensor | None  # int8 [rows, K / SC_GROUP] (Q6_K) or None
    d_group: int  # values per d: 256 (Q6_K) or 32

    SC_GROUP = 16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def to(self, device) -> "Int8Rows":
        sc = None if self.sc is None else self.sc.to(device)
        return Int8Rows(self.q.to(device), self.d.to(device), sc, self.d_group)

    def rows(self, sel: slice) -> "Int8Rows":
        return Int8Rows(self.q[sel], self.d[sel], None if self.sc is None else self.sc[sel], self.d_group)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.dequantize_index(slice(start, stop))

    def dequantize_index(self, rows: slice | torch.Tensor) -> torch.Tensor:
        q = self.q[rows].float()
        n = q.shape[0]
        scale = self.d[rows].float()
        group = self.d_group
        if self.sc is not None:
            scale = scale.repeat_interleave(self.d_group // self.SC_GROUP, dim=1) * self.sc[rows].float()
            group = self.SC_GROUP
        return (scale[:, :, None] * q.view(n, -1, group)).reshape(n, -1)


def repack_q8_0(raw: np.ndarray, in_features: int) -> Int8Rows:
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, in_features // 32, 34)
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, in_features)
    return Int8Rows(torch.from_numpy(q), torch.from_numpy(_f16(b[..., 0:2])), None, 32)


def repack_q5_0(raw: np.ndarray, in_features: int) -> Int8Rows:
    """Value j of a block: low nibble of byte j (j < 16) or high nibble of byte j - 16, and bit j
    of the 32-bit qh as its fifth bit; minus 16."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, in_features // 32, 22)
    qh = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)[..., 0]  # [rows, blocks]
    qs = b[..., 6:22]
    nibbles = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int16)  # [rows, blocks, 32]
    fifth = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    q = (nibbles | (fifth.astype(np.int16) << 4)) - 16
    return Int8Rows(
        torch.from_numpy(q.astype(np.int8).reshape(rows, in_features)), torch.from_numpy(_f16(b[..., 0:2])), None, 32
    )


def repack_q6_k(raw: np.ndarray, in_features: int) -> Int8Rows:
    """Per 128 values (two per block): 64 bytes of low nibbles, 32 of high 2-bit pairs; value
    32 * k + l (k < 4, l < 32) takes nibble k // 2 of ql[l + 32 * (k % 2)] and bits 2k of qh[l]."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, in_features // 256, 210)
    ql = b[..., 0:128].reshape(rows, -1, 2, 64)  # [rows, blocks, half, 64]
    qh = b[..., 128:192].reshape(rows, -1, 2, 32)
    parts = []
    for k in range(4):
        low = ql[..., 32 * (k % 2) : 32 * (k % 2) + 32]
        low = (low >> 4) if k >= 2 else (low & 15)
        high = (qh >> (2 * k)) & 3
        parts.append(low.astype(np.int16) | (high.astype(np.int16) << 4))
    q = np.stack(parts, axis=3).reshape(rows, in_features) - 32  # [rows, blocks, half, k, l]
    d = _f16(b[..., 208:210])  # [rows, blocks]
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(rows, -1)  # [rows, blocks * 16]
    return Int8Rows(torch.from_numpy(q.astype(np.int8)), torch.from_numpy(d), torch.from_numpy(sc), 256)
