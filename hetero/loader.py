"""The one loader: each placement of a Plan becomes the op that runs it, on the backend it names.

Nothing is re-decided here or at call time: a placement whose backend this machine or these
options cannot build (the CPU engine without an executor, Triton where it cannot run) is an
error naming the tensor. The blocks (hetero/models/blocks.py) ask this object
for its weights by name.
"""

import torch

from cpu_ops.executor import Executor
from hetero.ops import GPU_BACKENDS, Embedding, ExpertBank, QuantLinear, QuantLinear3, split_joint_kv_b, vector
from modelfile.gguf_file import TensorInfo
from placement.planner import Plan


class OpBuilder:
    def __init__(
        self,
        tensors: dict[str, TensorInfo],
        plan: Plan,
        gpu: torch.device,
        home: torch.device,
        executor: Executor | None,
    ):
        """gpu: the torch device that plays the plan's "gpu"; home: where activations live."""
        self.tensors = tensors
        self.placements = {p.name: p for p in plan.placements}
        self.fused_shared = set(plan.fused_shared_layers)
        self.gpu, self.home, self.executor = gpu, home, executor

    def device(self, name: str) -> torch.device:
        return self.gpu if self.placements[name].device == "gpu" else torch.device("cpu")

    def backend(self, name: str) -> str:
        return self.placements[name].backend

    def matrix(self, name: str) -> QuantLinear | None:
        """y = x @ W.T for a weight the file has, else None (optional tensors)."""
        if name not in self.tensors:
            return None
        return QuantLinear(self.tensors[name], self.device(name), self.backend(name), self.executor)

    def stack(self, name: str) -> QuantLinear3:
        return QuantLinear3(self.tensors[name], self.device(name), self.backend(name), self.executor)

    def split_stacks(self, name: str, n_head: int, nope: int, v_dim: int) -> tuple[QuantLinear3, QuantLinear3] | None:
        """k_b and v_b derived from a joint kv_b (the planner counts their bytes: family.
        derived_at_load): beside it for the CPU engine, instead of it on the GPU (W_UK as float,
        W_UV in its GPU format, both on kv_b's kernels); None where kv_b runs on the reference path."""
        backend, device = self.backend(name), self.device(name)
        if backend == "cpu-engine":
            backends = ("cpu-engine", "cpu-engine")
        elif backend in GPU_BACKENDS:  # W_UK as a float stack on the same kernels (Triton or torch)
            backends = (backend, backend)
        else:
            return None
        infos = split_joint_kv_b(self.tensors[name], n_head, nope, v_dim)
        stacks = tuple(QuantLinear3(i, device, b, self.executor) for i, b in zip(infos, backends, strict=True))
        for stack in stacks:
            if stack.gpu is not None:  # its GPU format has it: drop the derived host copy (not the file's map)
                stack.raw = stack.raw[:0]
        return stacks

    def joint_kv_b(self, name: str) -> QuantLinear | None:
        """The joint kv_b itself where it is kept: on the CPU (the file's map, which prompts
        multiply by), not on the GPU, where the derived stacks take its place."""
        return None if self.backend(name) in GPU_BACKENDS else self.matrix(name)

    def vector(self, name: str) -> torch.Tensor | None:
        """A norm weight or bias, float32 where the activations are."""
        return vector(self.tensors[name], self.home) if name in self.tensors else None

    def embedding(self, name: str) -> Embedding:
        return Embedding(self.tensors[name], self.device(name))

    def experts(self, layer: int, gate: str, up: str, down: str, shared: tuple[str, str, str]) -> ExpertBank:
        """A layer's routed experts; the shared ones ride in the same CPU hand-off when the plan
        fuses them (placement.planner: both on the CPU engine)."""
        fused = tuple(self.tensors[n] for n in shared) if layer in self.fused_shared else None
        infos = (self.tensors[gate], self.tensors[up], self.tensors[down])
        resident = self.placements[gate].device
        return ExpertBank(*infos, self.device(gate), self.backend(gate), self.executor, shared=fused, resident=resident)
