"""y = x @ W.T for W in `Int4Rows`: a Triton kernel for decode-sized batches, torch otherwise.

The seam: `int4_matmul` picks the Triton kernel (gpu_ops/int4_triton.py) when x has at most
`MAX_TRITON_TOKENS` rows and Triton can run where x lives: a CUDA device, or any device under
TRITON_INTERPRET=1, which is how CI tests the kernel on the CPU. Everything else dequantizes a
bounded tile of rows at a time and multiplies with torch (the CPU stand-in for the GPU, and
prefill until a GEMM kernel exists). Both return float32. Triton is imported on first use, so
a CPU-only run never loads it.
"""

import functools
import importlib
import os

import torch

from gpu_ops.formats import Int4Rows

MAX_TRITON_TOKENS = 8
TILE_VALUES = 1 << 20  # floats per dequantized tile on the torch path


@functools.cache
def _triton_kernels():
    """gpu_ops.int4_triton, or None when Triton is not installed (the torch path serves)."""
    try:
        return importlib.import_module("gpu_ops.int4_triton")
    except ImportError:
        return None


def triton_runs_on(device: torch.device) -> bool:
    return (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") and _triton_kernels() is not None


def torch_matmul(x: torch.Tensor, w: Int4Rows) -> torch.Tensor:
    n, k = w.shape
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    step = max(1, TILE_VALUES // k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y[:, start:stop] = x @ w.dequantize_rows(start, stop).T
    return y


def int4_matmul(x: torch.Tensor, w: Int4Rows) -> torch.Tensor:
    """x float [T, K] (on w's device) @ W.T -> float32 [T, N]."""
    x = x.float().contiguous()
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"activations of width {x.shape[1]} for rows of {w.shape[1]}")
    if x.shape[0] <= MAX_TRITON_TOKENS and triton_runs_on(x.device):
        return _triton_kernels().int4_matmul(x, w)
    return torch_matmul(x, w)
