"""The block kinds of modelfile/blocks.py in torch: what the eager forward and the hybrid step run.

Each kind is a class built from one Block (its weights asked of the loader by role) with one
body: `__call__(h, run)` for T tokens in the eager pass. MLA also has `decode(h, step)`, its
one-token body over fixed buffers for the hybrid step (the position comes from a device
tensor, so a CUDA graph can replay it); the MLP and MoE bodies are the same in both.

Shape key: T new tokens, S cached + new tokens, D hidden, H heads, R latent (kv_lora) width,
N nope dims, P rope dims, V value dims, E experts, A experts used per token.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_ops.attention import latent_attention_each, latent_attention_torch, masked_softmax_, mla_decode
from gpu_ops.capabilities import FLOATS
from gpu_ops.staging import ExpertStream
from hetero.kv_cache import KVCache
from hetero.loader import OpBuilder
from hetero.rope import apply_rope, attention_scales
from hetero.routing import route
from modelfile.blocks import MATRICES, STACKS, VECTORS, Block
from modelfile.config import ModelConfig
from modelfile.deepseek2_tensors import expanded_is_cheaper


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@dataclass
class Pass:
    """What an eager pass over T tokens gives every block: the cache, where the tokens start,
    their rope tables, and the MLA form: "auto" (token by token on the CPU engine, the cheaper
    of the batched forms elsewhere), "llama.cpp" (where llama.cpp rounds: see Mla.__call__), or
    "each" / "absorbed" / "expanded" (tests)."""

    cache: KVCache
    start: int
    cos: torch.Tensor
    sin: torch.Tensor
    attention_form: str = "auto"
    experts: ExpertStream | None = None  # the CPU's routed experts streamed to the GPU for this pass


class Body:
    """A block's weights by role, built as the plan places them."""

    def __init__(self, cfg: ModelConfig, ops: OpBuilder, block: Block, cache_layer: int):
        self.cfg, self.block, self.cache_layer = cfg, block, cache_layer
        self.norm = ops.vector(block.norm)
        self.ops = {}
        for role in MATRICES[block.kind]:
            if role in block.weights and role not in self.built_elsewhere():
                build = ops.stack if role in STACKS else ops.matrix
                self.ops[role] = build(block.weights[role])
        self.vectors = {r: ops.vector(block.weights[r]) for r in VECTORS[block.kind] if r in block.weights}

    def built_elsewhere(self) -> set[str]:
        """Roles a kind builds itself (the routed experts, as one bank)."""
        return set()

    def matrix_ops(self) -> list:
        return list(self.ops.values())

    def __getattr__(self, role: str):
        """A role's op or vector by name (None when the file lacks it); other names are errors."""
        kind = self.__dict__.get("block")
        if kind is None or role not in (*MATRICES[kind.kind], *VECTORS[kind.kind]):
            raise AttributeError(f"{type(self).__name__} has no role or attribute {role!r}")
        return self.__dict__["ops"].get(role, self.__dict__["vectors"].get(role))


