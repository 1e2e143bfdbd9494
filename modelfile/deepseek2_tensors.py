"""The tensor inventory of a deepseek2 GGUF: every name and numpy-order shape a config implies.

One table serves three readers: the loader validates files against it, the synthetic writer
creates exactly these tensors, and the planner costs them.
"""

from gguf import GGMLQuantizationType as QT

from modelfile.blocks import Block, Description
from modelfile.config import ModelConfig


def expected_tensors(cfg: ModelConfig, tied_output: bool = False) -> dict[str, tuple[int, ...]]:
    """name -> shape (rows are output features), in file order; optional tensors excluded."""
    d, h, r = cfg.n_embd, cfg.n_head, cfg.kv_lora_rank
    nope, rope, v = cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.n_vocab, d)}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        if cfg.q_lora_rank:
            shapes[p + "attn_q_a.weight"] = (cfg.q_lora_rank, d)
            shapes[p + "attn_q_a_norm.weight"] = (cfg.q_lora_rank,)
            shapes[p + "attn_q_b.weight"] = (h * (nope + rope), cfg.q_lora_rank)
        else:
            shapes[p + "attn_q.weight"] = (h * (nope + rope), d)
        shapes[p + "attn_kv_a_mqa.weight"] = (r + rope, d)
        shapes[p + "attn_kv_a_norm.weight"] = (r,)
        if cfg.split_kv_b:
            shapes[p + "attn_k_b.weight"] = (h, r, nope)
            shapes[p + "attn_v_b.weight"] = (h, v, r)
        else:
            shapes[p + "attn_kv_b.weight"] = (h * (nope + v), r)
        shapes[p + "attn_output.weight"] = (d, h * v)
        shapes[p + "ffn_norm.weight"] = (d,)
        if not cfg.is_moe(i):
            shapes[p + "ffn_gate.weight"] = (cfg.n_ff_dense, d)
            shapes[p + "ffn_up.weight"] = (cfg.n_ff_dense, d)
            shapes[p + "ffn_down.weight"] = (d, cfg.n_ff_dense)
            continue
        e, f = cfg.n_expert, cfg.n_ff_expert
        shapes[p + "ffn_gate_inp.weight"] = (e, d)
        shapes[p + "ffn_gate_exps.weight"] = (e, f, d)
        shapes[p + "ffn_up_exps.weight"] = (e, f, d)
        shapes[p + "ffn_down_exps.weight"] = (e, d, f)
        if cfg.n_expert_shared:
            fs = f * cfg.n_expert_shared
            shapes[p + "ffn_gate_shexp.weight"] = (fs, d)
            shapes[p + "ffn_up_shexp.weight"] = (fs, d)
            shapes[p + "ffn_down_shexp.weight"] = (d, fs)
    shapes["output_norm.weight"] = (d,)
    if not tied_output:
        shapes["output.weight"] = (cfg.n_vocab, d)
    return shapes


