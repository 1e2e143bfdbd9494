"""Reference ops over quantized weights: dequantize a bounded slice, multiply, discard.

These are the op interfaces the forward pass is written against. The reference versions here
run on any torch device and never hold more than `CHUNK_VALUES` dequantized floats at once, so
a weight stays quantized in memory. Faster kernels (cpu_ops, gpu_ops) implement the same calls.
"""

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from hetero.gguf_file import TensorInfo
from hetero.quants import dequantize

CHUNK_VALUES = 1 << 20  # 4 MiB of float32 per dequantized slice (its temporaries are a few times that)


def quant_matmul(x: torch.Tensor, raw: torch.Tensor, qtype, in_features: int) -> torch.Tensor:
    """x [T, in] @ W.T for W given as raw rows [out, row_bytes]; dequantizes a slice at a time.

    Runs where the weight lives and returns on x's device (the hybrid hand-off in miniature).
    """
    home = x.device
    x = x.to(raw.device)
    out_features = raw.shape[0]
    step = max(1, CHUNK_VALUES // in_features)
    if step >= out_features:
        return (x @ dequantize(raw, qtype, in_features).T).to(home)
    y = x.new_empty(x.shape[0], out_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        y[:, start:stop] = x @ dequantize(raw[start:stop], qtype, in_features).T
    return y.to(home)


def raw_tensor(info: TensorInfo, device: torch.device) -> torch.Tensor:
    """The tensor's bytes as uint8 [rows, row_bytes]: a zero-copy view on CPU, a copy elsewhere.

    The view is of a read-only map; nothing in hetero writes to weights.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(info.data)
    return raw if device.type == "cpu" else raw.to(device)


class QuantLinear:
    """y = x @ W.T for W [out, in] stored in any supported GGUF block format."""

    def __init__(self, info: TensorInfo, device: torch.device):
        if len(info.shape) != 2:
            raise ValueError(f"{info.name}: expected a matrix, got shape {info.shape}")
        self.name = info.name
        self.qtype = info.qtype
        self.out_features, self.in_features = info.shape
        self.raw = raw_tensor(info, device)

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of W as float32 [stop - start, in]."""
        return dequantize(self.raw[start:stop], self.qtype, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] float32 -> [T, out]."""
        return quant_matmul(x, self.raw, self.qtype, self.in_features)


class Embedding:
    """Row lookup that dequantizes only the rows asked for."""

    def __init__(self, info: TensorInfo, device: torch.device):
        self.qtype = info.qtype
        self.n_rows, self.dim = info.shape
        self.raw = raw_tensor(info, device)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] int64 -> [T, dim] float32, on the device of ids."""
        return dequantize(self.raw[ids.to(self.raw.device)], self.qtype, self.dim).to(ids.device)


class ExpertBank:
    """The routed experts of one layer: stacked gate/up [E, F, D] and down [E, D, F]."""

    def __init__(self, gate: TensorInfo, up: TensorInfo, down: TensorInfo, device: torch.device):
        self.n_expert, self.n_ff, self.n_embd = gate.shape
        self.gate = QuantLinear3(gate, device)
        self.up = QuantLinear3(up, device)
        self.down = QuantLinear3(down, device)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids [T, A] int64, weights [T, A] -> sum over A of weight * expert(x), [T, D]."""
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            xe = x[tok]  # [n, D]
            h = F.silu(self.gate(e, xe)) * self.up(e, xe)  # [n, F]
            out.index_add_(0, tok, self.down(e, h) * weights[tok, slot, None])
        return out


class QuantLinear3:
    """A stack of matrices [E, out, in] with per-matrix matmul; used for experts and MLA heads."""

    def __init__(self, info: TensorInfo, device: torch.device):
        self.name = info.name
        self.qtype = info.qtype
        self.n, self.out_features, self.in_features = info.shape
        self.raw = raw_tensor(info, device)

    def all(self) -> torch.Tensor:
        """Every matrix as float32 [E, out, in]; only for small stacks (MLA per-head weights)."""
        return dequantize(self.raw, self.qtype, self.in_features).reshape(self.n, self.out_features, -1)

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ matrix e transposed -> [T, out]."""
        rows = self.raw[e * self.out_features : (e + 1) * self.out_features]
        return quant_matmul(x, rows, self.qtype, self.in_features)


def vector(info: TensorInfo, device: torch.device) -> torch.Tensor:
    """A small tensor (norm weight, bias) dequantized to float32 in its numpy shape."""
    flat = dequantize(np.ascontiguousarray(info.data).reshape(1, -1), info.qtype, info.n_values)
    return flat.reshape(info.shape).to(device)