class Mla(Body):
    """Multi-head latent attention over the latent cache rows [S, R + P]."""

    def __init__(self, cfg: ModelConfig, ops: OpBuilder, block: Block, cache_layer: int):
        super().__init__(cfg, ops, block, cache_layer)
        self.kq_scale = attention_scales(cfg).kq_scale
        if "kv_b" in block.weights:  # the legacy layout: split stacks for decoding, where the plan made room
            name = block.weights["kv_b"]
            kv_b = ops.joint_kv_b(name)
            if kv_b is not None:
                self.ops["kv_b"] = kv_b
            split = ops.split_stacks(name, cfg.n_head, cfg.qk_nope_dim, cfg.v_head_dim)
            if split is not None:
                self.ops["k_b"], self.ops["v_b"] = split
        ex = ops.executor
        self.workers = (ex.run, ex.n_threads) if ex is not None else ()  # what runs a prompt's attention
        # expanding through split k_b/v_b dequantizes them on every call, on the host unless on the GPU
        k_b = self.ops.get("k_b")
        self.expansion_dequantizes = self.kv_b is None and k_b.gpu is None and k_b.qtype not in FLOATS

    def built_elsewhere(self) -> set[str]:
        """The joint kv_b: kept or replaced by its derived stacks (OpBuilder.joint_kv_b)."""
        return {"kv_b"}

    def project(self, x: torch.Tensor, cos, sin):
        """Normed input [T, D] -> query (nope part [T, H, N], roped part [T, H, P]) and the
        tokens' cache rows [T, R + P] (normed latent, roped key)."""
        c = self.cfg
        q = self.q_b(rms_norm(self.q_a(x), self.q_a_norm, c.rms_eps)) if self.q_a is not None else self.q(x)
        q = q.view(x.shape[0], c.n_head, c.qk_head_dim)  # [T, H, N+P]
        q_nope, q_rope = q[..., : c.qk_nope_dim], apply_rope(q[..., c.qk_nope_dim :], cos, sin)
        kv = self.kv_a(x)  # [T, R+P]
        latent = rms_norm(kv[:, : c.kv_lora_rank], self.kv_a_norm, c.rms_eps)  # [T, R]
        k_rope = apply_rope(kv[:, c.kv_lora_rank :], cos, sin)  # [T, P]
        return q_nope, q_rope, torch.cat([latent, k_rope], dim=-1)

    def wk_wv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK as wk [H, R, N] and W_UV as wv [H, V, R], dequantized (float32). Current GGUFs
        store them split (k_b [H, R, N], v_b [H, V, R]); older ones joint, kv_b [H*(N+V), R],
        whose split stacks the loader derives unless the plan runs kv_b on the reference path."""
        c = self.cfg
        if self.k_b is not None:
            return self.k_b.all(), self.v_b.all()
        kv = self.kv_b.weight_rows(0, self.kv_b.out_features).view(c.n_head, c.qk_nope_dim + c.v_head_dim, -1)
        return kv[:, : c.qk_nope_dim].transpose(1, 2), kv[:, c.qk_nope_dim :]

    def absorb_q(self, q_nope: torch.Tensor) -> torch.Tensor:
        """[T, H, N] -> q_nope @ W_UK per head: [T, H, R]."""
        if self.k_b is not None:
            return self.k_b.per_matrix(q_nope)
        return torch.einsum("thn,hrn->thr", q_nope, self.wk_wv()[0].to(q_nope.device))

    def latent_out(self, o: torch.Tensor) -> torch.Tensor:
        """Latent attention output [T, H, R] -> W_UV per head, then the output projection [T, D]."""
        if self.v_b is not None:
            return self.values_out(self.v_b.per_matrix(o))
        return self.values_out(torch.einsum("thr,hvr->thv", o, self.wk_wv()[1].to(o.device)))

    def values_out(self, o: torch.Tensor) -> torch.Tensor:
        """Per-head values [T, H, V] -> the output projection [T, D]."""
        return self.out(o.reshape(o.shape[0], self.cfg.n_head * self.cfg.v_head_dim))

    def __call__(self, x: torch.Tensor, run: Pass) -> torch.Tensor:
        """T tokens. On the CPU engine, absorbed and one token at a time ("each"): with its
        prompt sums, a token's result is then the same in any split of the prompt, which the
        prompt cache relies on (docs/ARCHITECTURE.md, "Prompts are batch-invariant").
        Elsewhere (a GPU, the reference path), absorbed or expanded, whichever costs fewer
        multiply-adds (their products are not batch-invariant anyway). Or as llama.cpp runs
        them, so that its int8 activation rounding falls on the same values: absorbed with
        split k_b/v_b (q_nope and the latent output go through them as int8), expanded with the
        joint kv_b (the latents go through it as int8)."""
        t, start = x.shape[0], run.start
        q_nope, q_rope, rows = self.project(x, run.cos, run.sin)
        run.cache.write(self.cache_layer, start, rows)
        cached = run.cache.read(self.cache_layer, start + t)  # [S, R+P]
        future = None  # over the new positions only: every token sees all that was cached before
        if t > 1:  # a single new token sees every cached position: nothing to mask
            new = torch.arange(t, device=x.device)
            future = (new[None, :] > new[:, None])[:, None, :]  # [T, 1, T]
        form = run.attention_form
        if form == "auto" and x.device.type == "cpu" and self.workers:  # the CPU engine: batch-invariant
            form = "each"
        elif form == "auto":
            form = "expanded" if expanded_is_cheaper(self.cfg, t, start + t, self.expansion_dequantizes) else "absorbed"
        elif form == "llama.cpp":
            form = "absorbed" if self.kv_b is None else "expanded"
        if form == "each":
            o = latent_attention_each(self.absorb_q(q_nope), q_rope, cached, start, self.kq_scale, *self.workers)
            return self.latent_out(o)
        if form == "absorbed":
            o = latent_attention_torch(self.absorb_q(q_nope), q_rope, cached, self.kq_scale, future)  # [T, H, R]
            return self.latent_out(o)
        c = self.cfg
        latents, k_ropes = cached.float().split([c.kv_lora_rank, c.qk_rope_dim], dim=-1)
        keys, values = self.expand(latents)  # [H, S, N], [H, S, V]
        # head-major batched products, one buffer of scores (an einsum over [T, H, ...] copies)
        scores = torch.bmm(q_nope.transpose(0, 1), keys.transpose(1, 2))  # [H, T, S]
        scores.view(-1, scores.shape[-1]).addmm_(q_rope.transpose(0, 1).reshape(-1, c.qk_rope_dim), k_ropes.T)
        hidden = None if future is None else future.transpose(0, 1)  # [1, T, T]
        probs = masked_softmax_(scores.mul_(self.kq_scale), hidden)
        return self.values_out(torch.bmm(probs, values).transpose(0, 1))  # [T, H, V]

    def expand(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached latents [S, R] -> keys [H, S, N] and values [H, S, V]: through the joint kv_b
        as one matmul on its backend (int8 latents on the CPU engine, as llama.cpp), or through
        the dequantized k_b and v_b."""
        c = self.cfg
        if self.kv_b is not None:
            kv = self.kv_b(latents).view(-1, c.n_head, c.qk_nope_dim + c.v_head_dim).transpose(0, 1)  # [H, S, N+V]
            return kv[..., : c.qk_nope_dim], kv[..., c.qk_nope_dim :]
        wk, wv = self.wk_wv()  # [H, R, N], [H, V, R]
        keys = torch.einsum("sr,hrn->hsn", latents, wk.to(latents.device))
        return keys, torch.einsum("sr,hvr->hsv", latents, wv.to(latents.device))

    def decode(self, x: torch.Tensor, step) -> torch.Tensor:
        """One token [1, D] at the position in step.pos (a device tensor), over the cache's
        fixed buffer; graph-capturable when step.captured (no host-side length then)."""
        cos, sin = step.cos.index_select(0, step.pos), step.sin.index_select(0, step.pos)
        q_nope, q_rope, row = self.project(x, cos, sin)
        step.cache.write_at(self.cache_layer, step.pos, row)
        known = None if step.captured else step.cache.length + 1
        rows = step.cache.layer(self.cache_layer)
        o = mla_decode(self.absorb_q(q_nope)[0], q_rope[0], rows, step.length, self.kq_scale, known)  # [H, R]
        return self.latent_out(o[None])


