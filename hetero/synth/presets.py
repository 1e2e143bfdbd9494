"""Architectures for synthetic models: real deepseek2 mechanisms at sizes this machine can hold."""

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_embd: int
    n_head: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    n_ff_dense: int
    n_ff_expert: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_dense_lead: int
    gating: str  # softmax | sigmoid
    n_group: int
    n_group_used: int
    norm_topk: bool
    routed_scale: float
    selection_bias: bool  # V3's exp_probs_b
    yarn_factor: float  # 0: no rope scaling
    yarn_orig_ctx: int
    yarn_mscale_all_dim: float
    n_vocab: int
    n_ctx: int
    split_kv_b: bool = True  # False: the legacy attn_kv_b layout
    tied_output: bool = False
    rms_eps: float = 1e-6
    rope_base: float = 10000.0


# fmt: off
PRESETS = {
    # Seconds to write; every tensor small. Softmax gating, no q_lora, no YaRN.
    "tiny": Preset(
        n_layer=3, n_embd=256, n_head=4, q_lora_rank=0, kv_lora_rank=128,
        qk_nope_dim=32, qk_rope_dim=16, v_head_dim=32,
        n_ff_dense=512, n_ff_expert=256, n_expert=8, n_expert_used=2, n_expert_shared=1, n_dense_lead=1,
        gating="softmax", n_group=1, n_group_used=1, norm_topk=False, routed_scale=1.0, selection_bias=False,
        yarn_factor=0.0, yarn_orig_ctx=0, yarn_mscale_all_dim=0.0, n_vocab=640, n_ctx=2048,
    ),
    # DeepSeek-V2-Lite's exact layer shapes (its config.json), 27 layers unless --layers says fewer.
    "v2-lite": Preset(
        n_layer=27, n_embd=2048, n_head=16, q_lora_rank=0, kv_lora_rank=512,
        qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
        n_ff_dense=10944, n_ff_expert=1408, n_expert=64, n_expert_used=6, n_expert_shared=2, n_dense_lead=1,
        gating="softmax", n_group=1, n_group_used=1, norm_topk=False, routed_scale=1.0, selection_bias=False,
        yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=0.707, n_vocab=102400, n_ctx=163840,
    ),
    # Every DeepSeek-V3/R1 mechanism at reduced width: q_lora, sigmoid + bias, 8 groups / top-4,
    # normalised top-k weights, routed scale 2.5, YaRN.
    "v3": Preset(
        n_layer=4, n_embd=1024, n_head=8, q_lora_rank=512, kv_lora_rank=256,
        qk_nope_dim=64, qk_rope_dim=32, v_head_dim=64,
        n_ff_dense=2048, n_ff_expert=512, n_expert=32, n_expert_used=8, n_expert_shared=1, n_dense_lead=1,
        gating="sigmoid", n_group=8, n_group_used=4, norm_topk=True, routed_scale=2.5, selection_bias=True,
        yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=1.0, n_vocab=4096, n_ctx=163840,
    ),
}
# fmt: on

# DeepSeek-V3/R1 at full size (config.json of the release): header-only files only.
PRESETS["r1"] = Preset(
    n_layer=61, n_embd=7168, n_head=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64,
    v_head_dim=128, n_ff_dense=18432, n_ff_expert=2048, n_expert=256, n_expert_used=8, n_expert_shared=1,
    n_dense_lead=3, gating="sigmoid", n_group=8, n_group_used=4, norm_topk=True, routed_scale=2.5,
    selection_bias=True, yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=1.0, n_vocab=129280,
    n_ctx=163840,
)  # fmt: skip
HEADER_ONLY = {"r1"}  # too large to write with weights

OVERRIDABLE = tuple(f.name for f in fields(Preset))


def make_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"unknown preset fields: {', '.join(sorted(unknown))}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
