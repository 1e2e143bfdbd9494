"""Dispatch table from ggml quant type to dequantizer, and the row geometry of each type."""

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from modelfile.errors import HeteroError
from modelfile.quants import kquants, legacy


def _float(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def dequant(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(dtype).float()

    return dequant


BLOCK_FORMATS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: _float(torch.float32),
    T.F16: _float(torch.float16),
    T.BF16: _float(torch.bfloat16),
    T.Q4_0: legacy.q4_0,
    T.Q4_1: legacy.q4_1,
    T.Q5_0: legacy.q5_0,
    T.Q5_1: legacy.q5_1,
    T.Q8_0: legacy.q8_0,
    T.IQ4_NL: legacy.iq4_nl,
    T.Q2_K: kquants.q2_k,
    T.Q3_K: kquants.q3_k,
    T.Q4_K: kquants.q4_k,
    T.Q5_K: kquants.q5_k,
    T.Q6_K: kquants.q6_k,
    T.IQ4_XS: kquants.iq4_xs,
}


def block_geometry(qtype: int, tensor_name: str = "?") -> tuple[int, int]:
    """(values per block, bytes per block) of a supported type, else a HeteroError."""
    try:
        qt = T(qtype)
    except ValueError:
        raise HeteroError(f"unsupported quant type {qtype} in tensor {tensor_name}") from None
    if qt not in BLOCK_FORMATS:
        raise HeteroError(f"unsupported quant type {qt.name} in tensor {tensor_name}")
    return GGML_QUANT_SIZES[qt]


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
    return BLOCK_FORMATS[T(qtype)](blocks).reshape(rows, n_values)
