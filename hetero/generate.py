"""Token generation: prefill, then one cached decode step per token, streamed as text."""

import codecs
import time
from collections.abc import Generator
from dataclasses import dataclass

import torch

from hetero.kv_cache import KVCache
from hetero.sampling import SamplingParams, sample


@dataclass(frozen=True)
class Step:
    """One generated token and the text it completes (possibly empty mid-character)."""

    token: int
    text: str
    prompt_tokens: int
    prefill_s: float  # time of the prefill, repeated on every step
    decode_s: float  # time since the first token came out of the prefill


def generate_steps(
    model,
    prompt_ids: list[int],
    max_tokens: int = 256,
    sampling: SamplingParams = SamplingParams(),
    stop: tuple[str, ...] = (),
    cache: KVCache | None = None,
    cached: int = 0,
) -> Generator[Step, None, str]:
    """Yield tokens until EOS, a stop string, max_tokens or a full context; the generator's
    return value says which: "stop" (EOS or a stop string) or "length".

    Text never splits a UTF-8 character and never shows any part of a stop string. `cache`
    (default: a new one) may already hold the first `cached` prompt tokens (a server's prompt
    cache): only the rest are prefilled, at least two of them, so that they run as a prompt pass
    (cpu_ops.kernels.is_prompt) and get the cold run's sums. It holds the prompt and the tokens
    fed back afterwards.
    """
    if cached < 0 or (cached and cached > len(prompt_ids) - 2):
        raise ValueError(f"{cached} cached tokens of a {len(prompt_ids)}-token prompt: at least two must run")
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    cache = cache if cache is not None else model.new_cache()
    room = cache.max_tokens - len(prompt_ids)
    if room <= 0:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the {cache.max_tokens}-token context")
    cache.length = cached
    t0 = time.perf_counter()
    logits = _checked(model, model.forward(prompt_ids[cached:], cache, last_only=True)[-1], lambda: prompt_ids)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""  # text held back because it may begin a stop string
    done: list[int] = []
    finish = "length"  # unless EOS comes first
    for i in range(min(max_tokens, room)):
        token = sample(logits.float().cpu(), sampling, generator)
        if token in model.tokenizer.eog_ids:
            finish = "stop"
            break
        pending += decoder.decode(model.tokenizer.token_bytes([token]))
        cut = _stop_index(pending, stop)
        if cut is not None:
            if pending[:cut]:
                yield Step(token, pending[:cut], len(prompt_ids), prefill_s, time.perf_counter() - t1)
            return "stop"
        safe = len(pending) - _partial_stop(pending, stop)
        yield Step(token, pending[:safe], len(prompt_ids), prefill_s, time.perf_counter() - t1)
        pending = pending[safe:]
        done.append(token)
        if i + 1 < min(max_tokens, room):
            logits = _checked(model, model.forward([token], cache)[-1], lambda: [*prompt_ids, *done])
    tail = pending + decoder.decode(b"", final=True)
    if tail:
        yield Step(-1, tail, len(prompt_ids), prefill_s, time.perf_counter() - t1)
    return finish


def _checked(model, logits: torch.Tensor, ids) -> torch.Tensor:
    """A logits row [V] that is not all finite, or is flat (a block with an infinite scale can
    come out of an integer kernel as zeros), stops generation with a diagnosis: sampling noise
    from it would look like an answer."""
    if bool(torch.isfinite(logits).all()) and bool(logits.max() > logits.min()):
        return logits
    raise model.broken_output_error(ids())


def _stop_index(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _partial_stop(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
