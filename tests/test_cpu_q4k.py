"""The numba Q4_K GEMV against dequantize + float64 matmul, on fresh random blocks and inputs."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_quants import random_rows

from cpu_ops.q4k import gemv_q4k
from hetero.quants import dequantize


@pytest.mark.parametrize("rows,blocks", [(1, 1), (7, 3), (33, 8), (130, 2)])
def test_gemv_q4k_matches_float64(rows, blocks):
    rng = np.random.default_rng()
    w = random_rows(T.Q4_K, rows, blocks, rng)
    x = rng.standard_normal(blocks * 256).astype(np.float32)
    dense = dequantize(torch.from_numpy(w), T.Q4_K, blocks * 256).double().numpy()
    expected = dense @ x.astype(np.float64)
    bound = np.abs(dense) @ np.abs(x.astype(np.float64))  # float32 rounding scales with this
    ours = gemv_q4k(w, x)
    worst = int(np.argmax(np.abs(ours - expected) / bound))
    assert np.all(np.abs(ours - expected) <= 1e-5 * bound + 1e-30), f"worst row {worst}"


def test_gemv_q4k_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 256"):
        gemv_q4k(np.zeros((2, 144), np.uint8), np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="do not match"):
        gemv_q4k(np.zeros((2, 144), np.uint8), np.zeros(512, np.float32))
