"""Every GGUF block type hetero reads, declared once: layout, reference, CPU kernel, GPU format.

A declaration names everything the layers above need of a type, so adding one touches only its
entry here (and the code the entry points to):

- layout and size: gguf's table (values and bytes per block), which the file reader and the
  planner use;
- `dequantize`: the reference, torch over whole blocks, bit-exact with gguf's numpy version;
  it runs any type on any device (slowly) and is what the kernels are tested against;
- `reference_speed`: which family of the reference path's measured speed the planner assumes
  (cpu_ops.capabilities);
- `engine`: the CPU engine's block body (cpu_ops/blocks.py's signature), or None: the type
  then runs on the reference path on the CPU;
- `activations`: the block format llama.cpp's CPU backend rounds the activations to before a
  dot product with this type (its `vec_dot_type`), which the engine's kernels reproduce
  (cpu_ops/activations.py): Q8_K for 256-value blocks, Q8_0 for 32-value ones, unless named
  (Q8_1; float types name their own float format);
- `gpu`: the lossless GPU format it is repacked into (gpu_ops/formats.py), or None;
- where its float16 factors sit (`f16_fields`, or `put_scale` where d is packed across
  bytes): any bit pattern is a valid block of these layouts, so random bytes with sane
  factors are random weights (tests, benchmarks and `hetero synth` make them so).

Kernel code lives with its package, so `engine` and the repack are named "module:function"
and resolved by that package (a callable works too: tests declare toy types that way). The
kernel packages read this table once, when they are imported (`freeze`); a type declared
after that could not reach their kernels, so `declare` refuses it.
"""

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from modelfile.errors import HeteroError
from modelfile.quants import iquants, kquants, legacy


@dataclass(frozen=True)
class GpuFormat:
    name: str  # the Triton kernels' weight format: "int4" or "int8"
    values: int  # values per block the repack walks (a row must be a multiple)
    bits_per_32: int  # bytes x 8 per 32 values after repacking, scales included (the planner's VRAM size)
    repack: str | Callable  # "module:function" (raw, in_features, groups) -> the packed rows


@dataclass(frozen=True)
class QuantType:
    qtype: T
    dequantize: Callable[[torch.Tensor], torch.Tensor]  # blocks uint8 [N, bytes] -> float32 [N, values]
    reference_speed: str  # "float", "simple" (32-value blocks) or "k-quant" (bit fields, many small ops)
    engine: str | Callable | None = None  # the CPU engine's block body, "module:function"
    gpu: GpuFormat | None = None
    f16_fields: tuple[int, ...] = ()  # byte offsets of the block's float16 scales (random blocks need sane ones)
    put_scale: Callable[[np.ndarray, np.ndarray], None] | None = None  # (blocks, float16 [N]) for a packed d
    # the engine kernel's measured compute ceiling, bytes of weights per second per core (None:
    # memory-bound); the planner's prediction takes the lower of it and the memory's share
    engine_bytes_per_s_per_core: float | None = None
    activations: str | None = None  # "Q8_0", "Q8_1", "Q8_K", "F32", "F16", "BF16"; None: by block size

    @property
    def layout(self) -> tuple[int, int]:
        """(values, bytes) per block."""
        return GGML_QUANT_SIZES[self.qtype]

    @property
    def activation_format(self) -> str:
        """llama.cpp's vec_dot_type for this type."""
        return self.activations or ("Q8_K" if self.layout[0] == 256 else "Q8_0")


def resolve(ref: str | Callable) -> Callable:
    """A declaration's "module:function" as the function (a callable is returned as is)."""
    if callable(ref):
        return ref
    module, name = ref.split(":")
    return getattr(import_module(module), name)


