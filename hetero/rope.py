"""Rotary embedding as llama.cpp applies it to deepseek2: adjacent pairs, with YaRN.

deepseek2 uses ggml's "normal" rope mode: dims (2i, 2i+1) of the rope slice form one rotating
pair with frequency base^(-2i/n). (Hugging Face's checkpoint permutes the same dims into
halves; GGUF files keep the pair layout, so we rotate pairs.)
"""

import math
from dataclasses import dataclass

import torch

from modelfile.config import ModelConfig


@dataclass(frozen=True)
class AttentionScales:
    rope_mscale: float  # multiplies cos and sin
    kq_scale: float  # multiplies q.k before the softmax


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def attention_scales(cfg: ModelConfig) -> AttentionScales:
    """YaRN's magnitude corrections, resolved the way llama.cpp resolves them for deepseek2.

    llama.cpp folds them into rope's attn_factor and the softmax scale; the net effect for
    DeepSeek files is an unscaled rope and kq_scale = (1 + 0.1 * mscale_all_dim * ln f)^2 / sqrt(d).
    """
    factor = cfg.rope_factor
    yarn = cfg.rope_scaling == "yarn"
    attn_factor = 1.0
    if yarn:
        mscale_all = cfg.yarn_log_mul
        if mscale_all != 0.0:
            attn_factor = _yarn_mscale(factor, mscale_all) / _yarn_mscale(factor, mscale_all)
        else:
            attn_factor = _yarn_mscale(factor, 1.0)
        attn_factor /= 1.0 + 0.1 * math.log(factor)
    attn_factor *= cfg.rope_attn_factor
    log_f = math.log(factor)
    rope_mscale = attn_factor * (1.0 + 0.1 * log_f) if yarn else attn_factor
    mscale = attn_factor * (1.0 + 0.1 * log_f) * (1.0 + 0.1 * cfg.yarn_log_mul * log_f)
    return AttentionScales(rope_mscale, mscale * mscale / math.sqrt(cfg.qk_head_dim))


def rope_angles(cfg: ModelConfig, positions: torch.Tensor) -> torch.Tensor:
    """positions [T] -> angles [T, n/2] in float64, YaRN-blended per frequency when enabled."""
    n = cfg.qk_rope_dim
    i = torch.arange(n // 2, dtype=torch.float64)
    inv_freq = cfg.rope_base ** (-2.0 * i / n)  # [n/2]
    extrap = positions.to(torch.float64)[:, None] * inv_freq  # [T, n/2]
    if cfg.rope_scaling == "none":
        return extrap
    interp = extrap / cfg.rope_factor
    if cfg.rope_scaling == "linear":
        return interp
    low, high = yarn_correction_range(n, cfg.yarn_orig_ctx, cfg.rope_base, cfg.yarn_beta_fast, cfg.yarn_beta_slow)
    ramp = 1.0 - ((i - low) / max(0.001, high - low)).clamp(0.0, 1.0)  # 1: keep original frequency
    return interp * (1.0 - ramp) + extrap * ramp


def yarn_correction_range(n: int, orig_ctx: int, base: float, beta_fast: float, beta_slow: float):
    """The pair indices between which YaRN moves from extrapolating to interpolating."""

    def dim(rotations: float) -> float:
        return n * math.log(orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    return max(0.0, math.floor(dim(beta_fast))), min(n - 1.0, math.ceil(dim(beta_slow)))


def rope_tables(cfg: ModelConfig, positions: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, n/2] float32, already multiplied by the rope magnitude scale."""
    angles = rope_angles(cfg, positions)
    m = attention_scales(cfg).rope_mscale
    return (angles.cos() * m).float().to(device), (angles.sin() * m).float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, ..., n] rotated in adjacent pairs; cos/sin [T, n/2] broadcast over middle dims."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)
