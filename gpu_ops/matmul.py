"""y = x @ W.T for W in a GPU format: Triton kernels where Triton runs, torch tiles otherwise.

`repack` turns a GGUF tensor into its GPU format (gpu_ops.formats; None for types without one).
The seam: `gpu_matmul` and `gathered_matmul` use the Triton kernels (gpu_ops/triton_kernels.py)
when Triton can run where x lives: a CUDA device, or any device under TRITON_INTERPRET=1, which
is how CI tests the kernels on the CPU. Elsewhere (the CPU standing in for the GPU) they
dequantize a bounded tile of rows at a time and multiply with torch. All return float32.
Triton is imported on first use, so a CPU-only run never loads it.
"""

import dataclasses
import functools
import importlib
import os
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from gpu_ops.capabilities import GPU_FORMATS, has_gpu_format
from gpu_ops.formats import TILE, Int4Rows, Int8Rows, tiles_for
from modelfile.quants.types import QUANT_TYPES, resolve

GpuWeights = Int4Rows | Int8Rows
_REPACK = {qt: resolve(QUANT_TYPES[qt].gpu.repack) for qt in GPU_FORMATS}  # as each type's declaration names it

DECODE_TOKENS = 8  # up to this many rows the GEMV kernel runs (weights read once); above, the GEMM
TORCH_CHUNK_VALUES = 1 << 20  # floats dequantized at a time on the torch path


REPACK_CHUNK_BYTES = 64 << 20  # GGUF bytes repacked on the CPU at a time on the way to the device
_placed: ContextVar[Callable[[int], None] | None] = ContextVar("gpu_bytes_placed", default=None)


@contextmanager
def report_placed_bytes(callback: Callable[[int], None]):
    """Within this block, callback(n) hears of every n bytes of weights put on a GPU device (a
    progress bar for loading)."""
    token = _placed.set(callback)
    try:
        yield
    finally:
        _placed.reset(token)


def placed(n_bytes: int) -> None:
    callback = _placed.get()
    if callback is not None:
        callback(n_bytes)


def repack(raw, qtype, in_features: int, device: torch.device | None = None, groups: int = 1,
           triton: bool | None = None) -> GpuWeights | None:  # fmt: skip
    """GGUF rows (uint8 [rows, row_bytes]; `groups` stacked matrices of equal height) in their GPU
    format, or None if the type has none.

    With a device the rows go there REPACK_CHUNK_BYTES at a time (whole tiles, or whole groups
    of a stack) into tensors made once, so the CPU never holds more than a chunk of the
    repacked copy; without, the result is on the CPU. triton: whether the Triton kernels or
    torch multiply it (the plan's gpu-triton / gpu-torch; None: Triton where it runs), fixed
    here so that no call decides it again.
    """
    out = _repack(raw, qtype, in_features, device, groups)
    if out is not None:
        out.triton = triton_runs_on(device or torch.device("cpu")) if triton is None else triton
    return out


def _repack(raw, qtype, in_features: int, device: torch.device | None, groups: int) -> GpuWeights | None:
    if not has_gpu_format(qtype, in_features):
        return None
    convert = _REPACK[qtype]
    if device is None:
        return convert(raw, in_features, groups)
    rows = raw.shape[0]
    per_group = rows // groups
    unit_rows, unit_tiles = (per_group, tiles_for(per_group)) if groups > 1 else (TILE, 1)
    n_units = groups if groups > 1 else tiles_for(rows)
    step = max(1, REPACK_CHUNK_BYTES // (unit_rows * raw.shape[1]))
    out = None
    for u in range(0, n_units, step):
        r0, r1 = u * unit_rows, min(rows, (u + step) * unit_rows)
        part = convert(raw[r0:r1], in_features, (r1 - r0) // per_group if groups > 1 else 1)
        tensors = part._tensors()
        if out is None:
            out = dataclasses.replace(part, rows_per_group=per_group, groups=groups, **{
                name: torch.empty((n_units * unit_tiles, *t.shape[1:]), dtype=t.dtype, device=device)
                for name, t in tensors.items()
            })  # fmt: skip
        made = 0
        for name, t in tensors.items():
            getattr(out, name)[u * unit_tiles : u * unit_tiles + t.shape[0]].copy_(t)
            made += t.numel() * t.element_size()
        placed(made)
    return out


@functools.cache
def _triton_kernels():
    """gpu_ops.triton_kernels, or None when Triton is not installed (the torch path serves)."""
    try:
        return importlib.import_module("gpu_ops.triton_kernels")
    except ImportError:
        return None


def triton_runs_on(device: torch.device) -> bool:
    return (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") and _triton_kernels() is not None


def _activations(x: torch.Tensor) -> torch.Tensor:
    return (x if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.float()).contiguous()


def torch_matmul(x: torch.Tensor, w: GpuWeights) -> torch.Tensor:
    x = x.float()
    n, k = w.shape
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    step = max(1, TORCH_CHUNK_VALUES // k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y[:, start:stop] = x @ w.dequantize_rows(start, stop).T
    return y


def gpu_matmul(x: torch.Tensor, w: GpuWeights) -> torch.Tensor:
    """x [T, K] (float32, float16 or bfloat16, on w's device) @ W.T -> float32 [T, N]; the
    kernels convert activations to float32 as they load them."""
    x = _activations(x)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"activations of width {x.shape[1]} for rows of {w.shape[1]}")
    if w.triton:
        return _triton_kernels().matmul(x, w, DECODE_TOKENS)
    return torch_matmul(x, w)


def float_stack_matmul(x: torch.Tensor, w: torch.Tensor, triton: bool) -> torch.Tensor:
    """x [T, E, K] @ w[e].T per matrix e of a float stack w [E, N, K] (float16, bfloat16 or
    float32, on x's device) -> float32 [T, E, N]. The Triton kernel (triton: the plan's
    gpu-triton) widens the weights in registers; torch writes a float32 copy of the stack first
    and reads it again."""
    if triton:
        return _triton_kernels().float_stack_matmul(_activations(x).float(), w.contiguous())
    return torch.einsum("tek,enk->ten", x.float(), w.float())


def gathered_matmul(x: torch.Tensor, w: GpuWeights, ids: torch.Tensor, x_per_token: bool) -> torch.Tensor:
    """Per (token, slot) s: x[token or s] @ W_e.T with e = ids[s], W a stack of matrices (groups).

    ids int [T, A] stay on the device (no host sync: graph-capturable); x [T, K] when
    x_per_token, else [T * A, K]. Returns float32 [T * A, w.rows_per_group].
    """
    x = _activations(x)
    if w.triton:
        return _triton_kernels().gathered_matmul(x, w, ids, x_per_token)
    n = w.rows_per_group
    flat = ids.reshape(-1)
    y = torch.empty(flat.numel(), n, dtype=torch.float32, device=x.device)
    per = ids.shape[1] if x_per_token else 1
    for s in range(flat.numel()):  # the slot count is static; the expert id is read on the device
        rows = flat[s] * n + torch.arange(n, device=x.device)
        y[s] = x[s // per].float() @ w.dequantize_index(rows).T
    return y
