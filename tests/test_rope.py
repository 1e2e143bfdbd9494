"""Rope and YaRN against values worked out by hand."""

import math

import pytest
import torch

from hetero.rope import apply_rope, attention_scales, rope_angles, yarn_correction_range
from hetero.synth.presets import make_preset
from hetero.synth.writer import preset_config
from modelfile.config import ModelConfig


def config(**overrides) -> ModelConfig:
    return preset_config(make_preset("v3", **overrides))


def test_v3_yarn_scales():
    # DeepSeek-V3: factor 40, mscale_all_dim 1 -> rope unscaled, softmax scale (1 + 0.1 ln 40)^2 / sqrt(96).
    cfg = config()
    s = attention_scales(cfg)
    assert s.rope_mscale == pytest.approx(1.0)
    assert s.kq_scale == pytest.approx((1 + 0.1 * math.log(40)) ** 2 / math.sqrt(96))


def test_v2_lite_yarn_scales():
    cfg = preset_config(make_preset("v2-lite", n_layer=2))
    assert attention_scales(cfg).kq_scale == pytest.approx((1 + 0.0707 * math.log(40)) ** 2 / math.sqrt(192), rel=1e-6)


def test_no_scaling_is_plain_softmax_scale():
    cfg = config(yarn_factor=0.0)
    s = attention_scales(cfg)
    assert (s.rope_mscale, s.kq_scale) == (1.0, pytest.approx(1 / math.sqrt(96)))
    angles = rope_angles(cfg, torch.tensor([3.0]))
    expected = [3.0 * 10000 ** (-2 * i / 32) for i in range(16)]
    assert angles[0].tolist() == pytest.approx(expected)


def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones():
    cfg = config()
    low, high = yarn_correction_range(32, 4096, 10000.0, 32.0, 1.0)
    # Hand-computed: n ln(orig / (beta 2 pi)) / (2 ln base) for beta 32 and 1.
    assert low == math.floor(32 * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(10000)))
    assert high == math.ceil(32 * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(10000)))
    pos = torch.tensor([7.0])
    angles = rope_angles(cfg, pos)[0]
    plain = rope_angles(config(yarn_factor=0.0), pos)[0]
    assert angles[0] == pytest.approx(plain[0])  # fastest pair: extrapolated (unchanged)
    assert angles[-1] == pytest.approx(plain[-1] / 40)  # slowest pair: interpolated by the factor


def test_apply_rope_rotates_adjacent_pairs():
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0]])  # two pairs: (1, 0) and (0, 2)
    theta = torch.tensor([[math.pi / 2, math.pi]])
    out = apply_rope(x, theta.cos(), theta.sin())
    assert out[0].tolist() == pytest.approx([0.0, 1.0, 0.0, -2.0], abs=1e-6)


def test_apply_rope_preserves_norm_per_pair_on_random_heads():
    x = torch.randn(5, 3, 8)  # [T, H, P]
    theta = torch.rand(5, 4) * 10
    out = apply_rope(x, theta.cos(), theta.sin())
    pairs_in = x.view(5, 3, 4, 2).norm(dim=-1)
    pairs_out = out.view(5, 3, 4, 2).norm(dim=-1)
    torch.testing.assert_close(pairs_in, pairs_out)
