"""Expert selection against hand-worked examples."""

import math

import pytest
import torch

from hetero.routing import route


def test_softmax_top2_weights_are_probabilities():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    ids, w = route(logits, 2, "softmax")
    z = sum(math.exp(v) for v in (0.0, 2.0, 1.0, -1.0))
    assert ids.tolist() == [[1, 2]]
    assert w[0].tolist() == pytest.approx([math.exp(2) / z, math.exp(1) / z])


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([2.0, 0.0, 0.0, 0.0])  # makes expert 0 the favourite
    ids, w = route(logits, 1, "sigmoid", bias)
    assert ids.tolist() == [[0]]
    assert w.tolist() == [[pytest.approx(0.5)]]  # sigmoid(0), unbiased


def test_groups_limit_the_candidates():
    # 4 groups of 2. Group scores (sum of both) : g0=1.0+0.9, g1=0.95+0.0, g2=0.5+0.5, g3=0.1+0.1.
    s = torch.tensor([[1.0, 0.9, 0.95, 0.0, 0.5, 0.5, 0.1, 0.1]])
    logits = torch.log(s / (1 - s + 1e-9) + 1e-12)  # sigmoid(logits) == s
    ids, _ = route(logits, 3, "sigmoid", n_group=4, n_group_used=2)
    # Groups 0 and 2 win; expert 2 (0.95) is excluded even though it is the 2nd best expert.
    assert sorted(ids[0].tolist()) == [0, 1, 4] or sorted(ids[0].tolist()) == [0, 1, 5]
    assert 2 not in ids[0].tolist()


def test_normalise_then_scale():
    logits = torch.tensor([[0.0, math.log(3.0), -9.0]])  # sigmoid: 0.5, 0.75, ~0
    ids, w = route(logits, 2, "sigmoid", normalize=True, scale=2.5)
    assert ids.tolist() == [[1, 0]]
    assert w[0].tolist() == pytest.approx([2.5 * 0.75 / 1.25, 2.5 * 0.5 / 1.25])


def test_random_batch_shapes_and_distinct_ids():
    logits = torch.randn(7, 32)
    ids, w = route(logits, 8, "sigmoid", torch.randn(32) * 0.1, n_group=8, n_group_used=4, normalize=True)
    assert ids.shape == w.shape == (7, 8)
    assert all(len(set(row)) == 8 for row in ids.tolist())
    torch.testing.assert_close(w.sum(-1), torch.ones(7))
    groups = (ids // 4).tolist()
    assert all(len(set(g)) <= 4 for g in groups)
