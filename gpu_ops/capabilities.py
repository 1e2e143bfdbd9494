"""What the GPU path runs, and at what size, read from the quant types' declarations without
torch: the planner reads this to budget VRAM and name each GPU tensor's backend;
gpu_ops.matmul repacks exactly these types.

A GGUF type with a GPU format is repacked losslessly at load into tiles of TILE rows (each
matrix of a stack padded to whole tiles; gpu_ops/formats.py): Q4_K as int4 (4 bits, a byte of
scale and one of min per 32 values, two float16 per 256: 148 bytes per 32 x 8), Q6_K, Q3_K
and IQ4_XS as int8 with an int8 scale per 16 and a float16 per 256 (274), Q5_K and Q2_K
likewise plus a byte of min per 16 and a float16 dmin per 256 (292), the grid types as int8
with a float32 per 256 (276), Q8_0, Q5_0, Q4_0 and IQ4_NL as int8 with a float16 per 32 (272),
Q4_1 and Q5_1 with a min per 32 (320); the sizes come from the types' declarations. Float
weights run as they are in torch. A tensor whose rows are not whole blocks of its type's GPU
format keeps its GGUF bytes there and is dequantized on every call (the reference path).
"""

import math

from gguf import GGMLQuantizationType as QType

from modelfile.quants.types import freeze

TILE = 64  # rows per tile: the Triton kernels' BLOCK_N
_TYPES = freeze("gpu_ops")
# type -> (format, values per block the repack walks, bits per 32 values after repacking), from
# each type's declaration (modelfile/quants/types.py)
GPU_FORMATS = {qt: (t.gpu.name, t.gpu.values, t.gpu.bits_per_32) for qt, t in _TYPES.items() if t.gpu is not None}
FLOATS = {QType.F32: ("f32", 4), QType.F16: ("f16", 2), QType.BF16: ("bf16", 2)}


def has_gpu_format(qtype: QType, in_features: int) -> bool:
    entry = GPU_FORMATS.get(qtype)
    return entry is not None and in_features % entry[1] == 0


def gpu_bytes(qtype: QType, shape: tuple[int, ...]) -> tuple[str, int] | None:
    """(format, bytes on the GPU) of a tensor of this type and (numpy) shape in its GPU format or
    as a float; None when it has neither (it would run on the reference path)."""
    if len(shape) >= 2 and has_gpu_format(qtype, shape[-1]):
        fmt, _, bits = GPU_FORMATS[qtype]
        rows = -(-shape[-2] // TILE) * TILE
        return fmt, math.prod(shape[:-2]) * rows * shape[-1] // 32 * bits // 8
    if qtype in FLOATS:
        fmt, size = FLOATS[qtype]
        return fmt, math.prod(shape) * size
    return None