def optional_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensors a file may omit: the V3 selection bias per MoE layer."""
    return {f"blk.{i}.exp_probs_b.bias": (cfg.n_expert,) for i in range(cfg.n_layer) if cfg.is_moe(i)}


FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


def derived_at_load(cfg, name: str, qtype) -> tuple[tuple[QT, tuple[int, ...]], ...]:
    """(type, numpy shape) of each stack the loader derives from a tensor and decodes with
    instead (hetero.ops.split_joint_kv_b), on the CPU engine and on the GPU alike; () for most.

    The legacy joint attn_kv_b [H*(N+V), R] becomes the split layout's stacks: W_UK transposed
    per head, [H, R, N], in float (a transposed quantized block is not a block: float16, or the
    file's own float type), and its W_UV rows [H, V, R] as they are. On the CPU the file's
    kv_b stays mapped beside them (a prompt multiplies its latents by it, as llama.cpp does);
    on the GPU only the stacks are made."""
    if not name.endswith(".attn_kv_b.weight"):
        return ()
    h, n, v, r = cfg.n_head, cfg.qk_nope_dim, cfg.v_head_dim, cfg.kv_lora_rank
    return ((qtype if qtype in FLOAT_TYPES else QT.F16, (h, r, n)), (qtype, (h, v, r)))


def expert_trios(names) -> list[tuple[str, str, str]]:
    """(gate, up, down) names of each layer's routed experts among `names`: they run as one op."""
    gates = sorted(n for n in names if n.endswith(".ffn_gate_exps.weight"))
    return [(g, g.replace("gate_exps", "up_exps"), g.replace("gate_exps", "down_exps")) for g in gates]


def shared_trio(routed_gate: str) -> tuple[str, str, str]:
    """The layer's shared-expert (gate, up, down) names, from its routed gate's name."""
    prefix = routed_gate[: -len("ffn_gate_exps.weight")]
    return tuple(prefix + f"ffn_{w}_shexp.weight" for w in ("gate", "up", "down"))


def cached_values_per_token(cfg: ModelConfig) -> int:
    """MLA caches the latent (kv_lora_rank) and the rope part of the key per token and layer."""
    return cfg.kv_lora_rank + cfg.qk_rope_dim


def attention_flops(cfg: ModelConfig, ctx: int) -> float:
    """Scores and the weighted sum over a ctx-long latent cache, absorbed form, per token."""
    return 2 * 2 * cfg.n_head * (cfg.kv_lora_rank + cfg.qk_rope_dim) * ctx


# the reference dequantizer's time per value, in multiply-adds of torch's float matmul: about 4 ns
# against 0.04 ns on 2 cores (measured 2026-12-01 on V2-Lite's k_b/v_b, Q5_0 and Q4_K)
DEQUANTIZE_MACS = 100


def expanded_is_cheaper(c: ModelConfig, t: int, s: int, dequantizes: bool = False) -> bool:
    """Whether T new tokens over S positions cost fewer multiply-adds with the cache expanded.

    Absorbed: T*H*R*(N+V) to move the queries into the latent space and the outputs back, then
    T*S*H*(2R+P): every score and value product is R wide. Expanded: S*H*R*(N+V) to turn every
    cached latent into keys and values, then T*S*H*(N+P+V). Expanded is cheaper when the share
    of positions cached before this call, (S-T)/S, is below T(2R-N-V)/(R(N+V)): for
    DeepSeek-V3 (R 512, N 128, P 64, V 128) that is T/171. So a prompt on a fresh cache is
    expanded, a decoded token over a cache is absorbed, and from 171 new tokens on a chunk is
    expanded however long the cache. `dequantizes`: expanding must first dequantize W_UK and
    W_UV (H*R*(N+V) values, DEQUANTIZE_MACS each), which moves a fresh prompt's crossing on
    V2-Lite from a handful of tokens to about 140 (measured: absorbed 1.6x faster at 64 tokens,
    expanded 1.5x at 512).
    """
    h, r, n, p, v = c.n_head, c.kv_lora_rank, c.qk_nope_dim, c.qk_rope_dim, c.v_head_dim
    absorbed = t * h * (n * r + s * (2 * r + p) + r * v)
    expanded = h * s * r * (n + v) + t * h * s * (n + p + v) + dequantizes * DEQUANTIZE_MACS * h * r * (n + v)
    return expanded < absorbed


SCORES_BYTES = 256 << 20  # one layer's attention scores in a prefill pass, float32


def prefill_chunk(cfg: ModelConfig, positions: int) -> int:
    """Tokens per prefill pass when the pass ends at `positions`: one layer's attention scores
    [H, T, S] stay within SCORES_BYTES; at least 64, so short contexts are never split."""
    return max(64, SCORES_BYTES // (4 * cfg.n_head * positions))


def prefill_host_bytes(cfg: ModelConfig, positions: int, on_gpu: bool, token_workers: int = 0) -> int:
    """What a prefill pass ending at `positions` holds in host RAM at its peak, float32: on the
    CPU engine (token_workers > 0: attention token by token on that many workers), each
    worker's one token of scores and probabilities; on the CPU otherwise, its attention scores
    (one buffer) and the new positions' mask, the keys and values the
    expanded form makes of every cached latent where the cost rule takes it for that chunk
    (float32 latents, keys, keys transposed for the batched product, values; not for V3's
    64-token chunks at a long context, where they would be gigabytes), and per token the
    residual stream and the largest block's buffers (the dense MLP's four of F, or MLA's
    queries and latent outputs, or the MoE's pairs of tokens and experts), plus one row of
    logits. With the blocks on the GPU the host holds only the routed experts' hand-off: their
    input, the pairs' hidden values and the output."""
    t = min(prefill_chunk(cfg, positions), positions)
    d, h, r, p = cfg.n_embd, cfg.n_head, cfg.kv_lora_rank, cfg.qk_rope_dim
    pairs = cfg.n_expert_used * cfg.n_ff_expert  # routed hidden values per token
    if on_gpu:
        return 4 * t * (2 * d + 2 * pairs)
    n, v = cfg.qk_nope_dim, cfg.v_head_dim
    scores = 4 * h * t * positions + t * t  # and the mask of the new positions
    if token_workers:
        scores = 2 * 4 * h * positions * token_workers
    expanded = 0  # latents, keys (and transposed), values, where the chunk takes that form
    if not token_workers and expanded_is_cheaper(cfg, t, positions):
        expanded = 4 * positions * (h * (2 * n + v) + r + p)
    mla = h * (n + 2 * p) + 2 * (r + p) + 2 * h * max(r, v)
    mlp = 4 * max(cfg.n_ff_dense, cfg.n_ff_expert * cfg.n_expert_shared)
    moe = cfg.n_expert + 4 * cfg.n_ff_expert * cfg.n_expert_shared + 2 * pairs
    return scores + expanded + 4 * t * (4 * d + max(mla, mlp, moe)) + 4 * cfg.n_vocab


def prefill_values_per_token(cfg: ModelConfig) -> int:
    """A prefill token's activations on the GPU: latent queries of all heads (twice), 8 hidden-size buffers."""
    return 2 * cfg.n_head * (cfg.kv_lora_rank + cfg.qk_rope_dim) + 8 * cfg.n_embd


def describe(cfg: ModelConfig, names) -> Description:
    """The model as blocks (modelfile/blocks.py): per layer an MLA block, then an MLP (leading
    dense layers) or an MoE block. names: the file's tensors (optional ones are left out)."""
    present = set(names)

    def roles(prefix: str, table: dict[str, str]) -> dict[str, str]:
        return {role: prefix + t for role, t in table.items() if prefix + t in present}

    blocks = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        blocks.append(Block("mla", i, p + "attn_norm.weight", roles(p, _MLA)))
        kind = "moe" if cfg.is_moe(i) else "mlp"
        blocks.append(Block(kind, i, p + "ffn_norm.weight", roles(p, _MOE if kind == "moe" else _MLP)))
    head = "output.weight" if "output.weight" in present else "token_embd.weight"
    return Description("token_embd.weight", tuple(blocks), "output_norm.weight", head)


_MLA = {
    "q": "attn_q.weight", "q_a": "attn_q_a.weight", "q_a_norm": "attn_q_a_norm.weight", "q_b": "attn_q_b.weight",
    "kv_a": "attn_kv_a_mqa.weight", "kv_a_norm": "attn_kv_a_norm.weight", "k_b": "attn_k_b.weight",
    "v_b": "attn_v_b.weight", "kv_b": "attn_kv_b.weight", "out": "attn_output.weight",
}  # fmt: skip
_MLP = {"gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight"}
_MOE = {
    "router": "ffn_gate_inp.weight", "bias": "exp_probs_b.bias", "gate_exps": "ffn_gate_exps.weight",
    "up_exps": "ffn_up_exps.weight", "down_exps": "ffn_down_exps.weight", "gate": "ffn_gate_shexp.weight",
    "up": "ffn_up_shexp.weight", "down": "ffn_down_shexp.weight",
}  # fmt: skip
