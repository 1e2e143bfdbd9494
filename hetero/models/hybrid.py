"""The hybrid decode step: fixed buffers, GPU segments between CPU-expert hand-offs.

One token per call. Everything the step touches lives in tensors made once per cache (the
token's position, the hidden state, the router's choice, the logits), so on CUDA each
segment is captured once into a graph and replayed at every position (gpu_ops.graphs).

The segments are cut from the net's blocks (modelfile/blocks.py), not listed by hand: every
block runs its one-token body (hetero/models/blocks.py) inside a segment, except a block whose
routed experts run from CPU RAM, which ends one: the previous hand-off's join, then the
blocks between, then that block's norm and router. At a hand-off the router's ids and
weights and the block's input are copied to pinned host buffers inside the graph, the host
waits on an event for them, submits the routed experts to the CPU engine, launches the shared
experts' segment on the GPU meanwhile, waits for the CPU, and copies the result up for the
next segment to add.

Without CUDA the same segments run eagerly on the CPU standing in for the GPU: the tests
compare this step with the plain forward pass there.
"""

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from gpu_ops.graphs import Fence, Segment, Stopwatch, graph_pool, host_buffer
from hetero.kv_cache import KVCache
from hetero.models.blocks import Moe, rms_norm
from hetero.models.net import Net
from hetero.ops import ExpertBank
from hetero.rope import rope_tables


@dataclass
class HandOffTimes:
    """Per decode step, per hand-off layer (seconds)."""

    gpu: list[float] = field(default_factory=list)  # the GPU segment that ends at this hand-off + shared experts
    cpu: list[float] = field(default_factory=list)  # routed experts on the CPU engine, submit to finish
    wait: list[float] = field(default_factory=list)  # the host blocked on the CPU after the GPU work was queued


@dataclass
class StepProfile:
    layers: dict[int, HandOffTimes] = field(default_factory=dict)
    tail_gpu: list[float] = field(default_factory=list)  # the last segment (last join, output head)
    step: list[float] = field(default_factory=list)  # whole steps, wall clock


class HandOff:
    """A block whose routed experts run from CPU RAM (the CPU engine, or the reference path)."""

    def __init__(self, step: "StaticDecode", block: Moe, shared: Segment | None):
        self.step, self.block, self.shared = step, block, shared
        self.index = block.block.layer
        self.fence = Fence(step.device)

    def __call__(self, watch: Stopwatch | None, times: HandOffTimes | None) -> None:
        """On CUDA the shared experts are queued first (the GPU goes on with them while the host
        waits for the router's output); on the CPU standing in for the GPU they run on the host
        after the submit, while the CPU engine's workers run the routed ones."""
        s = self.step
        queued = s.device.type == "cuda"
        marks = None
        if self.shared is not None and queued:
            marks = self._run_shared(watch)
        self.fence.wait()  # the router's choice and the block input are on the host
        t0 = time.perf_counter()
        result = self.block.experts.submit(s.h_host, s.ids_host, s.weights_host)
        if self.shared is not None and not queued:
            marks = self._run_shared(watch)
        t1 = time.perf_counter()
        s.routed_host.copy_(result.wait())
        t2 = time.perf_counter()
        s.routed.copy_(s.routed_host, non_blocking=True)
        if times is not None:
            times.cpu.append(result.finished_at - t0 if result.finished_at else t2 - t0)
            times.wait.append(t2 - t1)
            if marks is not None:
                times.gpu[-1] += watch.seconds(*marks)

    def _run_shared(self, watch: Stopwatch | None):
        a = watch.mark() if watch else None
        self.shared()
        return (a, watch.mark()) if watch else None


def hands_off(block) -> bool:
    """Whether a block's routed experts leave the GPU's stream for the host: a segment ends there."""
    return isinstance(block, Moe) and block.hands_off


