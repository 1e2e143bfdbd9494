"""The eager forward pass: embedding -> the description's blocks in order -> norm -> logits.

Family-agnostic: the blocks come from a Description (modelfile/blocks.py) and are built by kind
(hetero/models/blocks.py). Prompts and, when no faster step applies, decoded tokens run here;
the hybrid and native steps (hybrid.py, native.py) are derived from the same blocks.
"""

import torch

from cpu_ops.matmul import split
from gpu_ops.staging import ExpertStream
from hetero.kv_cache import KVCache
from hetero.loader import OpBuilder
from hetero.models.blocks import KINDS, Moe, Pass, rms_norm
from hetero.rope import rope_tables
from modelfile.blocks import Description
from modelfile.families import family_of_config


class Net:
    def __init__(self, cfg, description: Description, ops: OpBuilder, cache_width: int,
                 cache_dtype: torch.dtype = torch.float32):  # fmt: skip
        """ops: the plan's weights (hetero.loader); activations and the cache live at ops.home;
        cache_width: values per token and attention block; cache_dtype: the plan's."""
        self.cfg, self.description = cfg, description
        self.device = ops.home
        self.embed = ops.embedding(description.embedding)
        layers = description.cache_layers()
        self.blocks = [KINDS[b.kind](cfg, ops, b, layer) for b, layer in zip(description.blocks, layers, strict=True)]
        self.output_norm = ops.vector(description.output_norm)
        self.output = ops.matrix(description.output)
        self.cache_width, self.cache_dtype = cache_width, cache_dtype
        self.attention_form = "auto"  # or "llama.cpp", "each", "absorbed", "expanded" (hetero.models.blocks.Pass)
        self.decode_step = None  # one-token step: NativeDecode (all on the CPU engine) or HybridDecode (GPU)
        self.expert_stream: ExpertStream | None = None  # the GPU road of a prompt's CPU experts
        self.stream_from = 0  # chunks of this many tokens or more take it

    def stream_experts(self, from_tokens: int, device: torch.device) -> None:
        """Prompt chunks of from_tokens or more run the CPU-resident routed experts on `device`,
        streamed there layer by layer (the plan's crossover; 0: never)."""
        banks = [b for b in self.blocks if isinstance(b, Moe) and b.experts.resident == "cpu"]
        if not from_tokens or not banks:
            return
        for i, block in enumerate(banks):
            block.streamed = i
        self.expert_stream = ExpertStream([b.experts.gguf_stacks for b in banks], device)
        self.stream_from = from_tokens

    def matrix_ops(self):
        """Every op that multiplies by a weight matrix: what the plan's backends are checked against."""
        for block in self.blocks:
            yield from block.matrix_ops()
        yield self.output

    def find(self, layer: int, kind: str):
        """The block of the file's layer `layer` of this kind (tests and diagnosis)."""
        return next(b for b in self.blocks if b.block.layer == layer and b.block.kind == kind)

    def prefill_chunk(self, positions: int) -> int:
        """Tokens per prefill pass ending at `positions`: the family's rule, which the planner
        budgets the pass's activations by (placement.planner: prefill_host_bytes)."""
        return family_of_config(self.cfg).prefill_chunk(self.cfg, positions)

    def new_cache(self, max_tokens: int) -> KVCache:
        n = self.description.n_cache_layers
        return KVCache(n, max_tokens, self.cache_width, self.device, self.cache_dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(rms_norm(x, self.output_norm, self.cfg.rms_eps))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False, watch=None) -> torch.Tensor:
        """ids [T] at positions cache.length.. -> logits [T, vocab] (or [1, vocab] if last_only).
        `watch(layer, x)` sees the residual stream after each block (diagnosis; this path only)."""
        start = cache.length
        if start + ids.shape[0] > cache.max_tokens:
            raise ValueError(f"context full: {start} + {ids.shape[0]} tokens > {cache.max_tokens}")
        if self.decode_step is not None and ids.shape[0] == 1 and watch is None:
            return self.decode_step(int(ids[0]), cache)
        t, chunk = ids.shape[0], self.prefill_chunk(start + ids.shape[0])
        if t > chunk:  # a long prompt goes through in chunks (bounded attention scores), in even
            cuts = split(t, -(-t // chunk))  # shares: never a one-token pass, summed as a decoded token is
            parts = [self.forward(ids[a:b], cache, last_only, watch) for a, b in cuts]
            return parts[-1] if last_only else torch.cat(parts)
        cos, sin = rope_tables(self.cfg, torch.arange(start, start + ids.shape[0]), self.device)
        long = ids.shape[0] >= max(2, self.stream_from)  # one token never copies every expert
        stream = self.expert_stream if self.expert_stream is not None and long else None
        if stream is not None:
            stream.begin()
        run = Pass(cache, start, cos, sin, self.attention_form, stream)
        x = self.embed(ids.to(self.device))  # [T, D]
        for block in self.blocks:
            x = x + block(rms_norm(x, block.norm, self.cfg.rms_eps), run)
            if watch is not None:
                watch(block.block.layer, x)
        cache.length = start + ids.shape[0]
        return self.head(x[-1:] if last_only else x)
