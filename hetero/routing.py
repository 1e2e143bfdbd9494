"""Which experts each token uses, and with what weight: a pure function of the router logits."""

import torch


def route(
    logits: torch.Tensor,
    n_used: int,
    gating: str,
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    n_group_used: int = 1,
    normalize: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids [T, A] int64, weights [T, A] float32).

    The bias (DeepSeek-V3's `exp_probs_b`) shifts selection only; weights come from the
    unbiased probabilities. With groups, a group scores the sum of its two best (biased)
    experts and only the `n_group_used` best groups stay eligible.
    """
    probs = torch.sigmoid(logits) if gating == "sigmoid" else torch.softmax(logits, dim=-1)  # [T, E]
    choice = probs if bias is None else probs + bias
    if n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)  # [T, G, E/G]
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = group_score.topk(n_group_used, dim=-1).indices  # [T, g]
        mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(mask[..., None], float("-inf")).view(t, e)
    ids = choice.topk(n_used, dim=-1).indices  # [T, A]
    weights = probs.gather(1, ids)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
    if scale not in (0.0, 1.0):
        weights = weights * scale
    return ids, weights