class StaticDecode:
    def __init__(self, net: Net, cache: KVCache):
        c = net.cfg
        dev = self.device = net.device
        self.net, self.cache = net, cache
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # the new token's position
        self.length = torch.ones(1, dtype=torch.long, device=dev)  # valid positions once it is written
        self.x = torch.zeros(1, c.n_embd, device=dev)
        self.h = torch.zeros(1, c.n_embd, device=dev)  # the input of a hand-off block
        self.routed = torch.zeros(1, c.n_embd, device=dev)
        self.shared = torch.zeros(1, c.n_embd, device=dev)
        self.logits = torch.zeros(1, c.n_vocab, device=dev)
        self.cos, self.sin = rope_tables(c, torch.arange(cache.max_tokens), dev)  # [S_max, P/2]
        a = c.n_expert_used
        self.h_host = host_buffer((1, c.n_embd), torch.float32, dev)
        self.ids_host = host_buffer((1, a), torch.long, dev)
        self.weights_host = host_buffer((1, a), torch.float32, dev)
        self.routed_host = host_buffer((1, c.n_embd), torch.float32, dev)
        self.captured = self.capturable()
        self.stages = self._stages()
        self.profile: StepProfile | None = None

    def _segment_weights(self) -> list:
        """The matrices the segments multiply with: all but the routed experts, which either hand
        off (outside any segment) or are in a GPU format (gathered kernels, on the GPU)."""
        mats = [self.net.output]
        for block in self.net.blocks:
            mats += [m for m in block.matrix_ops() if not isinstance(m, ExpertBank)]
        return mats

    def segment_weights_on(self, device_type: str) -> bool:
        """Whether every weight the segments read lives on devices of this type ("cuda:0" and
        "cuda" are the same GPU, though torch.device does not say they are equal)."""
        where = lambda m: (m.gpu.q if m.gpu is not None else m.raw).device.type  # noqa: E731
        return all(where(m) == device_type for m in self._segment_weights())

    def capturable(self) -> bool:
        """CUDA, and every weight a segment reads is on the GPU: a CPU weight inside a segment
        would need the host mid-graph (such plans run the same segments eagerly)."""
        return self.device.type == "cuda" and self.segment_weights_on("cuda")

    def _stages(self) -> list[tuple[Segment, HandOff | None]]:
        """(segment, the hand-off that follows it or None) in step order, cut from the net's
        blocks: each block runs its one-token body inside a segment, except that a block whose
        routed experts run from CPU RAM ends the segment (router and input copied to the host)
        and its result joins at the start of the next."""
        pool = graph_pool(self.device)
        capture = self.captured
        stages, ops = [], []
        for block in self.net.blocks:
            if not hands_off(block):
                ops.append(partial(self.residual, block))
                continue
            ops.append(partial(self.route_to_host, block))
            side = block.shared_on_side
            shared = Segment([partial(self.shared_experts, block)], capture, pool) if side else None
            stages.append((Segment(ops, capture, pool), HandOff(self, block, shared)))
            ops = [partial(self.join, side)]
        ops.append(self.head)
        stages.append((Segment(ops, capture, pool), None))
        return stages

    # -- the ops (each reads and writes the fixed buffers only) ---------------------------------
    def residual(self, block) -> None:
        self.x += block.decode(rms_norm(self.x, block.norm, self.net.cfg.rms_eps), self)

    def route_to_host(self, block: Moe) -> None:
        self.h.copy_(rms_norm(self.x, block.norm, self.net.cfg.rms_eps))
        ids, weights = block.route(self.h)
        self.ids_host.copy_(ids, non_blocking=True)
        self.weights_host.copy_(weights, non_blocking=True)
        self.h_host.copy_(self.h, non_blocking=True)

    def shared_experts(self, block: Moe) -> None:
        self.shared.copy_(block.shared(self.h))

    def join(self, with_shared: bool) -> None:
        """x + (routed + shared), the plain block's order: a bfloat16 cache rounds the next
        layer's latents, and any other order can move one of them by a whole bfloat16 step."""
        if with_shared:
            self.routed += self.shared
        self.x += self.routed

    def head(self) -> None:
        self.logits.copy_(self.net.head(self.x))

    # -- one step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, token: int, cache: KVCache) -> torch.Tensor:
        """Decode `token` at position cache.length -> logits [1, vocab] (a copy)."""
        if cache is not self.cache:
            raise ValueError("this step's buffers belong to another cache")
        p = cache.length
        t_start = time.perf_counter()
        self.pos.fill_(p)
        self.length.fill_(p + 1)
        self.x.copy_(self.net.embed(torch.tensor([token], device=self.net.embed.raw.device)))
        prof = self.profile
        watch = Stopwatch(self.device) if prof is not None else None
        for segment, hand_off in self.stages:
            a = watch.mark() if watch else None
            segment()
            if hand_off is not None:
                hand_off.fence.record()
            if watch:
                b = watch.mark()
                if hand_off is None:
                    prof.tail_gpu.append(watch.seconds(a, b))
                else:
                    times = prof.layers.setdefault(hand_off.index, HandOffTimes())
                    times.gpu.append(watch.seconds(a, b))
            if hand_off is not None:
                hand_off(watch, prof.layers[hand_off.index] if prof else None)
        cache.length = p + 1
        logits = self.logits.clone()
        if prof is not None:
            prof.step.append(time.perf_counter() - t_start)
        return logits


class HybridDecode:
    """The decode step of a model with GPU weights: one StaticDecode for the cache in use (a new
    cache gets new buffers, and on CUDA new graphs)."""

    def __init__(self, net: Net):
        self.net = net
        self.step: StaticDecode | None = None
        self.profile: StepProfile | None = None  # set to collect a timeline (hetero bench --profile)

    def __call__(self, token: int, cache: KVCache) -> torch.Tensor:
        if self.step is None or self.step.cache is not cache:
            self.step = None  # free the old buffers and graphs first
            self.step = StaticDecode(self.net, cache)
        self.step.profile = self.profile
        return self.step(token, cache)
