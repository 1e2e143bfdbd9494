"""The 32-value block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL.

Every function takes `blocks`, a uint8 tensor [N, type_size] of whole blocks, and returns
float32 [N, 32]. Nibble order within a block (all 4-bit formats here):

    byte j (0..15):  high nibble -> value j+16 | low nibble -> value j
"""

import torch

# The 16 non-uniform levels of IQ4_NL and IQ4_XS (ggml's kvalues_iq4nl).
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def f16(raw: torch.Tensor) -> torch.Tensor:
    """[N, 2k] uint8 little-endian halves -> [N, k] float32."""
    return raw.contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[N, 16] packed bytes -> [N, 32] values 0..15 in block order (low nibbles first)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[N, 4] bytes of a little-endian uint32 -> [N, 32] bits, bit j for value j."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def q4_0(blocks):
    d = f16(blocks[:, :2])
    return d * (nibbles(blocks[:, 2:]).float() - 8)


def q4_1(blocks):
    d, m = f16(blocks[:, :2]), f16(blocks[:, 2:4])
    return d * nibbles(blocks[:, 4:]).float() + m


def q5_0(blocks):
    d = f16(blocks[:, :2])
    q = nibbles(blocks[:, 6:]) | (high_bits(blocks[:, 2:6]) << 4)
    return d * (q.float() - 16)


def q5_1(blocks):
    d, m = f16(blocks[:, :2]), f16(blocks[:, 2:4])
    q = nibbles(blocks[:, 8:]) | (high_bits(blocks[:, 4:8]) << 4)
    return d * q.float() + m


def q8_0(blocks):
    d = f16(blocks[:, :2])
    return d * blocks[:, 2:].contiguous().view(torch.int8).float()


def iq4_nl(blocks):
    d = f16(blocks[:, :2])
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=blocks.device)
    return d * levels[nibbles(blocks[:, 2:]).long()]
