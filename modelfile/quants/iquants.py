"""The grid ("importance") formats of 256-value super-blocks: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS,
IQ2_S, IQ3_XXS and IQ3_S.

Instead of storing each value's bits, these store an index into a fixed table (the grid) of 8-
or 4-value patterns, plus signs and a small scale per 16 or 32 values; the grids are part of
the format, and gguf-py carries them (read from it here, once). Each function maps uint8
blocks [N, type_size] to float32 [N, 256], multiplying in the order gguf's numpy reference
does, so the results are bit-identical:

- IQ2_XXS (66 bytes): f16 d, then per 32 values a u32 of four 8-bit grid indices (8 values
  each) and a u32 holding four 7-bit sign indices (into the 128 even-parity sign bytes) and
  a 4-bit scale: d * (0.5 + s) * 0.25 * grid * sign.
- IQ2_XS (74): f16 d, 32 u16 (9-bit index into 512 patterns, 7-bit sign index), 16 4-bit
  scales (one per 16 values), the same scale rule.
- IQ2_S (82): f16 d, 32 low index bytes, 32 sign bytes (one bit a value), 8 bytes of 2-bit
  index tops (1024 patterns), 16 4-bit scales.
- IQ3_XXS (98): f16 d, 64 index bytes (4-value patterns of 256), then per 32 values a u32 of
  four 7-bit sign indices and a 4-bit scale: d * (0.5 + s) * 0.5.
- IQ3_S (110): f16 d, 64 low index bytes, 8 bytes of index tops (512 patterns of 4), 32 sign
  bytes, 8 4-bit scales (per 32): d * (1 + 2 s).
- IQ1_S (50): f16 d, 32 low index bytes, then per 32 values a u16: 3 index tops for each of
  its four 8-value patterns (2048 patterns of -1/0/1), a 3-bit scale and the sign of a
  shift: d * (2 s + 1) * (grid +- 0.125).
- IQ1_M (56): 32 low index bytes, 16 bytes of (3 index-top bits, shift sign) per pattern,
  then four u16 whose low 12 bits are 3-bit scales (per 16 values) and whose top nibbles
  together are the float16 d.
"""

import functools

import gguf.quants as gq
import torch

from modelfile.quants.legacy import f16

IQ1_DELTA = 0.125  # the shift IQ1_S/IQ1_M add to (or take from) every grid value


@functools.cache
def _patterns(name: str):
    """The format's pattern table from gguf-py, numpy float32 [patterns, 8 or 4]."""
    cls = getattr(gq, name)
    cls.init_grid()
    return cls.grid.reshape(cls.grid_shape)


# each grid as the CPU kernels read it: a pattern's values as int8 bytes, row after row
GRID_BYTES = {name: _patterns(name).astype("int8").tobytes() for name in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                                                                         "IQ3_S", "IQ1_S")}  # fmt: skip
SIGN_BYTES = bytes(gq.IQ2_XXS.ksigns)  # the 128 even-parity sign bytes a 7-bit index selects
# the same as rows of eight +1/-1 bytes (bit j of sign byte i -> byte j of row i), for vpsignb
SIGN_ROWS = bytes((0xFF if (s >> j) & 1 else 1) for s in SIGN_BYTES for j in range(8))
# every sign byte (IQ2_S/IQ3_S store them whole) as its row of +1/-1 bytes
BIT_SIGN_ROWS = bytes((0xFF if (s >> j) & 1 else 1) for s in range(256) for j in range(8))


@functools.cache
def _grid(name: str, device: torch.device) -> torch.Tensor:
    """The format's pattern table float32 [patterns, 8 or 4], on device."""
    return torch.from_numpy(_patterns(name).copy()).to(device)


@functools.cache
def _sign_bytes(device: torch.device) -> torch.Tensor:
    """The 128 sign bytes a 7-bit sign index selects (bit 7 makes the parity even)."""
    return torch.frombuffer(bytearray(SIGN_BYTES), dtype=torch.uint8).to(device)


