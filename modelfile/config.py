"""ModelConfig: every deepseek2 hyperparameter, read from GGUF metadata and checked in one place."""

import math
from dataclasses import dataclass

from modelfile.errors import HeteroError

GATING = {0: "softmax", 1: "softmax", 2: "sigmoid"}  # 0: old V2 files that predate the key


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_embd: int  # D
    n_head: int  # H
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    q_lora_rank: int  # 0: q comes from one plain projection (V2-Lite)
    kv_lora_rank: int  # R, the latent width cached per token
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    split_kv_b: bool  # True: attn_k_b + attn_v_b tensors; False: legacy attn_kv_b
    n_ff_dense: int
    n_ff_expert: int
    n_expert: int  # E
    n_expert_used: int  # A
    n_expert_shared: int
    n_dense_lead: int
    gating: str  # "softmax" | "sigmoid"
    n_group: int
    n_group_used: int
    norm_topk: bool
    routed_scale: float
    rope_base: float
    rope_scaling: str  # "none" | "linear" | "yarn"
    rope_factor: float  # context extension factor; 1.0 means none
    yarn_orig_ctx: int
    yarn_log_mul: float  # mscale_all_dim of the original config
    yarn_beta_fast: float
    yarn_beta_slow: float
    rope_attn_factor: float

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layer - self.n_dense_lead

    def is_moe(self, layer: int) -> bool:
        return layer >= self.n_dense_lead


