"""deepseek2's synthetic models: presets (real mechanisms at sizes a test machine holds, and the
full R1 shapes for header-only files), the GGUF metadata a preset implies, and plausible random
weights. The family entry (modelfile/families.py) points here; hetero/synth writes the files.
"""

import zlib
from dataclasses import dataclass

import numpy as np

from modelfile.config import ModelConfig, config_from_metadata
from modelfile.deepseek2_tensors import expected_tensors, optional_tensors

ARCH = "deepseek2"


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


def preset_config(p: Preset) -> ModelConfig:
    return config_from_metadata(metadata(p, "check"))


def tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    """Every tensor a file of this preset holds, in file order."""
    cfg = preset_config(p)
    shapes = expected_tensors(cfg, p.tied_output)
    if p.selection_bias:
        shapes.update(optional_tensors(cfg))
    return shapes


def metadata(p: Preset, name: str) -> dict:
    """The GGUF keys of the model (not its tokenizer)."""
    k = f"{ARCH}."
    mla = {"attention.key_length": p.kv_lora_rank + p.qk_rope_dim, "attention.value_length": p.kv_lora_rank,
           "attention.key_length_mla": p.qk_nope_dim + p.qk_rope_dim, "attention.value_length_mla": p.v_head_dim,
           "attention.head_count_kv": 1}  # fmt: skip
    legacy = {"attention.key_length": p.qk_nope_dim + p.qk_rope_dim, "attention.value_length": p.v_head_dim,
              "attention.head_count_kv": p.n_head}  # fmt: skip
    meta = {
        "general.architecture": ARCH,
        "general.name": f"hetero synthetic {name}",
        k + "block_count": p.n_layer, k + "context_length": p.n_ctx, k + "embedding_length": p.n_embd,
        k + "feed_forward_length": p.n_ff_dense, k + "attention.head_count": p.n_head,
        k + "rope.freq_base": p.rope_base, k + "attention.layer_norm_rms_epsilon": p.rms_eps,
        k + "expert_used_count": p.n_expert_used, k + "expert_count": p.n_expert,
        k + "leading_dense_block_count": p.n_dense_lead, k + "vocab_size": p.n_vocab,
        k + "attention.q_lora_rank": p.q_lora_rank, k + "attention.kv_lora_rank": p.kv_lora_rank,
        k + "expert_feed_forward_length": p.n_ff_expert, k + "expert_shared_count": p.n_expert_shared,
        k + "expert_weights_scale": p.routed_scale, k + "expert_weights_norm": p.norm_topk,
        k + "expert_gating_func": 2 if p.gating == "sigmoid" else 1,
        k + "expert_group_count": p.n_group, k + "expert_group_used_count": p.n_group_used,
        k + "rope.dimension_count": p.qk_rope_dim,
    }  # fmt: skip
    meta.update({k + key: v for key, v in (mla if p.split_kv_b else legacy).items()})
    if p.yarn_factor:
        meta.update({k + "rope.scaling.type": "yarn", k + "rope.scaling.factor": p.yarn_factor,
                     k + "rope.scaling.original_context_length": p.yarn_orig_ctx,
                     k + "rope.scaling.yarn_log_multiplier": 0.1 * p.yarn_mscale_all_dim})  # fmt: skip
    return meta


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def random_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Weights scaled so activations stay O(1), routers are decisive and logits are not flat."""
    if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
        return _split_kv_b(cfg, name, seed)
    rng = _rng(seed, name)
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith("exp_probs_b.bias"):
        return 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if name == "token_embd.weight":
        return rng.standard_normal(shape, dtype=np.float32)
    gain = 4.0 if name == "output.weight" else 3.0 if name.endswith("ffn_gate_inp.weight") else 1.0
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(gain / np.sqrt(shape[-1]))


def _split_kv_b(cfg: ModelConfig, name: str, seed: int) -> np.ndarray:
    """attn_k_b / attn_v_b cut from the legacy attn_kv_b of the same seed: one model, two layouts."""
    legacy = name.replace("attn_k_b", "attn_kv_b").replace("attn_v_b", "attn_kv_b")
    h, n, v, r = cfg.n_head, cfg.qk_nope_dim, cfg.v_head_dim, cfg.kv_lora_rank
    kv = random_tensor(cfg, legacy, (h * (n + v), r), seed).reshape(h, n + v, r)
    if "attn_k_b" in name:
        return np.ascontiguousarray(kv[:, :n].transpose(0, 2, 1))  # [H, R, N]
    return np.ascontiguousarray(kv[:, n:])  # [H, V, R]
