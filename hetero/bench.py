"""Measure prefill and decode speed of a loaded model, several repetitions on fresh random prompts."""

import os
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
    prefill_rss_growth: int | None = None  # peak RSS during a prefill over RSS before it, bytes (largest)

    @property
    def prefill_median(self) -> float:
        return statistics.median(self.prefill_tok_s)

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tok_s)

    @property
    def first_token_median(self) -> float:
        """Seconds from the prompt to the first token's logits (the prefill), median."""
        return statistics.median(self.prompt_tokens / p for p in self.prefill_tok_s)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _restart_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so that the next reading
    is the peak of what follows, not of loading; False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def prefill_decode(model, ids: list[int], gen_tokens: int) -> tuple[float, float, int | None]:
    """Prefill `ids` on a fresh cache, then decode `gen_tokens` greedily: (prefill, decode) tok/s
    and how far RSS rose above its level before the prefill at the prefill's peak (None where
    the peak cannot be measured). The file's pages a prompt touches first count in that rise."""
    cache = model.new_cache(len(ids) + gen_tokens)
    before = _resident_bytes()
    measured = _restart_peak()
    t0 = time.perf_counter()
    logits = model.forward(ids, cache, last_only=True)
    t1 = time.perf_counter()
    growth = _peak_resident_bytes() - before if measured else None
    for _ in range(gen_tokens):
        logits = model.forward([int(logits[-1].argmax())], cache)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), gen_tokens / (t2 - t1), growth


def run_bench(model, prompt_tokens: int, gen_tokens: int, reps: int, seed: int = 0, on_rep: Callable | None = None):
    """Prefill `prompt_tokens` random tokens, then decode `gen_tokens` greedily; repeat `reps` times."""
    if prompt_tokens < 1 or gen_tokens < 1 or reps < 1:
        raise ValueError("prompt tokens, generated tokens and repetitions must all be at least 1")
    if prompt_tokens + gen_tokens > model.n_ctx:
        raise ValueError(f"{prompt_tokens} + {gen_tokens} tokens exceed the context of {model.n_ctx}")
    rng = np.random.default_rng(seed)
    model.forward([model.tokenizer.bos_id], model.new_cache(1))  # warm-up: first-touch of pages, allocators
    prefill, decode, growths = [], [], []
    for rep in range(reps):
        ids = [model.tokenizer.bos_id, *rng.integers(0, model.config.n_vocab, prompt_tokens - 1).tolist()]
        pre, dec, growth = prefill_decode(model, ids, gen_tokens)
        prefill.append(pre)
        decode.append(dec)
        growths.append(growth)
        if on_rep:
            on_rep(rep)
    growth = None if None in growths else max(growths)
    return BenchResult(prompt_tokens, gen_tokens, tuple(prefill), tuple(decode), growth)


@dataclass(frozen=True)
class LayerTimes:
    """Medians over decode steps, milliseconds, for one layer whose routed experts run on the CPU."""

    layer: int
    gpu_ms: float  # GPU segment ending at this layer's hand-off, plus its shared experts
    cpu_ms: float  # the routed experts on the CPU engine, submit to finish
    wait_ms: float  # the host blocked on the CPU experts with no GPU work left to queue


@dataclass(frozen=True)
class DecodeProfile:
    layers: tuple[LayerTimes, ...]
    tail_gpu_ms: float  # the last segment: the last join and the output head
    step_ms: float  # a whole decode step, wall clock
    steps: int

    @property
    def gpu_ms(self) -> float:
        return sum(t.gpu_ms for t in self.layers) + self.tail_gpu_ms

    @property
    def cpu_ms(self) -> float:
        return sum(t.cpu_ms for t in self.layers)

    @property
    def wait_ms(self) -> float:
        return sum(t.wait_ms for t in self.layers)

    @property
    def bound(self) -> str:
        """Which side most of the step waits on."""
        return "cpu" if self.cpu_ms > self.gpu_ms else "gpu"


def profile_decode(model, prompt_tokens: int, steps: int, seed: int = 0) -> DecodeProfile:
    """Decode `steps` tokens after a random prompt with the hybrid step's timeline switched on."""
    from hetero.models.hybrid import HybridDecode, StepProfile

    step = model.net.decode_step
    if not isinstance(step, HybridDecode):
        raise ValueError("the profile times the hybrid decode step; this plan puts nothing on the GPU")
    rng = np.random.default_rng(seed)
    ids = [model.tokenizer.bos_id, *rng.integers(0, model.config.n_vocab, prompt_tokens - 1).tolist()]
    cache = model.new_cache(prompt_tokens + steps + 1)
    logits = model.forward(ids, cache, last_only=True)
    logits = model.forward([int(logits[-1].argmax())], cache)  # builds (and on CUDA captures) the step
    step.profile = prof = StepProfile()
    try:
        for _ in range(steps):
            logits = model.forward([int(logits[-1].argmax())], cache)
    finally:
        step.profile = None
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    layers = tuple(LayerTimes(i, ms(t.gpu), ms(t.cpu), ms(t.wait)) for i, t in sorted(prof.layers.items()))
    return DecodeProfile(layers, ms(prof.tail_gpu), ms(prof.step), steps)
