"""Sampling filters against hand-computed distributions."""

import math

import pytest
import torch

from hetero.sampling import MIN_TEMPERATURE, SamplingParams, filtered_probs, sample
from modelfile.errors import HeteroError

LOGITS = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def test_greedy_is_argmax_of_random_logits():
    logits = torch.randn(1000)
    assert sample(logits, SamplingParams()) == int(logits.argmax())


def test_top_k_keeps_k_and_renormalises():
    p = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert p.tolist() == pytest.approx([0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])


def test_top_p_keeps_the_smallest_nucleus():
    # Cumulative before each token: 0, .5, .7, .85 -> with top_p .8 keep the first three.
    p = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.8))
    assert p.tolist() == pytest.approx([0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])


def test_min_p_is_relative_to_the_best():
    p = filtered_probs(LOGITS, SamplingParams(temperature=1.0, min_p=0.29))  # keep >= .145
    assert p.tolist() == pytest.approx([0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])


def test_temperature_sharpens():
    p = filtered_probs(LOGITS, SamplingParams(temperature=0.5))
    z = sum(v**2 for v in (0.5, 0.2, 0.15, 0.1, 0.05))
    assert p[0].item() == pytest.approx(0.25 / z)
    assert math.isclose(p.sum().item(), 1.0)


def test_seeded_sampling_repeats_and_spreads():
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0, seed=7)
    draw = lambda: [sample(logits, params, torch.Generator().manual_seed(7)) for _ in range(1)]  # noqa: E731
    assert draw() == draw()
    g = torch.Generator().manual_seed(1)
    assert len({sample(logits, params, g) for _ in range(200)}) > 5


@pytest.mark.parametrize(
    "settings, option",
    [({"top_p": 0.0}, "--top-p"), ({"top_p": 2.0}, "--top-p"), ({"temperature": float("nan")}, "--temperature"),
     ({"temperature": 1e-320}, "--temperature"), ({"temperature": -1.0}, "--temperature"),
     ({"temperature": float("inf")}, "--temperature"), ({"top_k": -1}, "--top-k"), ({"min_p": 1.5}, "--min-p")],
)  # fmt: skip
def test_invalid_settings_are_one_line_naming_the_option(settings, option):
    with pytest.raises(HeteroError, match=f"^{option} "):
        SamplingParams(**settings)


def test_the_smallest_temperature_allowed_samples_finite_probabilities():
    p = filtered_probs(torch.randn(50) * 30, SamplingParams(temperature=MIN_TEMPERATURE))
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-9
