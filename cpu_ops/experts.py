"""The routed experts of a layer on the CPU: one fused kernel per worker, no barrier inside.

Partitioning: the experts' hidden width F is cut into contiguous ranges, one per worker. A
worker runs, for every expert that some token chose, gate and up over its F-range, SiLU(gate)
* up, and the slice of the down projection that those F columns feed; it adds the routing-
weighted partial sums into its own output, and `wait()` adds the workers' outputs. Every worker
does the same share of every expert, so the load is even whatever the router picks, and a step
needs no synchronisation between gate/up and down.

NUMA: each node owns one F-range of every expert. With more than one node the node's rows of
gate/up and columns of down are copied into buffers that the node's own workers allocate and
fill (first touch puts the pages on that node), so no worker reads remote memory and no weight
is held twice. On one node the kernels read the memory-mapped file directly.

When a node has more workers than F-ranges (F / block width is small), its workers share
ranges and split the active experts between them instead.
"""

from dataclasses import dataclass

import numba
import numpy as np

from cpu_ops.activations import quantize, quantize_into
from cpu_ops.blocks import BLOCKS
from cpu_ops.executor import Executor, Handle
from cpu_ops.kernels import MATMUL
from cpu_ops.matmul import split, supported


def _make_expert_mlp(gate_mm, up_mm, down_mm):
    @numba.njit(nogil=True, cache=True)
    def expert_mlp(
        gw,
        uw,
        dw,
        g_off,
        u_off,
        d_off,
        g_rs,
        u_rs,
        d_rs,
        n_rows,
        n_gblocks,
        n_dblocks,
        xq,
        dx,
        xs,
        xf,
        tok_ptr,
        tok_idx,
        tok_w,
        experts,
        h_group,
        out,
    ):
        """out[t] += w * down_e[:, cols] @ (silu(gate_e[rows] x_t) * up_e[rows] x_t) for the
        tokens t routed to each expert e in `experts`; rows/cols are this worker's F-range."""
        n_max = 0
        for e in experts:
            n_max = max(n_max, tok_ptr[e + 1] - tok_ptr[e])
        d = xf.shape[1]
        sq = np.empty((n_max, d), np.int8)
        sdx = np.empty((n_max, dx.shape[1]), np.float32)
        sxs = np.empty((n_max, xs.shape[1]), np.int32)
        sf = np.empty((n_max, d), np.float32)
        g = np.empty((n_max, n_rows), np.float32)
        u = np.empty((n_max, n_rows), np.float32)
        h = np.empty((n_max, n_rows), np.float32)
        hq = np.empty((n_max, n_rows), np.int8)
        hdx = np.empty((n_max, n_rows // 32), np.float32)
        hxs = np.empty((n_max, n_rows // 16), np.int32)
        part = np.empty((n_max, out.shape[1]), np.float32)
        for e in experts:
            first, n = tok_ptr[e], tok_ptr[e + 1] - tok_ptr[e]
            for j in range(n):  # gather this expert's tokens into contiguous rows
                t = tok_idx[first + j]
                sq[j] = xq[t]
                sdx[j] = dx[t]
                sxs[j] = xs[t]
                sf[j] = xf[t]
            gate_mm(gw, g_off[e], g_rs, n_rows, n_gblocks, sq, sdx, sxs, sf, 0, n, g, 0)
            up_mm(uw, u_off[e], u_rs, n_rows, n_gblocks, sq, sdx, sxs, sf, 0, n, u, 0)
            for j in range(n):
                for f in range(n_rows):
                    h[j, f] = g[j, f] / (np.float32(1.0) + np.exp(-g[j, f])) * u[j, f]
            quantize_into(h[:n], hq[:n], hdx[:n], hxs[:n], h_group)
            down_mm(dw, d_off[e], d_rs, out.shape[1], n_dblocks, hq, hdx, hxs, h, 0, n, part, 0)
            for j in range(n):
                t = tok_idx[first + j]
                wt = tok_w[first + j]
                for c in range(out.shape[1]):
                    out[t, c] += wt * part[j, c]

    return expert_mlp


_FUSED: dict[tuple, object] = {}


def fused_kernel(gate_type, up_type, down_type):
    key = (gate_type, up_type, down_type)
    if key not in _FUSED:
        _FUSED[key] = _make_expert_mlp(MATMUL[gate_type], MATMUL[up_type], MATMUL[down_type])
    return _FUSED[key]


@dataclass(frozen=True)
class Stack:
    """One of gate/up/down: raw uint8 [E, rows, row_bytes], its type and row width."""

    raw: np.ndarray
    qtype: object
    in_features: int

    def __post_init__(self):  # a plain ndarray view: numba dispatches np.memmap arguments slowly
        object.__setattr__(self, "raw", np.asarray(self.raw))


@dataclass
class WorkerShare:
    f_start: int  # this worker's F-range [f_start, f_stop)
    f_stop: int
    group: int  # of the workers sharing the range, which one (they split the experts)
    n_groups: int
    buffers: tuple[np.ndarray, np.ndarray, np.ndarray]  # gate, up, down bytes this worker reads
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray]  # per expert: byte offset of its F-range
    strides: tuple[int, int, int]


def supported_stacks(gate: Stack, up: Stack, down: Stack) -> bool:
    return all(supported(s.qtype, s.in_features) for s in (gate, up, down)) and gate.qtype == up.qtype


class CpuExperts:
    """A layer's routed experts, partitioned over the executor's workers (and NUMA nodes)."""

    def __init__(self, gate: Stack, up: Stack, down: Stack, executor: Executor):
        if not supported_stacks(gate, up, down):
            raise ValueError("no CPU kernels for these expert types")
        self.executor = executor
        self.n_expert, self.n_ff, self.n_embd = gate.raw.shape[0], gate.raw.shape[1], gate.in_features
        self.kernel = fused_kernel(gate.qtype, up.qtype, down.qtype)
        self.gate_kind, self.down_kind = BLOCKS[gate.qtype], BLOCKS[down.qtype]
        align = self.down_kind.act_group  # F-ranges whole blocks of down's rows, whole h groups
        node_ranges = split(self.n_ff, executor.n_nodes, align)
        self.shares: list[WorkerShare | None] = [None] * executor.n_threads
        pack = executor.n_nodes > 1
        for node, (f0, f1) in enumerate(node_ranges):
            workers = executor.node_workers(node)
            stacks = self._pack(node, gate, up, down, f0, f1) if pack else (gate.raw, up.raw, down.raw)
            ranges = split(f1 - f0, len(workers), align)
            for k, w in enumerate(workers):
                a, b = ranges[k % len(ranges)]
                n_groups = -(-len(workers) // len(ranges))
                self.shares[w.index] = self._share(
                    stacks, f0 if pack else 0, f0 + a, f0 + b, k // len(ranges), n_groups
                )

    def _share(self, stacks, base: int, fa: int, fb: int, group: int, n_groups: int) -> WorkerShare:
        """Byte offsets of rows/columns [fa, fb) of every expert in buffers that start at F=base."""
        g, u, d = stacks
        e = np.arange(self.n_expert, dtype=np.int64)
        g_rs, u_rs, d_rs = g.shape[2], u.shape[2], d.shape[2]
        g_off = e * g.shape[1] * g_rs + (fa - base) * g_rs
        u_off = e * u.shape[1] * u_rs + (fa - base) * u_rs
        d_off = e * d.shape[1] * d_rs + (fa - base) // self.down_kind.values * self.down_kind.nbytes
        return WorkerShare(
            fa,
            fb,
            group,
            n_groups,
            (g.reshape(-1), u.reshape(-1), d.reshape(-1)),
            (g_off, u_off, d_off),
            (g_rs, u_rs, d_rs),
        )

    def _pack(self, node: int, gate: Stack, up: Stack, down: Stack, f0: int, f1: int):
        """Node-local copies of rows [f0, f1) of gate/up and those columns of down, made by a
        worker of that node so that its first touch places the pages there."""
        col0 = f0 // self.down_kind.values * self.down_kind.nbytes
        col1 = f1 // self.down_kind.values * self.down_kind.nbytes
        result = {}

        def copy():
            result["g"] = np.array(gate.raw[:, f0:f1])
            result["u"] = np.array(up.raw[:, f0:f1])
            result["d"] = np.array(down.raw[:, :, col0:col1])

        first = self.executor.node_workers(node)[0].index
        self.executor.run([copy if w.index == first else None for w in self.executor.workers])
        return result["g"], result["u"], result["d"]

    def submit(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, also: tuple = ()) -> "ExpertsHandle":
        """x float32 [T, D], ids int [T, A], weights float32 [T, A] -> a handle; the experts run
        on the workers while the caller goes on. `also`: (CpuExperts, ids, weights) of more
        experts on the same x (the shared experts), run in the same hand-off."""
        outs = [np.zeros((x.shape[0], self.n_embd), np.float32) for _ in self.shares]
        jobs = [self.tasks(x, ids, weights, outs)] + [other.tasks(x, i, w, outs) for other, i, w in also]
        per_worker = [[job[k] for job in jobs if job[k] is not None] for k in range(len(outs))]
        tasks = [(lambda ts=ts: [t() for t in ts]) if ts else None for ts in per_worker]
        return ExpertsHandle(self.executor.submit(tasks), outs)

    def tasks(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, outs: list[np.ndarray]) -> list:
        """One callable per worker (None: nothing to do) adding these experts into outs[worker]."""
        acts = quantize(x, self.gate_kind.act_group)
        flat = ids.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.n_expert):
            raise ValueError("expert id out of range")
        order = np.argsort(flat, kind="stable")
        tok_idx = (order // ids.shape[1]).astype(np.int64)
        tok_w = weights.reshape(-1).astype(np.float32)[order]
        tok_ptr = np.zeros(self.n_expert + 1, np.int64)
        np.cumsum(np.bincount(flat, minlength=self.n_expert), out=tok_ptr[1:])
        active = np.flatnonzero(np.diff(tok_ptr)).astype(np.int64)
        tasks = []
        for share, out in zip(self.shares, outs, strict=True):
            mine = active[share.group :: share.n_groups]
            if share.f_stop <= share.f_start or mine.size == 0:
                tasks.append(None)
                continue
            tasks.append(self._task(share, acts, tok_ptr, tok_idx, tok_w, mine, out))
        return tasks

    def _task(self, s: WorkerShare, acts, tok_ptr, tok_idx, tok_w, experts, out):
        n_rows = s.f_stop - s.f_start
        n_gblocks = self.n_embd // self.gate_kind.values
        n_dblocks = n_rows // self.down_kind.values

        def run():
            self.kernel(
                *s.buffers,
                *s.offsets,
                *s.strides,
                n_rows,
                n_gblocks,
                n_dblocks,
                acts.xq,
                acts.dx,
                acts.xs,
                acts.xf,
                tok_ptr,
                tok_idx,
                tok_w,
                experts,
                self.down_kind.act_group,
                out,
            )

        return run


class ExpertsHandle:
    def __init__(self, handle: Handle, outs: list[np.ndarray]):
        self.handle = handle
        self.outs = outs

    def wait(self) -> np.ndarray:
        """float32 [T, D]: the routing-weighted sum of the chosen experts."""
        self.handle.wait()
        total = self.outs[0]
        for o in self.outs[1:]:
            total += o
        return total
