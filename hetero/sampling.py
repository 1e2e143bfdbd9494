"""Next-token choice from logits: a pure function of (logits, settings, random generator)."""

import math
from dataclasses import dataclass

import torch

from modelfile.errors import HeteroError

# Below this a temperature divides logits into infinities (1e-320 does); 0 already means greedy.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 100.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None

    def __post_init__(self):
        problem = sampling_problem(self.temperature, self.top_p, self.top_k, self.min_p)
        if problem:
            raise HeteroError(problem)


def sampling_problem(temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> str | None:
    """The first invalid setting as one line (named as the command-line option), or None."""
    t = float(temperature)
    if not (t == 0 or (math.isfinite(t) and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
        return f"--temperature {temperature}: use 0 for greedy, or from {MIN_TEMPERATURE} to {MAX_TEMPERATURE:g}"
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        return f"--top-p {top_p}: must be above 0 and at most 1"
    if top_k < 0:
        return f"--top-k {top_k}: must be 0 (off) or more"
    if not (math.isfinite(min_p) and 0 <= min_p <= 1):
        return f"--min-p {min_p}: must be from 0 to 1"
    return None


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
