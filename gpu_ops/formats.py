"""GGUF blocks rearranged for the GPU, losslessly: the same numbers, in a layout made for loads.

Q4_K keeps each 256 values in one 144-byte block: two float16 super-scales, twelve bytes of
packed 6-bit sub-block scales and mins, then 128 bytes of 4-bit values. A GPU kernel wants the
values it reads together to lie together, and scales it can index without unpacking bit
fields. The kernels (gpu_ops/triton_kernels.py) give each program a tile of TILE rows and walk
K in chunks, so the formats here store exactly that (Marlin's idea, without its tensor-core
fragment order, which Triton's tl.dot arranges itself): rows are grouped in tiles of TILE,
and for each tile and chunk the TILE rows' bytes are one contiguous block (2 KiB of 4-bit
values per 64-value chunk), the scales of a tile likewise one contiguous run per sub-block.
A program's load is then one contiguous, fully coalesced block. Rows of each group (expert)
are padded with zeros to whole tiles, so an expert's tiles never mix with the next one's.

`Int4Rows` (Q4_K): the values keep GGUF's order inside each 64-value chunk (byte b holds value
b in its low nibble and value 32 + b in its high one), scales and mins become one byte each
per 32 values, and the two super-scales stay float16 per 256. Dequantization is then
d * sc * q - dmin * m, in the same order of float32 operations as GGUF's own, so the weights
are bit-identical (tested). Memory: 4.625 bits per weight against Q4_K's 4.5.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from gpu_ops.capabilities import TILE  # rows per tile: the Triton kernels' BLOCK_N

BLOCK, BLOCK_BYTES = GGML_QUANT_SIZES[QType.Q4_K]  # 256 values, 144 bytes


def tiles_for(rows: int) -> int:
    return -(-rows // TILE)


def tile_rows(a: np.ndarray, groups: int) -> np.ndarray:
    """Per-row data [rows, C, *rest] -> [tiles, C, TILE, *rest]; each group's rows padded with
    zeros to whole tiles (zero values and zero scales: padded rows weigh nothing)."""
    rows = a.shape[0]
    n = rows // groups
    per_group = a.reshape(groups, n, *a.shape[1:])
    pad = tiles_for(n) * TILE - n
    if pad:
        per_group = np.concatenate([per_group, np.zeros((groups, pad, *a.shape[1:]), a.dtype)], axis=1)
    tiles = per_group.reshape(groups * tiles_for(n), TILE, *a.shape[1:])
    return np.ascontiguousarray(np.swapaxes(tiles, 1, 2))


class TiledRows:
    """What both formats share: rows_per_group rows in each of `groups` groups, stored by tile."""

    rows_per_group: int
    groups: int

    @property
    def tiles_per_group(self) -> int:
        return tiles_for(self.rows_per_group)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}  # fmt: skip

    def to(self, device):
        return dataclasses.replace(self, **{k: t.to(device) for k, t in self._tensors().items()})

    def group(self, e: int):
        """Group e (one expert of a stack) as a one-group view."""
        tiles = slice(e * self.tiles_per_group, (e + 1) * self.tiles_per_group)
        return dataclasses.replace(self, **{k: t[tiles] for k, t in self._tensors().items()}, groups=1)

    def _pick(self, t: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
        """Per-row data of the selected rows from a tiled tensor [tiles, C, TILE, *rest] -> [n, C, *rest]."""
        if isinstance(rows, slice):
            rows = torch.arange(self.groups * self.rows_per_group, device=t.device)[rows]
        group, local = rows // self.rows_per_group, rows % self.rows_per_group
        return t[group * self.tiles_per_group + local // TILE, :, local % TILE]

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as float32 [stop - start, K], bit-identical to GGUF's dequantization."""
        return self.dequantize_index(slice(start, stop))


