"""The deepseek2 forward pass (DeepSeek-V2/V2.5/V3/R1, Kimi-K2), written against small op interfaces.

Shape key: T new tokens, S cached + new tokens, D hidden, H heads, R latent (kv_lora) width,
N nope dims, P rope dims, V value dims, E experts, A experts used per token.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hetero.kv_cache import LatentKVCache
from hetero.loader import OpBuilder
from hetero.ops import ExpertBank, QuantLinear
from hetero.rope import apply_rope, attention_scales, rope_tables
from hetero.routing import route
from modelfile.config import ModelConfig

SCORES_BYTES = 256 << 20  # attention scores of one layer for one prefill pass (the planner's activations hold them)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class HeadWeights:
    """MLA's per-head up-projections from the latent, in the absorbed form the attention uses.

    Current GGUFs store them split (attn_k_b [H, R, N], attn_v_b [H, V, R]) and are multiplied
    per head from the quantized weights; older ones store attn_kv_b [H*(N+V), R], dequantized
    per call into wk [H, R, N] and wv [H, V, R].
    """

    def __init__(self, cfg: ModelConfig, ops: OpBuilder, prefix: str):
        self.cfg = cfg
        if cfg.split_kv_b:
            self.k_b, self.v_b = ops.stack(prefix + "attn_k_b.weight"), ops.stack(prefix + "attn_v_b.weight")
        else:
            self.kv_b = ops.matrix(prefix + "attn_kv_b.weight")

    def absorb_q(self, q_nope: torch.Tensor) -> torch.Tensor:
        """[T, H, N] -> q_nope @ W_UK per head: [T, H, R]."""
        if self.cfg.split_kv_b:
            return self.k_b.per_matrix(q_nope)
        return torch.einsum("thn,hrn->thr", q_nope, self.wk_wv()[0].to(q_nope.device))

    def expand_v(self, o: torch.Tensor) -> torch.Tensor:
        """[T, H, R] latent attention output -> W_UV per head: [T, H, V]."""
        if self.cfg.split_kv_b:
            return self.v_b.per_matrix(o)
        return torch.einsum("thr,hvr->thv", o, self.wk_wv()[1].to(o.device))

    def wk_wv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK as wk [H, R, N] and W_UV as wv [H, V, R], dequantized (float32)."""
        c = self.cfg
        if c.split_kv_b:
            return self.k_b.all(), self.v_b.all()
        kv = self.kv_b.weight_rows(0, self.kv_b.out_features).view(c.n_head, c.qk_nope_dim + c.v_head_dim, -1)
        return kv[:, : c.qk_nope_dim].transpose(1, 2), kv[:, c.qk_nope_dim :]


def expanded_is_cheaper(c: ModelConfig, t: int, s: int) -> bool:
    """Whether T new tokens over S positions cost fewer multiply-adds with the cache expanded.

    Absorbed: T*H*R*(N+V) to move the queries into the latent space and the outputs back, then
    T*S*H*(2R+P): every score and value product is R wide. Expanded: S*H*R*(N+V) to turn every
    cached latent into keys and values, then T*S*H*(N+P+V). Expanded is cheaper when the share
    of positions cached before this call, (S-T)/S, is below T(2R-N-V)/(R(N+V)): for
    DeepSeek-V3 (R 512, N 128, P 64, V 128) that is T/171. So a prompt on a fresh cache is
    expanded, a decoded token over a cache is absorbed, and from 171 new tokens on a chunk is
    expanded however long the cache.
    """
    h, r, n, p, v = c.n_head, c.kv_lora_rank, c.qk_nope_dim, c.qk_rope_dim, c.v_head_dim
    absorbed = t * h * (n * r + s * (2 * r + p) + r * v)
    expanded = h * s * r * (n + v) + t * h * s * (n + p + v)
    return expanded < absorbed


@dataclass
class Layer:
    attn_norm: torch.Tensor
    q: QuantLinear | None
    q_a: QuantLinear | None
    q_a_norm: torch.Tensor | None
    q_b: QuantLinear | None
    kv_a: QuantLinear
    kv_a_norm: torch.Tensor
    heads: HeadWeights
    out: QuantLinear
    ffn_norm: torch.Tensor
    # dense FFN (leading layers) or shared experts (MoE layers)
    gate: QuantLinear | None
    up: QuantLinear | None
    down: QuantLinear | None
    router: QuantLinear | None = None
    router_bias: torch.Tensor | None = None
    experts: ExpertBank | None = None

    @property
    def attention_on_cpu_engine(self) -> bool:
        """Whether every attention matmul runs through the CPU kernels (the native decode step)."""
        mats = [self.q] if self.q is not None else [self.q_a, self.q_b]
        mats += [self.kv_a, self.out, getattr(self.heads, "k_b", None), getattr(self.heads, "v_b", None)]
        return all(m is not None and m.cpu is not None for m in mats)


