"""What the CPU engine runs, read from the quant types' declarations (modelfile/quants/types.py)
without building its kernels: the planner reads this to name each CPU tensor's backend, and
cpu_ops.blocks builds a kernel body for exactly these types.

The reference path (hetero.ops: dequantize a slice, multiply with torch) runs every other type,
one to two orders of magnitude slower: measured on the 2-core development machine at one
token, 2048 x 2048, 2026-11-30: Q2_K 0.08 GB/s of weights, Q3_K 0.11, IQ4_XS 0.11, Q4_K 0.27,
Q4_0 0.92, Q8_0 4.1, against 15-25 GB/s for the engine's kernels.
"""

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from modelfile.quants.types import freeze

_TYPES = freeze("cpu_ops")
ENGINE_TYPES = tuple(qt for qt, t in _TYPES.items() if t.engine is not None)  # in declaration order
# Reference-path speed per core (bytes of weights per second), from the figures above: the
# K-quant and IQ families unpack bit fields in many small torch ops; the 32-value families are
# a few vector ops per block. Each type's declaration says which family it belongs to.
REFERENCE_BYTES_PER_S_PER_CORE = {"k-quant": 0.05e9, "simple": 0.5e9, "float": 5e9}


def values_per_block(qtype: QType) -> int:
    """Values one kernel step takes: the GGUF block, float types 32 at a time."""
    return max(GGML_QUANT_SIZES[qtype][0], 32)


def runs_on_engine(qtype: QType, in_features: int) -> bool:
    """Whether the CPU kernels multiply this type at this row width."""
    return qtype in ENGINE_TYPES and in_features % values_per_block(qtype) == 0


def experts_run_on_engine(gate: tuple[QType, int], up: tuple[QType, int], down: tuple[QType, int]) -> bool:
    """Whether a layer's expert stacks ((type, row width) of gate, up, down) run as one fused
    engine op: each type supported, and gate and up of one type (they share a kernel pass)."""
    return all(runs_on_engine(t, k) for t, k in (gate, up, down)) and gate[0] == up[0]


def engine_bytes_per_s(qtype: QType, cores: int) -> float:
    """The engine kernel's own ceiling (bytes of weights per second) on `cores` cores: the grid
    types decode patterns from tables and are bound by that work, not by memory, on a few cores
    (docs/benchmarks.md); the other kernels are memory-bound (infinite here)."""
    per_core = _TYPES[qtype].engine_bytes_per_s_per_core
    return float("inf") if per_core is None else per_core * max(1, cores)


def reference_bytes_per_s(qtype: QType, cores: int) -> float:
    return REFERENCE_BYTES_PER_S_PER_CORE[_TYPES[qtype].reference_speed] * max(1, cores)