@dataclass
class Int4Rows(TiledRows):
    """A [rows, K] matrix of 4-bit values with per-32 scale/min bytes and per-256 float16 scales."""

    q: torch.Tensor  # uint8 [tiles, K / 64, TILE, 32]
    sc: torch.Tensor  # uint8 [tiles, K / 32, TILE]
    mn: torch.Tensor  # uint8 [tiles, K / 32, TILE]
    d: torch.Tensor  # float16 [tiles, K / 256, TILE]
    dmin: torch.Tensor  # float16 [tiles, K / 256, TILE]
    rows_per_group: int
    groups: int
    triton: bool = False  # which kernels multiply it, fixed when it is built (the plan's backend)

    @property
    def shape(self) -> tuple[int, int]:
        return self.groups * self.rows_per_group, self.q.shape[1] * 64

    def dequantize_index(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """The rows a slice or an index tensor selects, as float32 [n, K]."""
        q = self._pick(self.q, rows)  # [n, K/64, 32]
        n, chunks, _ = q.shape
        values = torch.stack([q & 15, q >> 4], dim=2).reshape(n, chunks * 2, 32).float()  # [n, K/32, 32]
        d = self._pick(self.d, rows).float().repeat_interleave(8, dim=1)
        dmin = self._pick(self.dmin, rows).float().repeat_interleave(8, dim=1)
        scale = d * self._pick(self.sc, rows).float()
        low = dmin * self._pick(self.mn, rows).float()
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


def repack_q4_k(raw: np.ndarray, in_features: int, groups: int = 1) -> Int4Rows:
    """Q4_K rows (uint8 [rows, row_bytes], e.g. a view of the file map; `groups` stacked
    matrices of equal height) -> Int4Rows on the CPU."""
    if in_features % BLOCK:
        raise ValueError(f"Q4_K rows of {in_features} values: not a multiple of {BLOCK}")
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, in_features // BLOCK, BLOCK_BYTES)
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, mn = _scales_and_mins(blocks[..., 4:16].reshape(-1, 12))
    q = blocks[..., 16:].reshape(rows, in_features // 64, 32)
    tiled = [tile_rows(a, groups) for a in (q, sc.reshape(rows, -1), mn.reshape(rows, -1), d, dmin)]
    return Int4Rows(*(torch.from_numpy(a) for a in tiled), rows // groups, groups)


@dataclass
class Int8Rows(TiledRows):
    """A [rows, K] matrix of 8-bit values, weight = d * q, d * sc * q, or d * sc * q - dmin * mn.

    Q8_0 (d * q), Q5_0 (d * (q - 16)), Q4_0, IQ4_NL: one float16 d per 32 values. Q6_K
    (d * sc * (q - 32)), Q3_K (d * (sc - 32) * q), IQ4_XS: one d per 256 and one int8 sc per 16.
    Q2_K and Q5_K, unsigned codes with a min: also a float16 dmin per 256 and a byte mn per 16
    (Q5_K's scales and mins per 32 are stored twice); Q4_1 and Q5_1 likewise per 32. The values
    are the integers GGUF multiplies and the scales GGUF's own, multiplied in the same float32
    order, so the weights are bit-identical. Memory: 8.5 bits per weight for Q8_0, Q5_0, Q4_0,
    IQ4_NL (against 8.5, 5.5, 4.5, 4.5), 8.56 for Q6_K, Q3_K, IQ4_XS (6.56, 3.44, 4.25), 9.13
    with a min per 16 (Q2_K 2.63, Q5_K 5.5), 10 per 32 (Q4_1 5, Q5_1 6): the price of one byte
    per value, loaded without unpacking.
    """

    q: torch.Tensor  # int8 [tiles, K / 32, TILE, 32]
    d: torch.Tensor  # float16 [tiles, K / d_group, TILE] (float32 for the grid types)
    sc: torch.Tensor | None  # int8 [tiles, K / SC_GROUP, TILE] or None
    mn: torch.Tensor | None  # uint8 [tiles, K / SC_GROUP, TILE] or None
    dmin: torch.Tensor | None  # float16 [tiles, K / d_group, TILE] or None
    d_group: int  # values per d: 256 (with sc) or 32
    rows_per_group: int
    groups: int
    triton: bool = False  # which kernels multiply it, fixed when it is built (the plan's backend)

    SC_GROUP = 16

    def __post_init__(self):
        if self.mn is not None and (self.sc is None or self.dmin is None):  # the kernel reads mins per sc group
            raise ValueError("Int8Rows: a min needs sub-block scales and dmin")

    @property
    def shape(self) -> tuple[int, int]:
        return self.groups * self.rows_per_group, self.q.shape[1] * 32

    def dequantize_index(self, rows: slice | torch.Tensor) -> torch.Tensor:
        q = self._pick(self.q, rows).float()  # [n, K/32, 32]
        n = q.shape[0]
        scale = self._pick(self.d, rows).float()
        group = self.d_group
        if self.sc is not None:
            scale = scale.repeat_interleave(self.d_group // self.SC_GROUP, dim=1) * self._pick(self.sc, rows).float()
            group = self.SC_GROUP
        w = scale[:, :, None] * q.reshape(n, -1, group)
        if self.mn is not None:
            dmin = self._pick(self.dmin, rows).float().repeat_interleave(self.d_group // self.SC_GROUP, dim=1)
            w = w - (dmin * self._pick(self.mn, rows).float())[:, :, None]
        return w.reshape(n, -1)


def _int8_rows(q: np.ndarray, d: np.ndarray, sc: np.ndarray | None, d_group: int, groups: int,
               mn: np.ndarray | None = None, dmin: np.ndarray | None = None) -> Int8Rows:  # fmt: skip
    """Row-major q [rows, K] int8, d [rows, K / d_group], sc (and mn) [rows, K / 16] or None,
    dmin like d or None -> tiled."""
    rows = q.shape[0]
    tq = torch.from_numpy(tile_rows(q.astype(np.int8).reshape(rows, -1, 32), groups))
    tiled = [None if a is None else torch.from_numpy(tile_rows(a, groups)) for a in (d, sc, mn, dmin)]
    return Int8Rows(tq, *tiled, d_group, rows // groups, groups)


def repack_q8_0(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, in_features // 32, 34)
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, in_features)
    return _int8_rows(q, _f16(b[..., 0:2]), None, 32, groups)


def repack_q5_0(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    """Value j of a block: low nibble of byte j (j < 16) or high nibble of byte j - 16, and bit j
    of the 32-bit qh as its fifth bit; minus 16."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, in_features // 32, 22)
    q = _five_bits(b[..., 2:6], b[..., 6:22]).astype(np.int16) - 16
    return _int8_rows(q.reshape(rows, in_features), _f16(b[..., 0:2]), None, 32, groups)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block [..., 16] -> 32 values: low nibbles first, then high."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _five_bits(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32 values per block: the nibbles of qs [..., 16] (low first) and bit j of the
    little-endian u32 qh [..., 4] as value j's fifth bit -> uint8 [..., 32]."""
    word = np.ascontiguousarray(qh).view(np.uint32)  # [..., 1]
    fifth = ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return _low_high(qs) | (fifth << 4)


def repack_q6_k(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
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
    return _int8_rows(q, d, sc, 256, groups)


def _bits(b: np.ndarray, shifts: list[int], width: int) -> np.ndarray:
    """Bytes [..., n] -> [..., len(shifts), n]: the `width`-bit field at each shift."""
    return (b[..., None, :] >> np.array(shifts, np.uint8)[:, None]) & ((1 << width) - 1)


def repack_q3_k(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    """Per 256 values: 32 bytes of high bits (value 32 * j + l takes bit j of hmask[l]; a clear
    bit subtracts 4), 64 bytes of 2-bit pairs (value 128 * h + 32 * j + l: bits 2j of byte
    32 * h + l), 12 bytes of 6-bit scales (low nibbles in bytes 0-7, high pairs in 8-11) minus
    32, one float16 d."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, 110)
    high = _bits(b[..., 0:32], list(range(8)), 1)  # [rows, blocks, 8, 32]
    low = _bits(b[..., 32:96].reshape(rows, -1, 2, 32), [0, 2, 4, 6], 2)  # [rows, blocks, 2, 4, 32]
    q = low.reshape(rows, -1, 8, 32).astype(np.int16) - 4 * (1 - high.astype(np.int16))
    s = b[..., 96:108]
    lo = _bits(s[..., 0:8], [0, 4], 4).reshape(rows, -1, 16)
    hi = _bits(s[..., 8:12], [0, 2, 4, 6], 2).reshape(rows, -1, 16)
    sc = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8)
    return _int8_rows(q.reshape(rows, in_features), _f16(b[..., 108:110]), sc.reshape(rows, -1), 256, groups)


def repack_q2_k(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    """Per 256 values: 16 bytes of scale (low nibble) and min (high nibble) per 16 values, 64
    bytes of 2-bit codes (value 128 * h + 32 * j + l: bits 2j of byte 32 * h + l), float16 d
    and dmin."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, 84)
    q = _bits(b[..., 16:80].reshape(rows, -1, 2, 32), [0, 2, 4, 6], 2)  # [rows, blocks, 2, 4, 32]
    sc, mn = (b[..., 0:16] & 15).reshape(rows, -1), (b[..., 0:16] >> 4).reshape(rows, -1)
    d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])
    return _int8_rows(q.reshape(rows, in_features), d, sc.astype(np.int8), 256, groups, mn, dmin)


def repack_q5_k(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    """Q4_K's float16 d and dmin and packed 6-bit scales and mins per 32, then 32 bytes of fifth
    bits (value 32 * j + l takes bit j of byte l) and 128 bytes of nibbles (value 64 * c + l
    and 64 * c + 32 + l: low and high nibble of byte 32 * c + l)."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, 176)
    fifth = _bits(b[..., 16:48], list(range(8)), 1)  # [rows, blocks, 8, 32]
    nibbles = _bits(b[..., 48:176].reshape(rows, -1, 4, 32), [0, 4], 4)  # [rows, blocks, 4, 2, 32]
    q = nibbles.reshape(rows, -1, 8, 32) | (fifth << 4)
    sc, mn = _scales_and_mins(b[..., 4:16].reshape(-1, 12))  # [rows * blocks, 8] each, per 32
    per16 = [np.repeat(a.reshape(rows, -1), 2, axis=1) for a in (sc, mn)]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return _int8_rows(q.reshape(rows, in_features), d, per16[0].astype(np.int8), 256, groups, per16[1], dmin)


# -- the 32-value types and IQ4_XS -------------------------------------------------------------
# 4- and 5-bit codes widened to a byte: Q4_0 (q - 8) and IQ4_NL (a level of IQ4_LEVELS) take
# Q8_0's layout; Q4_1 and Q5_1 (d * q + m) take the min form with sc = mn = 1 per 16 and
# dmin = -m per 32, so that d * 1 * q - (-m) * 1 is GGUF's d * q + m to the bit; IQ4_XS (d *
# (ls - 32) * level, ls 6 bits per 32) takes Q6_K's.


def repack_q4_0(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, 18)
    q = _low_high(b[..., 2:18]).astype(np.int16) - 8
    return _int8_rows(q.reshape(rows, in_features), _f16(b[..., 0:2]), None, 32, groups)


def repack_iq4_nl(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    from modelfile.quants.legacy import IQ4_LEVELS

    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, 18)
    q = np.asarray(IQ4_LEVELS, np.int8)[_low_high(b[..., 2:18])]
    return _int8_rows(q.reshape(rows, in_features), _f16(b[..., 0:2]), None, 32, groups)


def _with_min32(q: np.ndarray, d: np.ndarray, m: np.ndarray, groups: int) -> Int8Rows:
    """q [rows, K] unsigned, d and m float16 [rows, K / 32]: weight d * q + m."""
    ones = np.ones((q.shape[0], q.shape[1] // 16), np.uint8)
    return _int8_rows(q, d, ones.astype(np.int8), 32, groups, ones, -m)


def repack_q4_1(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, 20)
    q = _low_high(b[..., 4:20])
    return _with_min32(q.reshape(rows, in_features), _f16(b[..., 0:2]), _f16(b[..., 2:4]), groups)


def repack_q5_1(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    """Q4_1 with Q5_0's fifth bits (bit j of the u32 at byte 4 lifts value j by 16)."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, 24)
    q = _five_bits(b[..., 4:8], b[..., 8:24])
    return _with_min32(q.reshape(rows, in_features), _f16(b[..., 0:2]), _f16(b[..., 2:4]), groups)


def repack_iq4_xs(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
    """Per 256 values: float16 d, a u16 of the scales' high 2 bits and 4 bytes of their low
    nibbles (scale j: nibble j of those bytes, bits 2j of the u16, minus 32), then 16 bytes of
    level nibbles per 32 values (low nibbles first)."""
    from modelfile.quants.legacy import IQ4_LEVELS

    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, 136)
    high = np.ascontiguousarray(b[..., 2:4]).view(np.uint16)[..., 0]  # [rows, blocks]
    low = _nibbles(b[..., 4:8].reshape(-1, 4)).reshape(rows, -1, 8)
    top = (high[..., None] >> (2 * np.arange(8, dtype=np.uint16))) & 3
    sc = ((low | (top << 4)).astype(np.int16) - 32).astype(np.int8)  # [rows, blocks, 8] per 32
    q = np.asarray(IQ4_LEVELS, np.int8)[_low_high(b[..., 8:136].reshape(rows, -1, 8, 16))]
    sc16 = np.repeat(sc.reshape(rows, -1), 2, axis=1)
    return _int8_rows(q.reshape(rows, in_features), _f16(b[..., 0:2]), sc16, 256, groups)


# -- grid types (IQ1_S ... IQ3_S) widened to int8 -----------------------------------------------
# Each is d * factor * (2s + 1) * code, with an integer scale s per 16 or 32 values and an
# integer code per value (a grid pattern's value times its sign; for IQ1_S/IQ1_M, 8 times the
# -1/0/1 pattern value plus or minus its 1/8 shift). Stored as Q6_K's int8 layout: the code, the
# scale 2s + 1 per 16, and d * factor per 256 in float32 (d / 8 could fall below float16's
# normal range). d * factor is exact (a power of two) and (d * factor) * (2s + 1) is the one
# rounding GGUF's d * (s + 1/2) * factor makes, so the weights stay bit-identical.
_GRID = {  # type -> (bytes per block, factor)
    QType.IQ2_XXS: (66, 0.125), QType.IQ2_XS: (74, 0.125), QType.IQ2_S: (82, 0.125),
    QType.IQ3_XXS: (98, 0.25), QType.IQ3_S: (110, 1.0), QType.IQ1_S: (50, 0.125), QType.IQ1_M: (56, 0.125),
}  # fmt: skip


def _nibbles(b: np.ndarray) -> np.ndarray:
    """Bytes [B, k] -> [B, 2k]: low then high nibble of each byte."""
    return np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], -1)


def _grid_scales(qtype: QType, blocks: np.ndarray) -> np.ndarray:
    """The integer 2s + 1 of every 16 values of each block [B, bytes] -> [B, 16]."""
    if qtype in (QType.IQ2_XXS, QType.IQ3_XXS):  # the top 4 bits of the second (IQ3_XXS: only) word per 32
        at, stop = (2, 66) if qtype == QType.IQ2_XXS else (66, 98)
        words = np.ascontiguousarray(blocks[:, at:stop]).view(np.uint32)
        words = words[:, 1::2] if qtype == QType.IQ2_XXS else words
        s = np.repeat(words >> 28, 2, axis=1)
    elif qtype in (QType.IQ2_XS, QType.IQ2_S):
        s = _nibbles(blocks[:, 66:74] if qtype == QType.IQ2_XS else blocks[:, 74:82])
    elif qtype == QType.IQ3_S:
        s = np.repeat(_nibbles(blocks[:, 106:110]), 2, axis=1)
    elif qtype == QType.IQ1_S:
        s = np.repeat((np.ascontiguousarray(blocks[:, 34:50]).view(np.uint16) >> 12) & 7, 2, axis=1)
    else:  # IQ1_M: four words, four 3-bit scales in the low 12 bits of each
        words = np.ascontiguousarray(blocks[:, 48:56]).view(np.uint16)
        s = ((words[:, :, None] >> np.array([0, 3, 6, 9], np.uint16)) & 7).reshape(-1, 16)
    return (2 * s.astype(np.int32) + 1).astype(np.int8)


def repack_grid(qtype: QType):
    """The repack of one grid type: rows (uint8 [rows, row_bytes]) -> Int8Rows."""
    from modelfile.quants.iquants import iq1_m_scale
    from modelfile.quants.types import QUANT_TYPES, with_scales

    size, factor = _GRID[qtype]

    def repack(raw: np.ndarray, in_features: int, groups: int = 1) -> Int8Rows:
        rows = raw.shape[0]
        blocks = np.ascontiguousarray(raw).reshape(-1, size)
        if qtype == QType.IQ1_M:
            d = iq1_m_scale(torch.from_numpy(blocks)).numpy().astype(np.uint16).view(np.float16)
        else:
            d = np.ascontiguousarray(blocks[:, 0:2]).view(np.float16)[:, 0]
        unit = with_scales(qtype, blocks.copy(), np.ones)  # d = 1: the values are factor * (2s + 1) * code
        values = QUANT_TYPES[qtype].dequantize(torch.from_numpy(unit)).numpy().reshape(-1, 16, 16)
        sc = _grid_scales(qtype, blocks)
        q = np.rint(values / (factor * sc[:, :, None].astype(np.float32))).astype(np.int8)
        scale = (d.astype(np.float32) * np.float32(factor)).reshape(rows, -1)
        return _int8_rows(q.reshape(rows, in_features), scale, sc.reshape(rows, -1), 256, groups)

    return repack


repack_iq2_xxs, repack_iq2_xs, repack_iq2_s = (repack_grid(t) for t in (QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S))
repack_iq3_xxs, repack_iq3_s = repack_grid(QType.IQ3_XXS), repack_grid(QType.IQ3_S)
repack_iq1_s, repack_iq1_m = repack_grid(QType.IQ1_S), repack_grid(QType.IQ1_M)