def build_layers(cfg: ModelConfig, ops: OpBuilder) -> list[Layer]:
    """Each weight as the plan places it (ops); small vectors (norms, biases) live with the activations."""
    lin, vec = ops.matrix, ops.vector

    def experts(i: int, prefix: str) -> ExpertBank:
        names = [prefix + f"ffn_{w}_exps.weight" for w in ("gate", "up", "down")]
        shared = tuple(prefix + f"ffn_{w}_shexp.weight" for w in ("gate", "up", "down"))
        return ops.experts(i, *names, shared)

    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        moe = cfg.is_moe(i)
        ffn = "_shexp" if moe else ""
        layers.append(
            Layer(
                attn_norm=vec(p + "attn_norm.weight"),
                q=lin(p + "attn_q.weight"),
                q_a=lin(p + "attn_q_a.weight"),
                q_a_norm=vec(p + "attn_q_a_norm.weight"),
                q_b=lin(p + "attn_q_b.weight"),
                kv_a=lin(p + "attn_kv_a_mqa.weight"),
                kv_a_norm=vec(p + "attn_kv_a_norm.weight"),
                heads=HeadWeights(cfg, ops, p),
                out=lin(p + "attn_output.weight"),
                ffn_norm=vec(p + "ffn_norm.weight"),
                gate=lin(p + f"ffn_gate{ffn}.weight"),
                up=lin(p + f"ffn_up{ffn}.weight"),
                down=lin(p + f"ffn_down{ffn}.weight"),
                router=lin(p + "ffn_gate_inp.weight") if moe else None,
                router_bias=vec(p + "exp_probs_b.bias") if moe else None,
                experts=experts(i, p) if moe else None,
            )
        )
    return layers


