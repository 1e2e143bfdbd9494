"""The thread pool that runs every CPU kernel: workers pinned to cores, grouped by NUMA node.

Kernels are numba functions that release the GIL, so plain Python threads run them in parallel.
Each worker pins itself to one CPU (os.sched_setaffinity on the calling thread). A job is one
callable per worker; `submit` returns at once with a handle whose `wait()` joins them, so the
caller (the GPU driver or the rest of the layer) runs meanwhile.

Hand-offs spin before they sleep (`spin.py`): between jobs a worker polls its job counter in
native code for a few milliseconds, yielding its core to anyone who needs it, and only then
blocks on a semaphore; `wait()` polls the same way before blocking on an event. Waking a
sleeping thread cost 50-150 us here, and a decode step driven from Python makes ~25 hand-offs
(the native step, cpu_ops/decode.py, makes one).

Oversubscription: torch's intra-op pool is OpenMP, whose threads keep spinning for a while
after each parallel region and so take the cores our workers are about to need. With the
engine running, torch is limited to one thread (it only does the small attention math between
our jobs): on the V2-Lite-shaped file a decode step took 54.9 ms (median) with torch on 2
threads and 28.9 ms with 1 (docs/benchmarks.md).
"""

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cpu_ops.spin import SPIN_POLLS, spin_until
from cpu_ops.topology import Topology, detect_topology
from modelfile.errors import HeteroError

Task = Callable[[], None]
_PAD = 16  # int64s between two workers' counters: each on its own cache line


class Handle:
    """Completion of one submitted job; `wait()` re-raises the first worker error."""

    def __init__(self, n: int):
        self._left = n
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._finished = np.zeros(1, np.int64)  # 1 once done: what wait() spins on
        self._error: BaseException | None = None
        self.finished_at: float | None = None  # perf_counter() when the last task ended
        if n == 0:
            self._finished[0] = 1
            self._done.set()

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._left -= 1
            if self._left == 0:
                self.finished_at = time.perf_counter()
                self._finished[0] = 1
                self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        if not spin_until(self._finished, 0, 1, SPIN_POLLS):
            self._done.wait()
        if self._error is not None:
            raise self._error


@dataclass(frozen=True)
class Worker:
    index: int
    cpu: int | None  # None when pinning is off or not permitted
    node: int


MAX_THREADS_PER_CPU = 8  # beyond this a thread count is a typo, not oversubscription


def check_threads(threads: int | None, n_cpus: int) -> None:
    """A thread count the user asked for: at least 1, and not absurdly many for the CPUs we have."""
    if threads is not None and not 1 <= threads <= MAX_THREADS_PER_CPU * n_cpus:
        raise HeteroError(f"--threads {threads}: this machine has {n_cpus} CPUs (use 1 to {n_cpus})")


def plan_workers(topology: Topology, threads: int | None, pin: bool = True) -> list[Worker]:
    """`threads` workers (default: one per CPU) spread over the nodes in proportion to their CPUs."""
    check_threads(threads, topology.n_cpus)
    threads = topology.n_cpus if threads is None else threads
    shares = [0] * len(topology.nodes)
    for _ in range(threads):  # greedy: the node with the fewest workers per CPU gets the next
        node = min(range(len(shares)), key=lambda i: (shares[i] / len(topology.nodes[i]), i))
        shares[node] += 1
    workers: list[Worker] = []
    for node, (cpus, share) in enumerate(zip(topology.nodes, shares, strict=False)):
        for k in range(share):
            workers.append(Worker(len(workers), cpus[k % len(cpus)] if pin else None, node))
    return workers


class Executor:
    def __init__(
        self,
        threads: int | None = None,
        numa: str = "auto",
        topology: Topology | None = None,
        pin: bool = True,
        limit_torch: bool = True,
    ):
        """numa: 'auto' uses the detected (or given) nodes; 'off' treats the machine as one node.
        limit_torch: hold torch to one thread while this engine runs (see above)."""
        if numa not in ("auto", "off"):
            raise ValueError(f"numa must be 'auto' or 'off', got {numa!r}")
        topo = topology or detect_topology()
        if numa == "off":
            topo = Topology((tuple(sorted(c for n in topo.nodes for c in n)),))
        self.topology = topo
        self.workers = plan_workers(topo, threads, pin)
        self.pinned = pin
        n = len(self.workers)
        self._jobs: list[deque] = [deque() for _ in range(n)]
        self._posted = np.zeros(n * _PAD, np.int64)  # jobs posted to worker i, at i * _PAD
        self._asleep = [False] * n
        self._wake = [threading.Semaphore(0) for _ in range(n)]
        self._lock = threading.Lock()  # orders posting against a worker's decision to sleep
        self._threads = [
            threading.Thread(target=self._loop, args=(w,), name=f"hetero-cpu-{w.index}", daemon=True)
            for w in self.workers
        ]
        for t in self._threads:
            t.start()
        if limit_torch:
            _limit_torch_threads()

    @property
    def n_threads(self) -> int:
        return len(self.workers)

    @property
    def n_nodes(self) -> int:
        return len(self.topology.nodes)

    def node_workers(self, node: int) -> list[Worker]:
        return [w for w in self.workers if w.node == node]

    def _loop(self, worker: Worker) -> None:
        if worker.cpu is not None:
            try:
                os.sched_setaffinity(0, {worker.cpu})  # 0 = this thread on Linux
            except OSError:
                pass  # a container may forbid it; the work is the same, only less local
        k, seen = worker.index, 0
        while True:
            if not spin_until(self._posted, k * _PAD, seen + 1, SPIN_POLLS):
                with self._lock:
                    self._asleep[k] = self._posted[k * _PAD] <= seen
                if self._asleep[k]:
                    self._wake[k].acquire()
            seen += 1
            item = self._jobs[k].popleft()
            if item is None:
                return
            task, handle = item
            try:
                task()
            except BaseException as e:  # noqa: BLE001 - handed to wait()
                handle._finish(e)
            else:
                handle._finish(None)

    def submit(self, tasks: Sequence[Task | None]) -> Handle:
        """Run tasks[i] on worker i (None: nothing for that worker); returns at once."""
        if len(tasks) > len(self.workers):
            raise ValueError(f"{len(tasks)} tasks for {len(self.workers)} workers")
        real = [(i, t) for i, t in enumerate(tasks) if t is not None]
        handle = Handle(len(real))
        for i, task in real:
            self._post(i, (task, handle))
        return handle

    def _post(self, k: int, item) -> None:
        with self._lock:
            self._jobs[k].append(item)
            self._posted[k * _PAD] += 1
            if self._asleep[k]:
                self._asleep[k] = False
                self._wake[k].release()

    def run(self, tasks: Sequence[Task | None]) -> None:
        self.submit(tasks).wait()

    def close(self) -> None:
        for k in range(len(self.workers)):
            self._post(k, None)
        for t in self._threads:
            t.join()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _limit_torch_threads() -> None:
    import torch

    torch.set_num_threads(1)
