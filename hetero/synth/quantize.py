"""GGUF block quantization in numpy, so synthetic models need no llama.cpp.

A synthetic model's weights are random, so what matters is that its blocks are valid GGUF (any
reader dequantizes them to what the writer meant) and that each tensor gets the type a real file
of that mix would give it. The rounding here is plain round-to-nearest with per-block min/max
scales, not llama.cpp's search for the best scales: the error is a little larger, the format the
same. `tensor_type` follows the shape of llama.cpp's choices for a file type: the mix's base type,
the output head and some layers' down projections a step up, and a legacy type for rows that are
not a whole number of 256-value super-blocks.

Types with no rounding here (the grid types IQ1_S...IQ3_S, Q2_K, Q3_K, IQ4_NL...) are written
as random blocks: every bit pattern of those layouts is a valid block, so random bytes with
float16 factors scaled to the tensor's root mean square are random weights of the right size
(llama.cpp's quantizer refuses most grid types without an importance matrix anyway).

Expert mixes put the routed experts in one type (their down projections in another) over a
dense mix, as the low-bit releases people run do: `Q4_K_M+IQ2_XS`, `Q4_K_M+IQ1_S/IQ2_XXS`, or a
release's name (EXPERT_MIXES: Unsloth's UD-IQ1_S, UD-IQ1_M, UD-IQ2_XXS and UD-Q2_K_XL).
"""

import functools
import re
import zlib

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from modelfile.errors import HeteroError
from modelfile.quants import QUANT_TYPES, dequantize
from modelfile.quants.types import with_scales

QK_K = 256
F16_MAX = 65504.0

# file type -> (base type, type of the output head and of the "more bits" down projections)
MIXES = {
    "Q8_0": (T.Q8_0, T.Q8_0),
    "Q4_0": (T.Q4_0, T.Q6_K),
    "Q5_0": (T.Q5_0, T.Q6_K),
    "Q4_K_S": (T.Q4_K, T.Q6_K),
    "Q4_K_M": (T.Q4_K, T.Q6_K),
    "Q5_K_S": (T.Q5_K, T.Q6_K),
    "Q5_K_M": (T.Q5_K, T.Q6_K),
    "Q6_K": (T.Q6_K, T.Q6_K),
    "BF16": (T.BF16, T.BF16),
}
# Releases whose routed experts are low-bit: (experts' gate and up, their down projections), over
# a Q4_K_M-style dense part (Unsloth's dynamic mixes of DeepSeek-R1/V3 and Kimi-K2 on their
# model cards: 131, 158, 183 and 212 GB for R1).
EXPERT_MIXES = {
    "UD-IQ1_S": "Q4_K_M+IQ1_S/IQ2_XXS",
    "UD-IQ1_M": "Q4_K_M+IQ1_M/IQ2_XXS",
    "UD-IQ2_XXS": "Q4_K_M+IQ2_XXS/IQ3_XXS",
    "UD-Q2_K_XL": "Q4_K_M+Q2_K/Q3_K",
}
# A 256-value type needs rows of whole super-blocks; otherwise a 32-value type stands in (llama.cpp's
# choices: the grid types and Q2_K/Q3_K take IQ4_NL).
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_FALLBACK.update(dict.fromkeys((T.Q2_K, T.Q3_K, T.IQ4_XS, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S,
                                T.IQ3_XXS, T.IQ3_S), T.IQ4_NL))  # fmt: skip
_LAYER = re.compile(r"blk\.(\d+)\.")


def expert_mix(ftype: str) -> tuple[str, T, T] | None:
    """'DENSE+EXPERTS[/DOWN]' (or a release's name) -> (dense mix, experts' type, down type); None
    for a plain mix; a HeteroError for a malformed one."""
    ftype = EXPERT_MIXES.get(ftype.upper(), ftype)
    if "+" not in ftype:
        return None
    dense, _, experts = ftype.partition("+")
    gate, _, down = experts.partition("/")
    try:
        types = T[gate.upper()], T[(down or gate).upper()]
    except KeyError:
        raise HeteroError(f"unknown expert type in {ftype!r}: write e.g. Q4_K_M+IQ1_S/IQ2_XXS") from None
    if dense.upper() not in MIXES or any(t not in QUANT_TYPES for t in types):
        raise HeteroError(f"{ftype!r}: the dense mix must be one of {', '.join(MIXES)} and the experts' types "
                          "ones hetero reads")  # fmt: skip
    return dense.upper(), *types


