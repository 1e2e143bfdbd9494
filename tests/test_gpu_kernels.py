"""GPU weight formats and kernels against GGUF's own dequantization and a float64 matmul.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py before
anything imports Triton), so CI checks the same kernel source that a GPU compiles.
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from gpu_ops.formats import Int4Rows, Int8Rows
from gpu_ops.matmul import MAX_TRITON_TOKENS, gpu_matmul, repack, torch_matmul, triton_runs_on

F16_AT = {T.Q4_K: (0, 2), T.Q6_K: (208,), T.Q8_0: (0,), T.Q5_0: (0,)}  # where each block keeps float16 scales
FORMATS = {T.Q4_K: Int4Rows, T.Q6_K: Int8Rows, T.Q8_0: Int8Rows, T.Q5_0: Int8Rows}


def random_blocks(qtype, rows: int, k: int, rng) -> np.ndarray:
    """uint8 [rows, row_bytes] of random blocks with small finite float16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * (k // block), size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        raw[:, at : at + 2] = (rng.random((raw.shape[0], 1)) * 0.02).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("rows,k", [(1, 256), (37, 768), (130, 512)])
def test_repacked_weights_dequantize_bit_for_bit(qtype, rows, k):
    raw = random_blocks(qtype, rows, k, np.random.default_rng())
    w = repack(raw, qtype, k)
    assert isinstance(w, FORMATS[qtype])
    np.testing.assert_array_equal(w.dequantize_rows(0, rows).numpy(), dequantize(raw, qtype).reshape(rows, k))


def test_types_without_a_gpu_format_stay_on_the_reference_path():
    raw = np.zeros((2, 34), np.uint8)
    assert repack(raw, T.Q5_1, 32) is None and repack(np.zeros((1, 144), np.uint8), T.Q4_K, 128) is None


def _check(y: torch.Tensor, raw: np.ndarray, qtype, x: np.ndarray):
    w = dequantize(raw, qtype).reshape(raw.shape[0], -1).astype(np.float64)
    ref = x.astype(np.float64) @ w.T
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T) + 1e-30
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert np.all(np.abs(y.numpy() - ref) <= bound)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 3, MAX_TRITON_TOKENS])
@pytest.mark.parametrize("rows,k", [(1, 256), (63, 512), (130, 768)])
def test_triton_kernels_match_float64(qtype, tokens, rows, k):
    assert triton_runs_on(torch.device("cpu")), "the Triton kernels must run in CI (TRITON_INTERPRET=1)"
    rng = np.random.default_rng()
    raw = random_blocks(qtype, rows, k, rng)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    _check(gpu_matmul(torch.from_numpy(x), repack(raw, qtype, k)), raw, qtype, x)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 20])
def test_torch_path_matches_float64(qtype, tokens):
    rng = np.random.default_rng()
    raw = random_blocks(qtype, 300, 512, rng)
    x = rng.standard_normal((tokens, 512)).astype(np.float32)
    _check(torch_matmul(torch.from_numpy(x), repack(raw, qtype, 512)), raw, qtype, x)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_the_planner_budgets_the_repacked_size(qtype):
    """placement.cost plans GPU memory from the header alone; it must match what repack makes."""
    from placement.cost import gpu_format

    rows, k = 7, 512
    raw = random_blocks(qtype, rows, k, np.random.default_rng())
    w = repack(raw, qtype, k)
    made = sum(t.numel() * t.element_size() for t in vars(w).values() if isinstance(t, torch.Tensor))
    assert gpu_format(qtype, rows * k, raw.nbytes)[1] == made
