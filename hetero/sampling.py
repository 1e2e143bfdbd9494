"""Next-token choice from logits: a pure function of (logits, settings, random generator)."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1:
            raise ValueError(f"invalid sampling settings: {self}")


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] -> probabilities [V] after temperature, top-k, top-p and min-p (in that order)."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if p.top_k:
        keep &= probs >= probs.topk(min(p.top_k, probs.numel())).values[-1]
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of strictly more likely tokens
        nucleus = torch.zeros_like(keep)
        nucleus[order] = before < p.top_p
        keep &= nucleus
    if p.min_p > 0.0:
        keep &= probs >= p.min_p * probs.max()
    probs = probs * keep
    return probs / probs.sum()


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick one token id from logits [V]."""
    if p.temperature == 0.0:
        return int(logits.argmax())
    return int(torch.multinomial(filtered_probs(logits, p), 1, generator=generator))
