"""One sequence at a time on the model, with a prompt cache and a bounded queue.

The model is not safe to run twice at once (one KV cache, one set of CPU workers), and a
671B model's throughput does not grow with concurrent sequences on one GPU anyway, so every
request becomes a `Job` on one worker thread, in arrival order. The queue is bounded: a full
queue is refused at once (the HTTP layer answers 429) rather than making clients wait minutes.

The prompt cache: the worker keeps the KV cache of the last sequence and the prompt tokens in
it. A new prompt that starts with some of those tokens (the previous turns of the same
conversation) prefills only the rest, and gets the same tokens as a cold run: on the CPU
engine a prompt token's keys and values do not depend on how the prompt was split
(docs/ARCHITECTURE.md, "Prompts are batch-invariant"). The generated tokens' rows are not
reused: the decode step sums in its own, faster order, so the next turn prefills the reply
again (at prefill speed). Several conversations (`slots`, which the plan budgets): the one
in the KV cache and host copies of the others' prompt rows. A request goes to the slot whose
tokens share the longest prefix with it; when that is a copy, the copy and the KV cache swap.
A request that would overwrite most of the KV cache's conversation (a front-end's title or
tag request between two turns) copies it out first. The least recently used copy is dropped.

A job's prompt is tokenized on the worker thread too (`Job.prepare`): rendering a chat template
turns tracemalloc on and off process-wide (its memory bound), which crashed the decode
threads when a request arrived mid-generation. A job's events go to `Job.emit`, which the
HTTP layer points at its event loop: ("start", ids) or ("refused", ApiError) or
("cancelled",) first, then ("text", str) pieces, then ("done", Usage) or ("error", str).
`Job.cancel` (a client gone) stops the generation before its next token, or skips the job.
"""

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from hetero.generate import generate_steps
from hetero.sampling import SamplingParams
from hetero.server.requests import ApiError, first_line


@dataclass
class Job:
    prepare: Callable[[], list[int]]  # the prompt's token ids (run on the worker thread)
    max_tokens: int | None  # None: what the context leaves
    sampling: SamplingParams
    stop: tuple[str, ...]
    emit: Callable[[tuple], None]
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    prefill_s: float
    decode_s: float


@dataclass
class Metrics:
    """Counters for /metrics (Prometheus text)."""

    requests: int = 0
    rejected: int = 0  # queue full
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_hits: int = 0
    completion_tokens: int = 0
    prefill_tok_s: float = 0.0  # of the last request
    decode_tok_s: float = 0.0

    def text(self, queued: int, busy: bool, held: int) -> str:
        rows = [
            ("requests_total", "counter", "requests answered or under way", self.requests),
            ("requests_rejected_total", "counter", "requests refused because the queue was full", self.rejected),
            ("requests_cancelled_total", "counter", "generations stopped because the client left", self.cancelled),
            ("requests_failed_total", "counter", "generations that ended in an error", self.failed),
            ("prompt_tokens_total", "counter", "prompt tokens, cached ones included", self.prompt_tokens),
            ("prompt_tokens_cached_total", "counter", "prompt tokens taken from the prompt cache", self.cached_tokens),
            ("prompt_cache_hits_total", "counter", "requests that reused cached prompt tokens", self.cache_hits),
            ("completion_tokens_total", "counter", "generated tokens", self.completion_tokens),
            ("prefill_tokens_per_second", "gauge", "prefill speed of the last request", self.prefill_tok_s),
            ("decode_tokens_per_second", "gauge", "decode speed of the last request", self.decode_tok_s),
            ("queue_length", "gauge", "requests waiting for the model", queued),
            ("busy", "gauge", "1 while a request runs on the model", int(busy)),
            ("prompt_cache_conversations", "gauge", "conversations the prompt cache holds", held),
        ]
        out = []
        for name, kind, help_text, value in rows:
            out += [f"# HELP hetero_{name} {help_text}", f"# TYPE hetero_{name} {kind}", f"hetero_{name} {value:g}"]
        return "\n".join(out) + "\n"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Saved:
    """A cached conversation out of the KV cache: its prompt tokens and their rows [L, n, W]."""

    ids: list[int]
    rows: object  # torch.Tensor on the host