def is_quant(ftype: str) -> bool:
    """Whether hetero's quantizer writes this file type (a plain mix or an expert mix)."""
    try:
        return ftype in MIXES or expert_mix(ftype) is not None
    except HeteroError:
        return False


def expert_type(name: str, shape: tuple[int, ...], mix: tuple[str, T, T]) -> T:
    """A routed-expert tensor's type in an expert mix (expert_mix's triple): the down projections'
    type or the gate/up one, a 32-value stand-in for rows that are not whole blocks."""
    qtype = mix[2] if "ffn_down" in name else mix[1]
    return _FALLBACK[qtype] if qtype in _FALLBACK and shape[-1] % QK_K else qtype


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, n_layer: int, n_expert: int) -> T:
    """The GGUF type of one tensor in a file of type `ftype` (F32 for vectors and the router)."""
    if len(shape) == 1 or name.endswith(("ffn_gate_inp.weight", "exp_probs_b.bias")):
        return T.F32
    mix = expert_mix(ftype)
    if mix is not None and "_exps." in name:
        return expert_type(name, shape, mix)
    if mix is not None:
        ftype = mix[0]
    base, high = MIXES[ftype]
    qtype = base
    layer = int(_LAYER.match(name).group(1)) if _LAYER.match(name) else -1
    if name == "output.weight":
        qtype = high
    elif "ffn_down" in name and ftype.endswith("_M") and _more_bits(layer, n_layer):
        qtype = high
    elif "ffn_down" in name and ftype == "Q4_K_S" and layer < n_layer // 8:
        qtype = T.Q5_K
    elif "attn_output" in name and n_expert == 8 and ftype in ("Q4_K_S", "Q4_K_M"):
        qtype = T.Q5_K  # llama.cpp's rule for eight-expert models
    if qtype in _FALLBACK and shape[-1] % QK_K:
        qtype = _FALLBACK[qtype]
    return qtype


def _more_bits(layer: int, n_layer: int) -> bool:
    """The first and last eighth of the layers, and every third in between (llama.cpp's rule)."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def quantize(values: np.ndarray, qtype: T) -> np.ndarray:
    """float32 [..., K] -> uint8 [..., bytes per row] in GGUF's block layout for `qtype`."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    encoders = {T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}
    if qtype in encoders:
        if values.shape[-1] % QK_K:
            raise HeteroError(f"{qtype.name} needs rows of a multiple of {QK_K} values, got {values.shape[-1]}")
        blocks = encoders[qtype](values.reshape(-1, QK_K))
        return blocks.reshape(*values.shape[:-1], -1)
    if qtype in (T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.BF16):
        return gguf_quants.quantize(values, qtype)
    if qtype in QUANT_TYPES:
        return random_blocks_like(values, qtype)
    raise HeteroError(f"hetero's quantizer does not write {qtype.name}")


@functools.cache
def _unit_rms(qtype: T) -> float:
    """Root mean square of random blocks of this type whose float16 factors are all 1."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, (256, size), dtype=np.uint8)
    values = dequantize(torch.from_numpy(with_scales(qtype, raw, lambda n: np.ones(n))), qtype, block).numpy()
    return float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))


def random_blocks_like(values: np.ndarray, qtype: T) -> np.ndarray:
    """Random blocks of qtype, as many as values [..., K] needs, whose values have about their
    root mean square (the same bytes for the same values: the draw is seeded by them)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if values.shape[-1] % block:
        raise HeteroError(f"{qtype.name} needs rows of a multiple of {block} values, got {values.shape[-1]}")
    n_blocks = values.size // block
    rng = np.random.default_rng(zlib.crc32(values.tobytes()[: 1 << 16]))
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scale = np.sqrt(np.mean(values.astype(np.float64) ** 2)) / _unit_rms(qtype)
    with_scales(qtype, raw, lambda n: scale * (0.75 + 0.5 * rng.random(n)))
    return raw.reshape(*values.shape[:-1], -1)


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 as stored (clipped to its range), back to float32 for the arithmetic."""
    return np.clip(x, -F16_MAX, F16_MAX).astype(np.float16).astype(np.float32)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, and 0 where b is 0 (an all-zero sub-block)."""
    safe = np.where(b == 0, 1, b)
    return np.where(b == 0, 0, a / safe)


