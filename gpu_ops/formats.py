"""GGUF blocks rearranged for the GPU, losslessly: the same numbers, in a layout made for loads.

Q4_K keeps each 256 values in one 144-byte block: two float16 super-scales, twelve bytes of
packed 6-bit sub-block scales and mins, then 128 bytes of 4-bit values. A GPU kernel wants the
4-bit values of a row contiguous (wide, coalesced loads along K) and the scales in arrays of
their own that it can index without unpacking bit fields. `Int4Rows` is that: the values keep
GGUF's order inside each 64-value chunk (byte b holds value b in its low nibble and value
32 + b in its high one), scales and mins become one byte each per 32 values, and the two
super-scales float32 per 256. Dequantization is then d * sc * q - dmin * m, in the same order
of float32 operations as GGUF's own, so the weights are bit-identical (tested). Memory: 4.75
bits per weight against Q4_K's 4.5.
"""

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

BLOCK, BLOCK_BYTES = GGML_QUANT_SIZES[QType.Q4_K]  # 256 values, 144 bytes


@dataclass
class Int4Rows:
    """A [rows, K] matrix of 4-bit values with per-32 scale/min bytes and per-256 float scales."""

    q: torch.Tensor  # uint8 [rows, K / 2]
    sc: torch.Tensor  # uint8 [rows, K / 32]
    mn: torch.Tensor  # uint8 [rows, K / 32]
    d: torch.Tensor  # float32 [rows, K / 256]
    dmin: torch.Tensor  # float32 [rows, K / 256]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * 2

    def to(self, device) -> "Int4Rows":
        return Int4Rows(*(t.to(device) for t in (self.q, self.sc, self.mn, self.d, self.dmin)))

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as float32 [stop - start, K], bit-identical to GGUF's dequantization."""
        q = self.q[start:stop]
        n, half = q.shape
        values = torch.stack([q & 15, q >> 4], dim=1)  # [n, 2, K/2]: low nibbles, then high
        values = values.view(n, 2, half // 32, 32).transpose(1, 2).reshape(n, -1, 32).float()  # [n, K/32, 32]
        d = self.d[start:stop].repeat_interleave(8, dim=1)
        dmin = self.dmin[start:stop].repeat_interleave(8, dim=1)
        scale = d * self.sc[start:stop].float()
        low = dmin * self.mn[start:stop].float()
        return (scale[..., None] * values - low[..., None]).reshape(n, -1)


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
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, mn = _scales_and_mins(blocks[..., 4:16].reshape(-1, 12))
    q = np.ascontiguousarray(blocks[..., 16:]).reshape(rows, in_features // 2)
    return Int4Rows(
        q=torch.from_numpy(q),  # a fresh array: ascontiguousarray of a strided slice copies
        sc=torch.from_numpy(sc.reshape(rows, -1)),
        mn=torch.from_numpy(mn.reshape(rows, -1)),
        d=torch.from_numpy(d),
        dmin=torch.from_numpy(dmin),
    )
