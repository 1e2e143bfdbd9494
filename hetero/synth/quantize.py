"""GGUF block quantization in numpy, so synthetic models need no llama.cpp.

A synthetic model's weights are random, so what matters is that its blocks are valid GGUF (any
reader dequantizes them to what the writer meant) and that each tensor gets the type a real file
of that mix would give it. The rounding here is plain round-to-nearest with per-block min/max
scales, not llama.cpp's search for the best scales: the error is a little larger, the format the
same. `tensor_type` follows the shape of llama.cpp's choices for a file type: the mix's base type,
the output head and some layers' down projections a step up, and a legacy type for rows that are
not a whole number of 256-value super-blocks.
"""

import re

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from modelfile.errors import HeteroError

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
# A K-quant needs rows of whole 256-value super-blocks; otherwise a 32-value legacy type stands in.
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.")


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, n_layer: int, n_expert: int) -> T:
    """The GGUF type of one tensor in a file of type `ftype` (F32 for vectors and the router)."""
    if len(shape) == 1 or name.endswith(("ffn_gate_inp.weight", "exp_probs_b.bias")):
        return T.F32
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
    raise HeteroError(f"hetero's quantizer does not write {qtype.name}")


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