def _float(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def dequant(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(dtype).float()

    return dequant


def _body(name: str) -> str:
    return f"cpu_ops.blocks:{name}"


def _repack(name: str) -> str:
    return f"gpu_ops.formats:repack_{name}"


def _int8(qtype: T, dequantize, reference_speed: str, values: int, bits_per_32: int, **fields) -> QuantType:
    """A type with its engine body and int8 GPU format, both named after it (gpu_ops/formats.py:
    a byte per value plus the type's scales, `bits_per_32` in all per 32 values)."""
    name = qtype.name.lower()
    gpu = GpuFormat("int8", values, bits_per_32, _repack(name))
    return QuantType(qtype, dequantize, reference_speed, _body(name), gpu, **fields)


def _grid(qtype: T, dequantize, engine_bytes_per_s_per_core: float, **fields) -> QuantType:
    """A grid type, widened to Q6_K's int8 layout with a float32 d per 256 (32 + 2 + 0.5 bytes
    per 32 values), and its engine ceiling."""
    return _int8(qtype, dequantize, "k-quant", 256, 276, engine_bytes_per_s_per_core=engine_bytes_per_s_per_core,
                 **fields)  # fmt: skip


QUANT_TYPES: dict[T, QuantType] = {}
_frozen_by: list[str] = []


def declare(t: QuantType) -> QuantType:
    """Add a type (before the kernel packages are imported: they read the table once)."""
    if _frozen_by:
        raise RuntimeError(f"declare {t.qtype.name} before importing {_frozen_by[0]}: it has read the quant types")
    QUANT_TYPES[t.qtype] = t
    return t


def freeze(reader: str) -> dict[T, QuantType]:
    """The table as `reader` (a kernel package) builds its kernels from it; no declarations after."""
    _frozen_by.append(reader)
    return QUANT_TYPES


# Grid types' engine ceilings: GEMV GB/s on this project's 2-core development machine, halved
# (2026-11-30, docs/benchmarks.md).
for _t in (
    QuantType(T.F32, _float(torch.float32), "float", _body("f32"), activations="F32"),
    QuantType(T.F16, _float(torch.float16), "float", _body("f16"), activations="F16"),
    QuantType(T.BF16, _float(torch.bfloat16), "float", _body("bf16"), activations="BF16"),
    _int8(T.Q4_0, legacy.q4_0, "simple", 32, 272, f16_fields=(0,)),
    _int8(T.Q4_1, legacy.q4_1, "simple", 32, 320, f16_fields=(0, 2), activations="Q8_1"),
    _int8(T.Q5_0, legacy.q5_0, "simple", 32, 272, f16_fields=(0,)),
    _int8(T.Q5_1, legacy.q5_1, "simple", 32, 320, f16_fields=(0, 2), activations="Q8_1"),
    _int8(T.Q8_0, legacy.q8_0, "simple", 32, 272, f16_fields=(0,)),
    _int8(T.IQ4_NL, legacy.iq4_nl, "simple", 32, 272, f16_fields=(0,)),
    _int8(T.Q2_K, kquants.q2_k, "k-quant", 256, 292, f16_fields=(80, 82)),
    _int8(T.Q3_K, kquants.q3_k, "k-quant", 256, 274, f16_fields=(108,)),
    QuantType(T.Q4_K, kquants.q4_k, "k-quant", _body("q4_k"), GpuFormat("int4", 256, 148, _repack("q4_k")), (0, 2)),
    _int8(T.Q5_K, kquants.q5_k, "k-quant", 256, 292, f16_fields=(0, 2)),
    _int8(T.Q6_K, kquants.q6_k, "k-quant", 256, 274, f16_fields=(208,)),
    _int8(T.IQ4_XS, kquants.iq4_xs, "k-quant", 256, 274, f16_fields=(0,)),
    _grid(T.IQ2_XXS, iquants.iq2_xxs, 3.8e9, f16_fields=(0,)),
    _grid(T.IQ2_XS, iquants.iq2_xs, 3.5e9, f16_fields=(0,)),
    _grid(T.IQ2_S, iquants.iq2_s, 3.3e9, f16_fields=(0,)),
    _grid(T.IQ3_XXS, iquants.iq3_xxs, 4.3e9, f16_fields=(0,)),
    _grid(T.IQ3_S, iquants.iq3_s, 2.8e9, f16_fields=(0,)),
    _grid(T.IQ1_S, iquants.iq1_s, 2.3e9, f16_fields=(0,)),
    _grid(T.IQ1_M, iquants.iq1_m, 1.6e9, put_scale=iquants.put_iq1_m_scale),
):
    declare(_t)


def with_scales(qtype: T, raw: np.ndarray, draw: Callable[[int], np.ndarray]) -> np.ndarray:
    """Blocks uint8 [N, size] with every float16 factor set to draw(N) (float16 [N], a fresh
    draw per factor): random bytes made into valid random weights of a chosen scale."""
    t = QUANT_TYPES[qtype]
    for at in t.f16_fields:
        raw[:, at : at + 2] = np.asarray(draw(raw.shape[0]), np.float16).view(np.uint8).reshape(-1, 2)
    if t.put_scale is not None:
        t.put_scale(raw, np.asarray(draw(raw.shape[0]), np.float16))
    return raw


def block_geometry(qtype: int, tensor_name: str = "?") -> tuple[int, int]:
    """(values per block, bytes per block) of a supported type, else a HeteroError."""
    try:
        qt = T(qtype)
    except ValueError:
        raise HeteroError(f"unsupported quant type {qtype} in tensor {tensor_name}") from None
    if qt not in QUANT_TYPES:
        raise HeteroError(f"unsupported quant type {qt.name} in tensor {tensor_name}")
    return QUANT_TYPES[qt].layout


def row_bytes(qtype: int, n_values: int, tensor_name: str = "?") -> int:
    """Bytes taken by one row of `n_values` values."""
    block, size = block_geometry(qtype, tensor_name)
    if n_values % block:
        raise HeteroError(f"tensor {tensor_name}: row of {n_values} is not a multiple of its block ({block})")
    return n_values // block * size


def dequantize(raw: torch.Tensor | np.ndarray, qtype: int, n_values: int) -> torch.Tensor:
    """Rows of raw bytes [R, row_bytes] (uint8) -> float32 [R, n_values], on raw's device."""
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(raw)
    block, size = block_geometry(qtype)
    rows = raw.shape[0]
    blocks = raw.reshape(rows * (n_values // block), size)
    return QUANT_TYPES[T(qtype)].dequantize(blocks).reshape(rows, n_values)
