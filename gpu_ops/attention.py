"""MLA decode attention over the latent cache, with absorbed weights, for one new token.

With W_UK absorbed into the query (q_latent = q_nope @ W_UK per head) every head scores the
same cached rows: score[h, s] = (q_latent[h] . latent[s] + q_rope[h] . k_rope[s]) * scale, and
the output stays latent, o[h] = softmax(score[h]) @ latents, for W_UV to expand afterwards.
A decode step so reads (R + P) values per cached token once for all H heads.

The number of valid positions comes in a device tensor, so a captured CUDA graph replays the
same launch at every position. Triton (programs over blocks of heads and runs of positions,
each an online softmax over the valid positions of its run, merged afterwards) where Triton
runs; elsewhere torch scores the cache buffer and masks what is past the end (only the valid
rows when the length is known on the host, outside a graph).
"""

import functools
import importlib

import torch

from gpu_ops.matmul import triton_runs_on


@functools.cache
def _kernel():
    return importlib.import_module("gpu_ops.triton_attention")


def latent_attention_torch(q_latent, q_rope, rows, scale: float, hidden=None):
    """MLA's absorbed attention in torch, for any number of tokens: q_latent [..., H, R] and
    q_rope [..., H, P] against cache rows [S, R + P] -> latent outputs [..., H, R] (float32).
    hidden: bool, broadcast against the scores of the last K positions [..., H, K] (K its last
    dimension), True where a position is not seen (the future among a prompt's new positions,
    past the end of a decode buffer: there K = S); None: every row is seen."""
    r, p = q_latent.shape[-1], q_rope.shape[-1]
    rows = rows.float()
    latents, k_ropes = rows[:, :r], rows[:, r:]
    scores = q_latent.reshape(-1, r) @ latents.T  # [... * H, S]: the one buffer of this size
    scores.addmm_(q_rope.reshape(-1, p), k_ropes.T).mul_(scale)
    return masked_softmax_(scores.view(*q_latent.shape[:-1], -1), hidden) @ latents


def latent_attention_each(q_latent, q_rope, rows, start: int, scale: float, run=None, parts: int = 1):
    """A prompt's tokens at positions start.. one at a time, each over exactly the cache rows it
    sees: q_latent [T, H, R], q_rope [T, H, P], rows [S, R + P] -> [T, H, R]. A token's products
    then have the same shapes, so the same sums, in any split of the prompt (batched, a token's
    scores would be a row of a [T * H, S] product whose blocking depends on T and S, and its
    softmax would sum a row of S values, the masked ones included). run(tasks), given, runs
    `parts` ranges of tokens at once (the CPU engine's workers; torch keeps one thread there),
    ranges of equal work: a token's grows with its position."""
    r, n = q_latent.shape[-1], q_latent.shape[0]
    q = torch.cat([q_latent, q_rope], dim=-1).float()  # [T, H, R+P]: one product for both parts
    rows = rows.float()
    out = q.new_empty(q_latent.shape)

    @torch.inference_mode()  # a worker thread does not inherit the caller's mode
    def tokens(first: int, stop: int) -> None:
        for t in range(first, stop):
            seen = rows[: start + t + 1]  # [p+1, R+P]
            probs = torch.softmax((q[t] @ seen.T).mul_(scale), dim=-1)  # [H, p+1]
            torch.matmul(probs, seen[:, :r], out=out[t])

    if run is None or parts < 2 or n < 2:
        tokens(0, n)
        return out
    work = torch.arange(start + 1, start + n + 1, dtype=torch.float64).cumsum(0)  # positions seen, summed
    cuts = [0, *torch.searchsorted(work, work[-1] * torch.arange(1, parts) / parts).tolist(), n]
    run([lambda a=a, b=b: tokens(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a])
    return out


def masked_softmax_(scores: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dimension, in place, after -inf where `hidden` (broadcast against
    the last hidden.shape[-1] positions) is True: a prompt's scores are the largest buffer of a
    prefill pass (the planner budgets one of them), and torch.softmax would make a second."""
    if hidden is not None:
        scores[..., scores.shape[-1] - hidden.shape[-1] :].masked_fill_(hidden, float("-inf"))
    scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(-1, keepdim=True))


def mla_decode_torch(q_latent, q_rope, cache_rows, length, scale: float, known_length: int | None = None):
    if known_length is not None:  # not inside a graph: read only the valid rows
        return latent_attention_torch(q_latent, q_rope, cache_rows[:known_length], scale)
    past_end = torch.arange(cache_rows.shape[0], device=cache_rows.device) >= length
    return latent_attention_torch(q_latent, q_rope, cache_rows, scale, past_end)


def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, cache_rows: torch.Tensor, length: torch.Tensor,
               scale: float, known_length: int | None = None) -> torch.Tensor:  # fmt: skip
    """q_latent [H, R], q_rope [H, P], cache_rows [S_max, R + P] (latent, then roped key;
    float32 or bfloat16), length int64 [1] (positions 0..length-1 are valid) -> latent outputs float32 [H, R].
    known_length: the same number on the host, when no graph is being captured (the torch
    path then reads only those rows instead of masking the whole buffer)."""
    if triton_runs_on(q_latent.device):
        return _kernel().mla_decode(q_latent.contiguous(), q_rope.contiguous(), cache_rows, length, scale)
    return mla_decode_torch(q_latent, q_rope, cache_rows, length, scale, known_length)
