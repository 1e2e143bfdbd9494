"""Routed experts on the GPU, from the same lossless formats as every other GPU weight.

A layer's stacks keep one matrix per expert (a group of the format: gate/up [F, D], down [D, F]). Decode
(up to DECODE_TOKENS tokens) runs the chosen experts as gathered GEMVs whose expert ids are read
on the device, so the whole MoE layer, routing included, fits in a captured CUDA graph with
no host round trip (the thing that makes KTransformers fall out of its graph for GPU-placed
experts). Prefill groups the tokens by expert on the host and multiplies each group once.
"""

import torch
import torch.nn.functional as F

from gpu_ops.matmul import DECODE_TOKENS, GpuWeights, gathered_matmul, gpu_matmul, repack


def repack_stack(data, qtype, shape: tuple[int, int, int], device: torch.device,
                 triton: bool | None = None) -> GpuWeights | None:  # fmt: skip
    """A GGUF stack of matrices [E, rows, K] in its GPU format (E groups) on device, or None;
    triton as for repack."""
    n, rows, k = shape
    return repack(data.reshape(n * rows, -1), qtype, k, device, groups=n, triton=triton)


class GpuExperts:
    def __init__(self, gate: GpuWeights, up: GpuWeights, down: GpuWeights):
        """gate/up: stacks of [F, D] matrices, down: of [D, F]; one group per expert."""
        self.gate, self.up, self.down = gate, up, down
        self.n_ff = gate.rows_per_group
        self.n_embd = down.rows_per_group

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids int [T, A], weights [T, A] (all on the GPU) -> the weighted sum [T, D]."""
        if x.shape[0] <= DECODE_TOKENS:
            return self.gathered(x, ids, weights)
        return self.grouped(x, ids, weights)

    def gathered(self, x, ids, weights):
        t, a = ids.shape
        g = gathered_matmul(x, self.gate, ids, x_per_token=True)  # [T * A, F]
        u = gathered_matmul(x, self.up, ids, x_per_token=True)
        y = gathered_matmul(F.silu(g) * u, self.down, ids, x_per_token=False)  # [T * A, D]
        return (y.view(t, a, -1) * weights[..., None]).sum(1)

    def grouped(self, x, ids, weights):
        out = torch.zeros(x.shape[0], self.n_embd, dtype=torch.float32, device=x.device)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            xe = x[tok].float()
            h = F.silu(gpu_matmul(xe, self.gate.group(e))) * gpu_matmul(xe, self.up.group(e))
            out.index_add_(0, tok, gpu_matmul(h, self.down.group(e)) * weights[tok, slot, None])
        return out
