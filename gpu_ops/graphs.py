"""The CUDA-only seam: graph capture/replay, pinned buffers, events, the staging copy stream.

A `Segment` is a function that reads and writes only fixed tensors. It runs eagerly where there
is no CUDA (the CPU standing in for the GPU: same code, same buffers) and on CUDA it runs
eagerly once, is captured into a CUDA graph, and is replayed after that: one launch instead of
hundreds. `Fence` marks a point of the GPU stream that the host can wait for without
synchronizing the whole stream; its event blocks the waiting thread instead of spinning, so it
does not take a core from the CPU experts. `host_buffer` gives page-locked memory on CUDA, so
device<->host copies can be asynchronous and can be captured into a graph. `CopyStream` runs
host-to-device copies beside the compute stream (a prompt's experts streamed to the GPU).
"""

import time
from collections.abc import Callable

import torch


def host_buffer(shape, dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")


class Segment:
    def __init__(self, ops: list[Callable[[], None]], capture: bool, pool=None):
        """ops run in order; capture: into a CUDA graph (else always eagerly); pool: a graph
        memory pool shared by the segments of one step."""
        self.ops = ops
        self.capture = capture
        self.pool = pool
        self.graph = None

    def run_eagerly(self) -> None:
        for op in self.ops:
            op()

    def __call__(self) -> None:
        if not self.capture:
            self.run_eagerly()
        elif self.graph is not None:
            self.graph.replay()
        else:
            self._first_run_and_capture()

    def _first_run_and_capture(self) -> None:
        """Runs the ops once for real on a side stream (compiles kernels, settles the allocator),
        then records them; the recording itself computes nothing."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.run_eagerly()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.run_eagerly()
        self.graph = graph


class Fence:
    """A point in the GPU's work that the host waits for (a no-op without CUDA)."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(blocking=True) if device.type == "cuda" else None

    def record(self) -> None:
        if self.event is not None:
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Stopwatch:
    """Times GPU work: CUDA events read after the step, or the wall clock for eager CPU work."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def seconds(self, a: int, b: int) -> float:
        if self.cuda:
            self.marks[b].synchronize()
            return self.marks[a].elapsed_time(self.marks[b]) / 1e3
        return self.marks[b] - self.marks[a]


def graph_pool(device: torch.device):
    return torch.cuda.graph_pool_handle() if device.type == "cuda" else None


class CopyStream:
    """Host-to-device copies on a stream of their own, ordered against the compute stream by
    events; without CUDA every copy is done when `copy` returns and the events are None."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        """dst <- src (pinned host memory) once the compute stream has passed `after` (an event
        from `computed`, or None); returns the copy's event."""
        if self.stream is None:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event(blocking=True)  # the host waits on it without spinning a core
            done.record(self.stream)
        return done

    def computed(self):
        """An event at the compute stream's current point (what a later copy must wait for)."""
        if self.stream is None:
            return None
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done

    def compute_after(self, event) -> None:
        """The compute stream waits for a copy (the host does not)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def host_after(event) -> None:
        """The host waits for a copy (before it refills the pinned buffer the copy reads)."""
        if event is not None:
            event.synchronize()