class DeepSeek2:
    """Embedding -> layers (MLA attention, dense FFN or MoE) -> norm -> logits."""

    def __init__(self, cfg: ModelConfig, ops: OpBuilder, cache_dtype: torch.dtype = torch.float32):
        """ops: the plan's weights (hetero.loader); activations and the cache live at ops.home;
        cache_dtype: the plan's (bfloat16 on a GPU, float32 on the CPU)."""
        self.cfg = cfg
        self.device = ops.home
        self.embed = ops.embedding("token_embd.weight")
        self.layers = build_layers(cfg, ops)
        self.output_norm = ops.vector("output_norm.weight")
        head = "output.weight" if "output.weight" in ops.tensors else "token_embd.weight"
        self.output = ops.matrix(head)
        self.kq_scale = attention_scales(cfg).kq_scale
        self.attention_form = "auto"  # or "absorbed" / "expanded" (tests compare the two)
        self.cache_dtype = cache_dtype
        self.decode_step = None  # one-token step: NativeDecode (all on the CPU engine) or HybridDecode (GPU)

    def matrix_ops(self):
        """Every op that multiplies by a weight matrix: what the plan's backends are checked against."""
        for layer in self.layers:
            heads = layer.heads
            yield from (heads.k_b, heads.v_b) if self.cfg.split_kv_b else (heads.kv_b,)
            for op in (layer.q, layer.q_a, layer.q_b, layer.kv_a, layer.out, layer.gate, layer.up, layer.down):
                if op is not None:
                    yield op
            if layer.router is not None:
                yield layer.router
            if layer.experts is not None:
                yield layer.experts
        yield self.output

    def prefill_chunk(self, positions: int) -> int:
        """Tokens per prefill pass so that one layer's attention scores [T, H, S] (float32) stay
        within SCORES_BYTES; at least 64, so short contexts are never split."""
        return max(64, SCORES_BYTES // (4 * self.cfg.n_head * positions))

    def new_cache(self, max_tokens: int) -> LatentKVCache:
        c = self.cfg
        return LatentKVCache(c.n_layer, max_tokens, c.kv_lora_rank, c.qk_rope_dim, self.device, self.cache_dtype)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: LatentKVCache, last_only: bool = False, watch=None) -> torch.Tensor:
        """ids [T] at positions cache.length.. -> logits [T, vocab] (or [1, vocab] if last_only).
        `watch(layer, x)` sees the residual stream after each layer (diagnosis; this path only)."""
        start = cache.length
        if start + ids.shape[0] > cache.max_tokens:
            raise ValueError(f"context full: {start} + {ids.shape[0]} tokens > {cache.max_tokens}")
        if self.decode_step is not None and ids.shape[0] == 1 and watch is None:
            return self.decode_step(int(ids[0]), cache)
        chunk = self.prefill_chunk(start + ids.shape[0])
        if ids.shape[0] > chunk:  # a long prompt goes through in chunks: bounded attention scores
            parts = [self.forward(ids[i : i + chunk], cache, last_only, watch) for i in range(0, ids.shape[0], chunk)]
            return parts[-1] if last_only else torch.cat(parts)
        positions = torch.arange(start, start + ids.shape[0])
        cos, sin = rope_tables(self.cfg, positions, self.device)
        x = self.embed(ids.to(self.device))  # [T, D]
        for i, layer in enumerate(self.layers):
            x = x + self.attention(i, layer, rms_norm(x, layer.attn_norm, self.cfg.rms_eps), cache, start, cos, sin)
            h = rms_norm(x, layer.ffn_norm, self.cfg.rms_eps)
            x = x + (self.moe(layer, h) if layer.experts else self.mlp(layer, h))
            if watch is not None:
                watch(i, x)
        cache.length = start + ids.shape[0]
        if last_only:
            x = x[-1:]
        return self.output(rms_norm(x, self.output_norm, self.cfg.rms_eps))

    def project(self, layer: Layer, x: torch.Tensor, cos, sin):
        """Normed input [T, D] -> query (nope part [T, H, N], roped part [T, H, P]) and this
        token's cache entry (latent [T, R], roped key [T, P])."""
        c = self.cfg
        if layer.q_a is not None:
            q = layer.q_b(rms_norm(layer.q_a(x), layer.q_a_norm, c.rms_eps))
        else:
            q = layer.q(x)
        q = q.view(x.shape[0], c.n_head, c.qk_head_dim)  # [T, H, N+P]
        q_nope, q_rope = q[..., : c.qk_nope_dim], apply_rope(q[..., c.qk_nope_dim :], cos, sin)
        kv = layer.kv_a(x)  # [T, R+P]
        latent = rms_norm(kv[:, : c.kv_lora_rank], layer.kv_a_norm, c.rms_eps)  # [T, R]
        k_rope = apply_rope(kv[:, c.kv_lora_rank :], cos, sin)  # [T, P]
        return q_nope, q_rope, latent, k_rope

    def attention_out(self, layer: Layer, o: torch.Tensor) -> torch.Tensor:
        """Latent attention output [T, H, R] -> W_UV per head, then the output projection [T, D]."""
        return self.project_out(layer, layer.heads.expand_v(o))

    def project_out(self, layer: Layer, o: torch.Tensor) -> torch.Tensor:
        """Per-head values [T, H, V] -> the output projection [T, D]."""
        return layer.out(o.reshape(o.shape[0], self.cfg.n_head * self.cfg.v_head_dim))

    def attention(self, i: int, layer: Layer, x: torch.Tensor, cache: LatentKVCache, start: int, cos, sin):
        """MLA over the latent cache, absorbed or expanded, whichever costs fewer multiply-adds."""
        t = x.shape[0]
        q_nope, q_rope, latent, k_rope = self.project(layer, x, cos, sin)
        cache.write(i, start, latent, k_rope)
        latents, k_ropes = (v.float() for v in cache.read(i, start + t))  # [S, R], [S, P]
        form = self.attention_form
        if form == "auto":
            form = "expanded" if expanded_is_cheaper(self.cfg, t, start + t) else "absorbed"
        if form == "expanded":
            wk, wv = layer.heads.wk_wv()  # [H, R, N], [H, V, R]
            keys = torch.einsum("sr,hrn->hsn", latents, wk.to(x.device))  # [H, S, N]
            values = torch.einsum("sr,hvr->hsv", latents, wv.to(x.device))  # [H, S, V]
            scores = torch.einsum("thn,hsn->ths", q_nope, keys)
        else:
            scores = torch.matmul(layer.heads.absorb_q(q_nope), latents.T)  # [T, H, R] x [R, S]
        scores = scores.add_(torch.matmul(q_rope, k_ropes.T)).mul_(self.kq_scale)  # [T, H, S]
        if t > 1:  # a single new token sees every cached position: nothing to mask
            future = (
                torch.arange(start + t, device=x.device)[None, :]
                > torch.arange(start, start + t, device=x.device)[:, None]
            )
            scores = scores.masked_fill(future[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if form == "expanded":
            return self.project_out(layer, torch.einsum("ths,hsv->thv", probs, values))
        return self.attention_out(layer, torch.matmul(probs, latents))  # latent output [T, H, R]

    @staticmethod
    def mlp(layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return layer.down(F.silu(layer.gate(x)) * layer.up(x))

    def route(self, layer: Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> expert ids [T, A] and their weights [T, A]."""
        c = self.cfg
        logits = layer.router(x)  # [T, E]
        return route(logits, c.n_expert_used, c.gating, layer.router_bias, c.n_group, c.n_group_used,
                     c.norm_topk, c.routed_scale)  # fmt: skip

    @staticmethod
    def shared_on_side(layer: Layer) -> bool:
        """Whether the shared experts run beside the routed ones (not inside their hand-off)."""
        return layer.gate is not None and not layer.experts.includes_shared

    def moe(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(layer, x)
        routed = layer.experts.submit(x, ids, weights)  # runs on the CPU workers meanwhile
        shared = self.mlp(layer, x) if self.shared_on_side(layer) else None
        out = routed.wait()
        return out if shared is None else out + shared
