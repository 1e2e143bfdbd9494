"""Measure prefill and decode speed of a loaded model, several repetitions on fresh random prompts."""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchResult:
    prompt_tokens: int
    gen_tokens: int
    prefill_tok_s: tuple[float, ...]  # one per repetition
    decode_tok_s: tuple[float, ...]

    @property
    def prefill_median(self) -> float:
        return statistics.median(self.prefill_tok_s)

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tok_s)


def prefill_decode(model, ids: list[int], gen_tokens: int) -> tuple[float, float]:
    """Prefill `ids` on a fresh cache, then decode `gen_tokens` greedily: (prefill, decode) tok/s."""
    cache = model.new_cache(len(ids) + gen_tokens)
    t0 = time.perf_counter()
    logits = model.forward(ids, cache, last_only=True)
    t1 = time.perf_counter()
    for _ in range(gen_tokens):
        logits = model.forward([int(logits[-1].argmax())], cache)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), gen_tokens / (t2 - t1)


def run_bench(model, prompt_tokens: int, gen_tokens: int, reps: int, seed: int = 0, on_rep: Callable | None = None):
    """Prefill `prompt_tokens` random tokens, then decode `gen_tokens` greedily; repeat `reps` times."""
    if prompt_tokens < 1 or gen_tokens < 1 or reps < 1:
        raise ValueError("prompt tokens, generated tokens and repetitions must all be at least 1")
    if prompt_tokens + gen_tokens > model.n_ctx:
        raise ValueError(f"{prompt_tokens} + {gen_tokens} tokens exceed the context of {model.n_ctx}")
    rng = np.random.default_rng(seed)
    model.forward([model.tokenizer.bos_id], model.new_cache(1))  # warm-up: first-touch of pages, allocators
    prefill, decode = [], []
    for rep in range(reps):
        ids = [model.tokenizer.bos_id, *rng.integers(0, model.config.n_vocab, prompt_tokens - 1).tolist()]
        pre, dec = prefill_decode(model, ids, gen_tokens)
        prefill.append(pre)
        decode.append(dec)
        if on_rep:
            on_rep(rep)
    return BenchResult(prompt_tokens, gen_tokens, tuple(prefill), tuple(decode))