def _scales_and_codes(x: np.ndarray, n_max: int):
    """K-quant with mins over [n, 8, 32] values: value = d*sc*q - dmin*m, sc and m in 6 bits.
    Returns (d, dmin as float16 [n], sc, m as uint8 [n, 8], q as uint8 [n, 8, 32])."""
    lo = np.minimum(x.min(axis=-1), 0)  # [n, 8]
    step = (x.max(axis=-1) - lo) / n_max
    d, dmin = _f16(step.max(axis=-1) / 63), _f16((-lo).max(axis=-1) / 63)
    sc = np.clip(np.rint(_div(step, d[:, None])), 0, 63)
    m = np.clip(np.rint(_div(-lo, dmin[:, None])), 0, 63)
    q = np.clip(np.rint(_div(x + (dmin[:, None] * m)[..., None], (d[:, None] * sc)[..., None])), 0, n_max)
    return d.astype(np.float16), dmin.astype(np.float16), sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> 12 bytes: bytes 0-3 and 4-7 hold sub-blocks 0-3 in their low
    6 bits and the top 2 bits of sub-blocks 4-7; bytes 8-11 hold the low 4 bits of sub-blocks 4-7."""
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _q4_k(x: np.ndarray) -> np.ndarray:
    """[n, 256] -> [n, 144]: d, dmin, 12 scale bytes, then per 64 values 32 bytes whose low
    nibbles are the first 32 values and high nibbles the next 32."""
    d, dmin, sc, m, q = _scales_and_codes(x.reshape(-1, 8, 32), 15)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    return np.concatenate([_halves(d, dmin), _pack_scales(sc, m), qs.reshape(-1, 128)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    """[n, 256] -> [n, 176]: as Q4_K, plus 32 bytes whose bit j is the fifth bit of sub-block j."""
    d, dmin, sc, m, q = _scales_and_codes(x.reshape(-1, 8, 32), 31)
    low = q & 15
    pairs = low.reshape(-1, 4, 2, 32)
    qs = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    qh = np.zeros((len(q), 32), np.uint8)
    for j in range(8):
        qh |= (q[:, j] >> 4) << j
    return np.concatenate([_halves(d, dmin), _pack_scales(sc, m), qh, qs.reshape(-1, 128)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """[n, 256] -> [n, 210]: value = d * sc[16 values] * (q - 32), q in 6 bits, sc int8.
    Per 128 values: 64 bytes of low nibbles (values 0-31 | 64-95, 32-63 | 96-127), 32 bytes of
    the top 2 bits of four values each; then 16 scales and d."""
    sub = x.reshape(-1, 16, 16)
    step = np.abs(sub).max(axis=-1) / 31  # [n, 16]
    d = _f16(step.max(axis=-1) / 127)
    sc = np.clip(np.rint(_div(step, d[:, None])), -128, 127)
    q = (np.clip(np.rint(_div(sub, (d[:, None] * sc)[..., None])), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # [n, half, group of 32, l]
    low, high = q & 15, q >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), _halves(d.astype(np.float16))],
        axis=1,
    )


def _halves(*columns: np.ndarray) -> np.ndarray:
    """float16 columns [n] -> their bytes [n, 2 * len(columns)]."""
    return np.stack([c.astype(np.float16) for c in columns], axis=1).view(np.uint8)