def _bits(x: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """x [..., L] (integers) -> [..., L, len(shifts)]: (x >> s) & mask for each shift."""
    s = torch.tensor(shifts, dtype=x.dtype, device=x.device)
    return (x.unsqueeze(-1) >> s) & mask


def _signs(sign_bytes: torch.Tensor) -> torch.Tensor:
    """Bytes [...] -> float32 [..., 8]: -1 where bit i is set, else 1."""
    return 1.0 - 2.0 * _bits(sign_bytes.long(), tuple(range(8)), 1).float()


def _u16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian byte pairs [..., 2k] -> int64 [..., k]."""
    b = b.long()
    return b[..., 0::2] | (b[..., 1::2] << 8)


def _u32(b: torch.Tensor) -> torch.Tensor:
    """Little-endian byte quads [..., 4k] -> int64 [..., k]."""
    w = _u16(b)
    return w[..., 0::2] | (w[..., 1::2] << 16)


def _scale_nibbles(b: torch.Tensor) -> torch.Tensor:
    """Bytes [N, k] -> float32 [N, 2k]: low nibble, then high nibble, of each byte."""
    return _bits(b.long(), (0, 4), 0x0F).reshape(b.shape[0], -1).float()


def iq2_xxs(blocks):
    n = blocks.shape[0]
    d = f16(blocks[:, 0:2]).view(n, 1)
    words = _u32(blocks[:, 2:66]).view(n, 8, 2)  # per 32 values: grid indices, signs + scale
    db = d * (0.5 + (words[..., 1] >> 28).float()) * 0.25  # [N, 8]
    index = _bits(words[..., 0], (0, 8, 16, 24), 0xFF)  # [N, 8, 4]
    signs = _signs(_sign_bytes(blocks.device)[_bits(words[..., 1], (0, 7, 14, 21), 0x7F)])  # [N, 8, 4, 8]
    grid = _grid("IQ2_XXS", blocks.device)[index]  # [N, 8, 4, 8]
    return (db.view(n, 8, 1, 1) * grid * signs).reshape(n, 256)


def iq2_xs(blocks):
    n = blocks.shape[0]
    d = f16(blocks[:, 0:2]).view(n, 1)
    qs = _u16(blocks[:, 2:66])  # [N, 32]: 9-bit index, 7-bit sign index
    db = d * (0.5 + _scale_nibbles(blocks[:, 66:74])) * 0.25  # [N, 16], one per 16 values
    signs = _signs(_sign_bytes(blocks.device)[qs >> 9])  # [N, 32, 8]
    grid = _grid("IQ2_XS", blocks.device)[qs & 511]  # [N, 32, 8]
    return (db.view(n, 16, 1, 1) * grid.view(n, 16, 2, 8) * signs.view(n, 16, 2, 8)).reshape(n, 256)


def iq2_s(blocks):
    n = blocks.shape[0]
    d = f16(blocks[:, 0:2]).view(n, 1)
    low, sign_bytes, tops = blocks[:, 2:34].long(), blocks[:, 34:66], blocks[:, 66:74].long()
    index = low | (_bits(tops, (0, 2, 4, 6), 3).reshape(n, 32) << 8)  # [N, 32] of 1024
    db = d * (0.5 + _scale_nibbles(blocks[:, 74:82])) * 0.25  # [N, 16]
    grid = _grid("IQ2_S", blocks.device)[index]  # [N, 32, 8]
    return (db.view(n, 16, 1, 1) * grid.view(n, 16, 2, 8) * _signs(sign_bytes).view(n, 16, 2, 8)).reshape(n, 256)


def iq3_xxs(blocks):
    n = blocks.shape[0]
    d = f16(blocks[:, 0:2]).view(n, 1)
    index = blocks[:, 2:66].long()  # [N, 64], 4 values each
    words = _u32(blocks[:, 66:98])  # [N, 8]: per 32 values, four sign indices and a scale
    db = d * (0.5 + (words >> 28).float()) * 0.5
    signs = _signs(_sign_bytes(blocks.device)[_bits(words, (0, 7, 14, 21), 0x7F)])  # [N, 8, 4, 8]
    grid = _grid("IQ3_XXS", blocks.device)[index].view(n, 8, 4, 8)
    return (db.view(n, 8, 1, 1) * grid * signs).reshape(n, 256)


def iq3_s(blocks):
    n = blocks.shape[0]
    d = f16(blocks[:, 0:2]).view(n, 1)
    low, tops = blocks[:, 2:66].long(), blocks[:, 66:74].long()
    index = low | (_bits(tops, tuple(range(8)), 1).reshape(n, 64) << 8)  # [N, 64] of 512
    sign_bytes = blocks[:, 74:106]
    db = d * (1 + 2 * _scale_nibbles(blocks[:, 106:110]))  # [N, 8], one per 32 values
    grid = _grid("IQ3_S", blocks.device)[index].view(n, 8, 4, 8)
    return (db.view(n, 8, 1, 1) * grid * _signs(sign_bytes).view(n, 8, 4, 8)).reshape(n, 256)


def iq1_s(blocks):
    n = blocks.shape[0]
    d = f16(blocks[:, 0:2]).view(n, 1)
    low, high = blocks[:, 2:34].long(), _u16(blocks[:, 34:50])  # [N, 32], [N, 8]
    dl = d * (2 * ((high >> 12) & 7) + 1).float()  # [N, 8], one per 32 values
    delta = torch.where((high & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA)  # [N, 8]
    index = low | (_bits(high, (0, 3, 6, 9), 7).reshape(n, 32) << 8)
    grid = _grid("IQ1_S", blocks.device)[index].view(n, 8, 4, 8)
    return (dl.view(n, 8, 1, 1) * (grid + delta.view(n, 8, 1, 1))).reshape(n, 256)


def iq1_m_scale(blocks: torch.Tensor) -> torch.Tensor:
    """IQ1_M's float16 d, as a uint16 [N] assembled from the top nibbles of its four scale words."""
    words = _u16(blocks[:, 48:56])  # [N, 4]
    return (words[:, 0] >> 12) | ((words[:, 1] >> 8) & 0x00F0) | ((words[:, 2] >> 4) & 0x0F00) | (words[:, 3] & 0xF000)


def put_iq1_m_scale(raw, halves) -> None:
    """Write float16 d values (numpy float16 [N]) into IQ1_M blocks (numpy uint8 [N, 56]): one
    nibble into the top of each of the four scale words."""
    bits = halves.view("uint16")
    for i in range(4):  # the high byte of word i is byte 49 + 2i; its top nibble holds d's nibble i
        raw[:, 49 + 2 * i] = (raw[:, 49 + 2 * i] & 0x0F) | (((bits >> (4 * i)) & 0xF) << 4).astype("uint8")


def iq1_m(blocks):
    n = blocks.shape[0]
    u = iq1_m_scale(blocks)
    bits = torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16)  # the same 16 bits, signed
    d = bits.view(torch.float16).float().view(n, 1)
    low, high = blocks[:, 0:32].long(), blocks[:, 32:48].long()
    scales = _bits(_u16(blocks[:, 48:56]), (0, 3, 6, 9), 7).reshape(n, 16)  # one per 16 values
    dl = d * (2 * scales + 1).float()
    nibbles = _bits(high, (0, 4), 0x0F).reshape(n, 32)  # one per 8-value pattern
    index = low | ((nibbles & 7) << 8)
    delta = torch.where((nibbles & 8) == 0, IQ1_DELTA, -IQ1_DELTA)  # [N, 32]
    grid = _grid("IQ1_S", blocks.device)[index]  # [N, 32, 8]: IQ1_M shares IQ1_S's patterns
    return (dl.view(n, 16, 1, 1) * (grid.view(n, 16, 2, 8) + delta.view(n, 16, 2, 1))).reshape(n, 256)
