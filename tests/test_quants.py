"""Every block format against gguf's numpy dequantization, on fresh random blocks."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from modelfile.errors import HeteroError
from modelfile.quants import QUANT_TYPES, dequantize, row_bytes
from modelfile.quants.types import with_scales

# Byte offsets of the float16 factors inside each block: random bytes there could spell NaN.


def random_rows(qtype: T, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for every field, with finite float factors; with several blocks, the first is zero."""
    block, size = GGML_QUANT_SIZES[qtype]
    if qtype in (T.F32, T.F16, T.BF16):
        values = rng.standard_normal((rows, block * blocks_per_row)).astype(np.float32)
        if qtype == T.F16:
            values = values.astype(np.float16)
        elif qtype == T.BF16:
            values = (values.view(np.uint32) >> 16).astype(np.uint16)
        if rows * blocks_per_row > 1:
            values.reshape(-1)[:block] = 0
        return values.view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, size), dtype=np.uint8)
    with_scales(qtype, raw, lambda n: rng.standard_normal(n) * 0.05)  # sane float16 factors
    if rows * blocks_per_row > 1:
        raw[0] = 0
    return raw.reshape(rows, blocks_per_row * size)


@pytest.mark.parametrize("qtype", list(QUANT_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (5, 3), (3, 7)])
def test_matches_gguf(qtype, rows, blocks_per_row):
    rng = np.random.default_rng()
    raw = random_rows(qtype, rows, blocks_per_row, rng)
    n = GGML_QUANT_SIZES[qtype][0] * blocks_per_row
    assert raw.shape[1] == row_bytes(qtype, n)
    expected = gguf_dequantize(raw, qtype).reshape(rows, n)
    ours = dequantize(torch.from_numpy(raw), qtype, n).numpy()
    assert ours.dtype == np.float32 and ours.shape == (rows, n)
    err = np.abs(ours - expected)
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert np.array_equal(ours, expected), f"worst at row {worst[0]}, value {worst[1]}: {err[worst]}"
    assert np.any(ours != 0)


def test_unsupported_type_names_the_tensor():
    with pytest.raises(HeteroError, match="unsupported quant type TQ1_0 in tensor blk.3.ffn_up_exps.weight"):
        row_bytes(T.TQ1_0, 256, "blk.3.ffn_up_exps.weight")
