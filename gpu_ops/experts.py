"""Routed experts on the GPU, from the same lossless formats as every other GPU weight.

A layer's stacks become one weight matrix each (gate/up [E * F, D], down [E * D, F]). Decode
(up to DECODE_TOKENS tokens) runs the chosen experts as gathered GEMVs whose expert ids are read
on the device, so the whole MoE layer, routing included, fits in a captured CUDA graph with
no host round trip (the thing that makes KTransformers fall out of its graph for GPU-placed
experts). Prefill groups the tokens by expert on the host and multiplies each group once.
"""

import torch
import torch.nn.functional as F

from gpu_ops.matmul import DECODE_TOKENS, GpuWeights, gathered_matmul, gpu_matmul, repack


def repack_stack(data, qtype, shape: tuple[int, int, int], device: torch.device) -> GpuWeights | None:
    """A GGUF expert stack [E, rows, K] as one GPU-format matrix [E * rows, K] on device, or None."""
    n, rows, k = shape
    return repack(data.reshape(n * rows, -1), qtype, k, device)


class GpuExperts:
    def __init__(self, gate: GpuWeights, up: GpuWeights, down: GpuWeights, n_expert: int):
        self.gate, self.up, self.down = gate, up, down
        self.n_expert = n_expert
        self.n_ff = gate.shape[0] // n_expert
        self.n_embd = down.shape[0] // n_expert

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids int [T, A], weights [T, A] (all on the GPU) -> the weighted sum [T, D]."""
        if x.shape[0] <= DECODE_TOKENS:
            return self.gathered(x, ids, weights)
        return self.grouped(x, ids, weights)

    def gathered(self, x, ids, weights):
        t, a = ids.shape
        g = gathered_matmul(x, self.gate, ids, self.n_ff, x_per_token=True)  # [T * A, F]
        u = gathered_matmul(x, self.up, ids, self.n_ff, x_per_token=True)
        y = gathered_matmul(F.silu(g) * u, self.down, ids, self.n_embd, x_per_token=False)  # [T * A, D]
        return (y.view(t, a, -1) * weights[..., None]).sum(1)

    def grouped(self, x, ids, weights):
        out = torch.zeros(x.shape[0], self.n_embd, dtype=torch.float32, device=x.device)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            xe = x[tok].float()
            f, d = slice(e * self.n_ff, (e + 1) * self.n_ff), slice(e * self.n_embd, (e + 1) * self.n_embd)
            h = F.silu(gpu_matmul(xe, self.gate.rows(f))) * gpu_matmul(xe, self.up.rows(f))
            out.index_add_(0, tok, gpu_matmul(h, self.down.rows(d)) * weights[tok, slot, None])
        return out