def config_from_metadata(meta: dict) -> ModelConfig:
    """Build and validate the config; a missing or inconsistent key is a HeteroError naming it."""
    arch = meta.get("general.architecture")  # the family registry (modelfile/families.py) checked it

    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required:
            raise HeteroError(f"GGUF metadata lacks required key {full}")
        return default

    def integer(key, default=None, required=False) -> int:
        """A count or width: an integer (a per-layer array whose entries agree), 0 to 2**31."""
        value = _scalar(get(key, default, required), f"{arch}.{key}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or not 0 <= value < 2**31:
            raise HeteroError(f"GGUF metadata {arch}.{key} is {_shown(value)} where a count belongs")
        return int(value)

    def number(key, default=None, required=False) -> float:
        """A finite real number (scales, epsilons, rope constants)."""
        value = _scalar(get(key, default, required), f"{arch}.{key}")
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise HeteroError(f"GGUF metadata {arch}.{key} is {_shown(value)} where a finite number belongs")
        return float(value)

    split_kv_b = f"{arch}.attention.key_length_mla" in meta
    key_len = integer("attention.key_length_mla" if split_kv_b else "attention.key_length", required=True)
    v_len = integer("attention.value_length_mla" if split_kv_b else "attention.value_length", required=True)
    rope_dim = integer("rope.dimension_count", required=True)
    n_vocab = integer("vocab_size", 0) or len(meta.get("tokenizer.ggml.tokens", ()) or ()) or None
    if n_vocab is None:
        raise HeteroError(f"GGUF metadata lacks {arch}.vocab_size and a token list")
    gating_id = integer("expert_gating_func", 0)
    if gating_id not in GATING:
        raise HeteroError(f"unsupported {arch}.expert_gating_func {gating_id} (1 softmax, 2 sigmoid)")
    scaling = get("rope.scaling.type", "none" if get("rope.scaling.factor") is None else "linear")
    if scaling not in ("none", "linear", "yarn"):
        raise HeteroError(f"unsupported rope scaling type {_shown(scaling)}")
    factor = number("rope.scaling.factor", 1.0) or 1.0
    ctx = integer("context_length", required=True)

    cfg = ModelConfig(
        n_layer=integer("block_count", required=True),
        n_embd=integer("embedding_length", required=True),
        n_head=integer("attention.head_count", required=True),
        n_vocab=int(n_vocab),
        n_ctx_train=ctx,
        rms_eps=number("attention.layer_norm_rms_epsilon", required=True),
        q_lora_rank=integer("attention.q_lora_rank", 0),
        kv_lora_rank=integer("attention.kv_lora_rank", required=True),
        qk_nope_dim=key_len - rope_dim,
        qk_rope_dim=rope_dim,
        v_head_dim=v_len,
        split_kv_b=split_kv_b,
        n_ff_dense=integer("feed_forward_length", 0),
        n_ff_expert=integer("expert_feed_forward_length", required=True),
        n_expert=integer("expert_count", required=True),
        n_expert_used=integer("expert_used_count", required=True),
        n_expert_shared=integer("expert_shared_count", 0),
        n_dense_lead=integer("leading_dense_block_count", 0),
        gating=GATING[gating_id],
        n_group=integer("expert_group_count", 1) or 1,
        n_group_used=integer("expert_group_used_count", 1) or 1,
        norm_topk=bool(integer("expert_weights_norm", 0)),
        routed_scale=number("expert_weights_scale", 1.0),
        rope_base=number("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        rope_factor=factor if scaling != "none" else 1.0,
        yarn_orig_ctx=integer("rope.scaling.original_context_length", ctx),
        # The converter stores 0.1 * mscale_all_dim; keep the original quantity.
        yarn_log_mul=number("rope.scaling.yarn_log_multiplier", 0.0) / 0.1,
        yarn_beta_fast=number("rope.scaling.yarn_beta_fast", 32.0),
        yarn_beta_slow=number("rope.scaling.yarn_beta_slow", 1.0),
        rope_attn_factor=number("rope.scaling.attn_factor", 1.0),
    )
    _check(cfg)
    return cfg


def _shown(value) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"{type(value).__name__} {value!r}"[:80]


def _scalar(value, key: str):
    """Per-layer arrays are allowed when every non-zero entry agrees (e.g. expert width)."""
    if isinstance(value, (list, tuple)):
        distinct = {v for v in value if v}
        if len(distinct) > 1:
            raise HeteroError(f"{key}: per-layer values {sorted(distinct)} are not supported")
        return distinct.pop() if distinct else 0
    return value


def _check(cfg: ModelConfig) -> None:
    problems = []
    if cfg.qk_nope_dim < 1:
        problems.append(f"key length {cfg.qk_head_dim} leaves no room beside rope dim {cfg.qk_rope_dim}")
    if cfg.qk_rope_dim % 2:
        problems.append(f"rope dim {cfg.qk_rope_dim} is odd")
    if not 0 < cfg.n_expert_used <= cfg.n_expert:
        problems.append(f"expert_used_count {cfg.n_expert_used} not in 1..{cfg.n_expert}")
    if cfg.n_group > 1 and (cfg.n_expert % cfg.n_group or not 0 < cfg.n_group_used <= cfg.n_group):
        problems.append(f"{cfg.n_expert} experts do not split into {cfg.n_group} groups using {cfg.n_group_used}")
    if cfg.n_group > 1 and cfg.n_expert_used > cfg.n_group_used * cfg.n_expert // cfg.n_group:
        problems.append("expert_used_count exceeds the experts in the groups used")
    if not 0 <= cfg.n_dense_lead <= cfg.n_layer:
        problems.append(f"leading_dense_block_count {cfg.n_dense_lead} outside 0..{cfg.n_layer}")
    if cfg.rope_factor <= 0:
        problems.append(f"rope scaling factor {cfg.rope_factor} must be positive")
    for name in ("n_layer", "n_embd", "n_head", "n_vocab", "n_ctx_train", "kv_lora_rank", "n_ff_expert", "n_expert"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} is {getattr(cfg, name)}")
    if not 0 < cfg.rms_eps < 1:
        problems.append(f"layer_norm_rms_epsilon {cfg.rms_eps} is not in (0, 1)")
    if cfg.rope_base <= 0:
        problems.append(f"rope.freq_base {cfg.rope_base} must be positive")
    if cfg.routed_scale <= 0:
        problems.append(f"expert_weights_scale {cfg.routed_scale} must be positive")
    if problems:
        raise HeteroError("invalid deepseek2 metadata: " + "; ".join(problems))