class Worker:
    def __init__(self, model, max_queue: int, slots: int = 1):
        self.model = model
        self.metrics = Metrics()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._cache = model.new_cache()
        self._cached_ids: list[int] = []  # the tokens whose keys and values _cache holds, in order
        self.slots = slots
        self._saved: list[Saved] = []  # the other conversations, least recently used first
        self._busy = False
        self._stop = threading.Event()
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="hetero-generate", daemon=True)
        self._thread.start()

    @property
    def n_ctx(self) -> int:
        return self._cache.max_tokens

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.rejected += 1
            return False
        self.metrics.requests += 1
        return True

    def metrics_text(self) -> str:
        held = len(self._saved) + bool(self._cached_ids or self._busy)
        return self.metrics.text(self._queue.qsize(), self._busy, held)

    def close(self) -> None:
        """Stop after the current token; waiting jobs are dropped."""
        self._stop.set()
        if self._current is not None:
            self._current.cancel.set()
        try:
            self._queue.put_nowait(None)  # wakes a worker waiting for work
        except queue.Full:
            pass
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None and not self._stop.is_set():
            if job.cancel.is_set():
                self.metrics.cancelled += 1
                job.emit(("cancelled",))
                continue
            self._busy, self._current = True, job
            try:
                self._generate(job)
            except Exception as e:  # the model's own one-line errors and anything unforeseen
                self._cached_ids = []  # the cache may hold a half-written prefill
                self.metrics.failed += 1
                job.emit(("error", first_line(e)))
            finally:
                self._busy, self._current = False, None

    def _prompt(self, job: Job) -> list[int]:
        """The job's token ids, or an ApiError for a prompt the model cannot take."""
        ids = job.prepare()
        if not ids:
            raise ApiError(400, "the prompt is empty: it has no tokens", code="invalid_value")
        if len(ids) >= self.n_ctx:
            raise ApiError(400, f"this model's context is {self.n_ctx} tokens, but the prompt has {len(ids)} tokens",
                           code="context_length_exceeded")  # fmt: skip
        return ids

    def _take_slot(self, ids: list[int]) -> list[int]:
        """Bring the cached conversation sharing the longest prefix with ids into the KV cache
        (copying the one there out), or copy the KV cache's out when ids would overwrite most
        of it; returns the tokens the KV cache then holds."""
        live = common_prefix(self._cached_ids, ids)
        shared = [common_prefix(s.ids, ids) for s in self._saved]
        best = max(range(len(shared)), key=shared.__getitem__, default=None)
        if best is not None and shared[best] > live:
            chosen = self._saved[best]
            if 2 * shared[best] >= len(chosen.ids):  # its conversation goes on in the KV cache
                self._saved.pop(best)
            self._save_live()  # (a copy sharing only a system prompt stays, and ages)
            self._cache.restore(chosen.rows)
            self._cached_ids = chosen.ids
        elif 2 * live < len(self._cached_ids):
            self._save_live()
        return self._cached_ids

    def _save_live(self) -> None:
        if self.slots > 1 and self._cached_ids:
            self._saved = [s for s in self._saved if s.ids != self._cached_ids]  # one copy each
            self._saved.append(Saved(self._cached_ids, self._cache.save(len(self._cached_ids))))
            del self._saved[: -(self.slots - 1)]  # the least recently used copies beyond the plan's

    def _generate(self, job: Job) -> None:
        try:
            ids = self._prompt(job)
        except ApiError as e:
            job.emit(("refused", e))
            return
        room = self.n_ctx - len(ids)
        max_tokens = min(job.max_tokens or room, room)
        job.emit(("start", ids))
        previous = self._take_slot(ids)
        cached = max(0, min(common_prefix(previous, ids), len(ids) - 2))  # two tokens at least: a prompt pass
        self._cached_ids = []  # until this sequence is done, the cache holds nothing reusable
        steps = generate_steps(self.model, ids, max_tokens, job.sampling, job.stop, self._cache, cached)
        tokens: list[int] = []
        finish, prefill_s, decode_s, started = "cancelled", 0.0, 0.0, False
        while not job.cancel.is_set():
            try:
                step = next(steps)
                started = True
            except StopIteration as end:
                finish, started = end.value, True
                break
            prefill_s, decode_s = step.prefill_s, step.decode_s
            if step.token >= 0:
                tokens.append(step.token)
            if step.text:
                job.emit(("text", step.text))
        steps.close()
        # the decoded tokens' rows after the prompt are not reused; nor is a one-token prompt's
        # row, which ran as a decoded token does
        prefilled = self._cache.length >= len(ids) > 1
        self._cached_ids = (ids if prefilled else []) if started else previous
        m = self.metrics
        m.prompt_tokens += len(ids)
        m.cached_tokens += cached
        m.cache_hits += cached > 0
        m.completion_tokens += len(tokens)
        m.cancelled += finish == "cancelled"
        if prefill_s > 0:
            m.prefill_tok_s = (len(ids) - cached) / prefill_s
        if len(tokens) > 1 and decode_s > 0:
            m.decode_tok_s = (len(tokens) - 1) / decode_s
        job.emit(("done", Usage(len(ids), cached, len(tokens), finish, prefill_s, decode_s)))
