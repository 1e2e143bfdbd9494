"""GPU weight formats and kernels against GGUF's own dequantization and a float64 matmul.

Without CUDA the Triton kernel runs under TRITON_INTERPRET=1 (set in conftest.py before
anything imports Triton), so CI checks the same kernel source that a GPU compiles.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from gpu_ops.formats import BLOCK, BLOCK_BYTES, repack_q4_k
from gpu_ops.int4_matmul import MAX_TRITON_TOKENS, int4_matmul, torch_matmul, triton_runs_on


def random_q4_k(rows: int, k: int, rng) -> np.ndarray:
    """uint8 [rows, row_bytes] of random Q4_K blocks with finite float16 super-scales."""
    raw = rng.integers(0, 256, (rows * (k // BLOCK), BLOCK_BYTES), dtype=np.uint8)
    raw[:, 0:4] = (rng.random((raw.shape[0], 2)) * 0.02).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("rows,k", [(1, 256), (37, 768), (130, 512)])
def test_repacked_q4_k_dequantizes_bit_for_bit(rows, k):
    raw = random_q4_k(rows, k, np.random.default_rng())
    ours = repack_q4_k(raw, k).dequantize_rows(0, rows).numpy()
    np.testing.assert_array_equal(ours, dequantize(raw, T.Q4_K).reshape(rows, k))


def _check(y: torch.Tensor, raw: np.ndarray, x: np.ndarray):
    w = dequantize(raw, T.Q4_K).reshape(raw.shape[0], -1).astype(np.float64)
    ref = x.astype(np.float64) @ w.T
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T) + 1e-30
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert np.all(np.abs(y.numpy() - ref) <= bound)


@pytest.mark.parametrize("tokens", [1, 3, MAX_TRITON_TOKENS])
@pytest.mark.parametrize("rows,k", [(1, 256), (63, 512), (130, 768)])
def test_triton_int4_matmul_matches_float64(tokens, rows, k):
    assert triton_runs_on(torch.device("cpu")), "the Triton kernel must run in CI (TRITON_INTERPRET=1)"
    rng = np.random.default_rng()
    raw = random_q4_k(rows, k, rng)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    _check(int4_matmul(torch.from_numpy(x), repack_q4_k(raw, k)), raw, x)


@pytest.mark.parametrize("tokens", [1, 20])
def test_torch_int4_matmul_matches_float64(tokens):
    rng = np.random.default_rng()
    raw = random_q4_k(300, 512, rng)
    x = rng.standard_normal((tokens, 512)).astype(np.float32)
    _check(torch_matmul(torch.from_numpy(x), repack_q4_k(raw, 512)), raw, x)