def gated_mlp(body: Body, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with a block's gate, up and down: the MLP and the shared experts."""
    return body.down(F.silu(body.gate(x)) * body.up(x))


class Mlp(Body):
    def __call__(self, x: torch.Tensor, run: Pass | None = None) -> torch.Tensor:
        return gated_mlp(self, x)

    decode = __call__


class Moe(Body):
    """Router -> routed experts (one ExpertBank, on the CPU engine's workers or the GPU) plus the
    shared experts, an MLP beside them unless the plan fuses them into the experts' hand-off."""

    def __init__(self, cfg: ModelConfig, ops: OpBuilder, block: Block, cache_layer: int):
        super().__init__(cfg, ops, block, cache_layer)
        w = block.weights
        shared = tuple(w.get(r) for r in ("gate", "up", "down"))
        self.experts = ops.experts(block.layer, w["gate_exps"], w["up_exps"], w["down_exps"], shared)
        self.streamed: int | None = None  # this layer's place in the pass's ExpertStream, if it has one

    def built_elsewhere(self) -> set[str]:
        return {"gate_exps", "up_exps", "down_exps"}

    def matrix_ops(self) -> list:
        return [*self.ops.values(), self.experts]

    @property
    def shared_on_side(self) -> bool:
        """Whether the shared experts run beside the routed ones (not inside their hand-off)."""
        return self.gate is not None and not self.experts.includes_shared

    @property
    def hands_off(self) -> bool:
        """Whether the routed experts run outside the GPU's stream (the hybrid step ends a segment
        here): everything but the GPU formats' gathered kernels, which read their expert ids on
        the device; the CPU engine and the reference path (whose per-expert loop reads the ids
        on the host, so it cannot sit inside a captured graph) hand off."""
        return self.experts.gpu is None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> expert ids [T, A] and their weights [T, A]."""
        c = self.cfg
        return route(self.router(x), c.n_expert_used, c.gating, self.bias, c.n_group, c.n_group_used,
                     c.norm_topk, c.routed_scale)  # fmt: skip

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(self, x)

    def __call__(self, x: torch.Tensor, run: Pass | None = None) -> torch.Tensor:
        ids, weights = self.route(x)
        streamed = run is not None and run.experts is not None and self.streamed is not None
        if not streamed:
            on_cpu = self.experts.submit(x, ids, weights)  # routed (and fused shared) experts on the CPU workers
        elif self.experts.includes_shared:
            on_cpu = self.experts.submit_shared(x)  # the fused shared ones, while the GPU runs the routed ones
        else:
            on_cpu = None
        side = self.shared(x) if self.shared_on_side else None
        out = run.experts.run(self.streamed, x, ids, weights).to(x.dtype) if streamed else on_cpu.wait()
        if streamed and on_cpu is not None:
            out = out + on_cpu.wait()
        return out if side is None else out + side

    def decode(self, x: torch.Tensor, step=None) -> torch.Tensor:
        """One token of the hybrid step (which passes itself as `step`): experts where they live."""
        return self(x)


KINDS = {"mla": Mla, "mlp": Mlp, "moe": Moe}
