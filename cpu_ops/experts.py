"""The routed experts of a layer on the CPU: two fused kernels per worker, one barrier between.

Every (token, chosen expert) pair is one row of a shared buffer h [pairs, F], sorted by expert.
Phase 1: each worker computes gate and up for its contiguous range of F (rows of gate/up) for
every expert some token chose, and writes SiLU(gate) * up into its columns of h. Phase 2,
after the workers meet at a barrier: each worker takes a contiguous range of the output width
D (rows of down), multiplies those rows of every chosen expert's down by its tokens' h, and adds
the routing-weighted results into its own columns of the output. Every worker does the same
share of every expert whatever the router picks, and every weight read is a contiguous run of
whole rows. (Splitting down by its columns instead, so that no barrier is needed, reads every
row in pieces: measured 5x slower per byte on this machine.)

NUMA: node n owns F-range n of every expert's gate/up and D-range n of its down. With more than
one node those rows are copied into buffers that a worker of the node allocates and fills
(first touch puts the pages there), so weights are read node-locally and held once. On one
node the kernels read the memory-mapped file directly.
"""

import functools
from dataclasses import dataclass

import numba
import numpy as np

from cpu_ops.activations import QuantizedActivations, quantize, quantize_into
from cpu_ops.blocks import BLOCKS
from cpu_ops.capabilities import experts_run_on_engine
from cpu_ops.executor import Executor, Handle
from cpu_ops.kernels import is_prompt, rows_of
from cpu_ops.matmul import split
from cpu_ops.spin import SpinBarrier


def _make_gate_up(gate_code: int, up_code: int):
    @numba.njit(nogil=True, cache=True)
    def gate_up(
        gw, uw, g_off, u_off, g_rs, u_rs, n_rows, n_blocks, xq, dx, xs, xf, tok_ptr, tok_idx, experts, h, h_col, prompt
    ):
        """h[p, h_col:h_col+n_rows] = silu(gate_e x_t) * (up_e x_t) over this worker's rows, for
        the pairs p = (token t, expert e) of every expert in `experts`."""
        n_max = 0
        for e in experts:
            n_max = max(n_max, tok_ptr[e + 1] - tok_ptr[e])
        sq = np.empty((n_max, xq.shape[1]), np.int8)
        sdx = np.empty((n_max, dx.shape[1]), np.float32)
        sxs = np.empty((n_max, xs.shape[1]), np.int32)
        sf = np.empty((n_max, xf.shape[1]), np.float32)
        g = np.empty((n_max, n_rows), np.float32)
        u = np.empty((n_max, n_rows), np.float32)
        for e in experts:
            first, n = tok_ptr[e], tok_ptr[e + 1] - tok_ptr[e]
            for j in range(n):  # gather this expert's tokens into contiguous rows
                t = tok_idx[first + j]
                sq[j] = xq[t]
                sdx[j] = dx[t]
                sxs[j] = xs[t]
                sf[j] = xf[t]
            rows_of(gate_code, gw, g_off[e], g_rs, n_rows, n_blocks, sq, sdx, sxs, sf, 0, n, g, 0, prompt)
            rows_of(up_code, uw, u_off[e], u_rs, n_rows, n_blocks, sq, sdx, sxs, sf, 0, n, u, 0, prompt)
            for j in range(n):
                for f in range(n_rows):
                    h[first + j, h_col + f] = g[j, f] / (np.float32(1.0) + np.exp(-g[j, f])) * u[j, f]

    return gate_up


def _make_down(down_code: int):
    @numba.njit(nogil=True, cache=True)
    def down(dw, d_off, d_rs, n_rows, n_blocks, h, h_form, tok_ptr, tok_idx, tok_w, experts, out, out_col, prompt):
        """out[t, out_col:out_col+n_rows] += w * (down_e rows) @ h[p] for the pairs p of `experts`."""
        n_max = 0
        for e in experts:
            n_max = max(n_max, tok_ptr[e + 1] - tok_ptr[e])
        f = h.shape[1]
        hq = np.empty((n_max, f), np.int8)
        hdx = np.empty((n_max, f // 32), np.float32)
        hxs = np.empty((n_max, f // 16), np.int32)
        hf = np.empty((n_max, f), np.float32)
        part = np.empty((n_max, n_rows), np.float32)
        for e in experts:
            first, n = tok_ptr[e], tok_ptr[e + 1] - tok_ptr[e]
            rows = h[first : first + n]
            quantize_into(rows, hq[:n], hdx[:n], hxs[:n], hf[:n], h_form)
            rows_of(down_code, dw, d_off[e], d_rs, n_rows, n_blocks, hq, hdx, hxs, hf, 0, n, part, 0, prompt)
            for j in range(n):
                t = tok_idx[first + j]
                wt = tok_w[first + j]
                for c in range(n_rows):
                    out[t, out_col + c] += wt * part[j, c]

    return down


@numba.njit(nogil=True, cache=True)
def group_by_expert(ids: np.ndarray, weights: np.ndarray, n_expert: int):
    """The (token, choice) pairs ordered by expert, tokens in order within one: the pairs of
    expert e are tok_ptr[e]:tok_ptr[e+1], with their token in tok_idx and routing weight in tok_w;
    `active` lists the experts with any pair. ids int64 [T, A], weights float32 [T, A]."""
    n_tok, n_used = ids.shape
    tok_ptr = np.zeros(n_expert + 1, np.int64)
    for t in range(n_tok):
        for j in range(n_used):
            e = ids[t, j]
            if e < 0 or e >= n_expert:
                raise ValueError("expert id out of range")
            tok_ptr[e + 1] += 1
    n_active = 0
    for e in range(n_expert):
        n_active += tok_ptr[e + 1] > 0
        tok_ptr[e + 1] += tok_ptr[e]
    active = np.empty(n_active, np.int64)
    k = 0
    for e in range(n_expert):
        if tok_ptr[e + 1] > tok_ptr[e]:
            active[k] = e
            k += 1
    fill = tok_ptr[:-1].copy()
    tok_idx = np.empty(n_tok * n_used, np.int64)
    tok_w = np.empty(n_tok * n_used, np.float32)
    for t in range(n_tok):
        for j in range(n_used):
            p = fill[ids[t, j]]
            tok_idx[p] = t
            tok_w[p] = weights[t, j]
            fill[ids[t, j]] += 1
    return tok_ptr, tok_idx, tok_w, active


@functools.cache
def _kernel(kind: str, *qtypes):
    """One compiled kernel per combination of weight types, shared by every layer using it (the
    closures hold the types' codes, so their cache entries are found again by the next process)."""
    make = _make_gate_up if kind == "gate_up" else _make_down
    return make(*(BLOCKS[q].code for q in qtypes))


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
    f_range: tuple[int, int]  # rows of gate/up (columns of h) this worker computes
    d_range: tuple[int, int]  # rows of down (columns of the output)
    buffers: tuple[np.ndarray, np.ndarray, np.ndarray]  # flat gate, up, down bytes it reads
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray]  # per expert: byte offset of its first row
    strides: tuple[int, int, int]  # bytes per row


def supported_stacks(gate: Stack, up: Stack, down: Stack) -> bool:
    return experts_run_on_engine(*((s.qtype, s.in_features) for s in (gate, up, down)))


class CpuExperts:
    """A layer's experts [E, F, D], partitioned over the executor's workers (and NUMA nodes)."""

    def __init__(self, gate: Stack, up: Stack, down: Stack, executor: Executor):
        if not supported_stacks(gate, up, down):
            raise ValueError("no CPU kernels for these expert types")
        self.executor = executor
        self.n_expert, self.n_ff, self.n_embd = gate.raw.shape[0], gate.raw.shape[1], gate.in_features
        self.gate_kind, self.down_kind = BLOCKS[gate.qtype], BLOCKS[down.qtype]
        self.gate_up = _kernel("gate_up", gate.qtype, up.qtype)
        self.down = _kernel("down", down.qtype)
        self.shares: list[WorkerShare | None] = [None] * executor.n_threads
        pack = executor.n_nodes > 1
        f_nodes, d_nodes = split(self.n_ff, executor.n_nodes, 4), split(self.n_embd, executor.n_nodes, 4)
        for node, ((f0, f1), (d0, d1)) in enumerate(zip(f_nodes, d_nodes, strict=True)):
            workers = executor.node_workers(node)
            if pack:
                bufs, f_base, d_base = self._pack(node, gate, up, down, (f0, f1), (d0, d1)), f0, d0
            else:
                bufs, f_base, d_base = (gate.raw, up.raw, down.raw), 0, 0
            f_split, d_split = split(f1 - f0, len(workers), 4), split(d1 - d0, len(workers), 4)
            for w, (fa, fb), (da, db) in zip(workers, f_split, d_split, strict=False):
                self.shares[w.index] = self._share(bufs, (f0 + fa, f0 + fb), f_base, (d0 + da, d0 + db), d_base)

    def _share(self, bufs, f_range, f_base, d_range, d_base) -> WorkerShare:
        """Byte offsets of each expert's first row of this worker in buffers holding rows from
        f_base (gate/up) and d_base (down) on."""
        g, u, d = bufs
        e = np.arange(self.n_expert, dtype=np.int64)
        offsets = (
            e * g.shape[1] * g.shape[2] + (f_range[0] - f_base) * g.shape[2],
            e * u.shape[1] * u.shape[2] + (f_range[0] - f_base) * u.shape[2],
            e * d.shape[1] * d.shape[2] + (d_range[0] - d_base) * d.shape[2],
        )
        flat = (g.reshape(-1), u.reshape(-1), d.reshape(-1))
        return WorkerShare(f_range, d_range, flat, offsets, (g.shape[2], u.shape[2], d.shape[2]))

    def _pack(self, node: int, gate: Stack, up: Stack, down: Stack, f_range, d_range):
        """Node-local copies of the node's rows of every expert, made by a worker of that node
        so that its first touch places the pages there."""
        result = {}

        def copy():
            result["bufs"] = (
                np.array(gate.raw[:, f_range[0] : f_range[1]]),
                np.array(up.raw[:, f_range[0] : f_range[1]]),
                np.array(down.raw[:, d_range[0] : d_range[1]]),
            )

        first = self.executor.node_workers(node)[0].index
        self.executor.run([copy if w.index == first else None for w in self.executor.workers])
        return result["bufs"]

    def submit(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, also: tuple = ()) -> "ExpertsHandle":
        """x float32 [T, D], ids int [T, A], weights float32 [T, A] -> a handle; the experts run
        on the workers while the caller goes on. `also`: (CpuExperts, ids, weights) of more
        experts on the same x and workers (the shared experts), run in the same hand-off."""
        out = np.zeros((x.shape[0], self.n_embd), np.float32)
        quantized: dict[int, QuantizedActivations] = {}  # x once per activation format, for all sets

        def acts(form: int) -> QuantizedActivations:
            return quantized.get(form) or quantized.setdefault(form, quantize(x, form))

        jobs = [self.phases(acts, ids, weights, out)] + [other.phases(acts, i, w, out) for other, i, w in also]
        n = len(self.shares)
        barrier = SpinBarrier(n)

        def worker(k):
            try:
                for phase1, _ in jobs:
                    phase1[k]()
            except BaseException:
                barrier.abort()  # the others must not wait for this worker forever
                raise
            barrier.wait()
            for _, phase2 in jobs:
                phase2[k]()

        return ExpertsHandle(self.executor.submit([lambda k=k: worker(k) for k in range(n)]), out)

    def phases(self, quantized_x, ids: np.ndarray, weights: np.ndarray, out: np.ndarray):
        """Per worker: the gate/up callable and the down callable (adding into out).
        quantized_x(form) gives the layer input quantized in an activation format."""
        acts = quantized_x(self.gate_kind.act_form)
        ids = np.ascontiguousarray(ids, np.int64)
        tok_ptr, tok_idx, tok_w, active = group_by_expert(ids, np.ascontiguousarray(weights, np.float32), self.n_expert)
        h = np.empty((ids.size, self.n_ff), np.float32)
        prompt = is_prompt(ids.shape[0])
        g_blocks = self.n_embd // self.gate_kind.values
        d_blocks = self.n_ff // self.down_kind.values
        first, second = [], []
        for s in self.shares:
            if s is None:
                first.append(lambda: None)
                second.append(lambda: None)
                continue
            (fa, fb), (da, db) = s.f_range, s.d_range
            (gw, uw, dw), (g_off, u_off, d_off), (g_rs, u_rs, d_rs) = s.buffers, s.offsets, s.strides
            first.append(
                lambda gw=gw, uw=uw, g_off=g_off, u_off=u_off, g_rs=g_rs, u_rs=u_rs, fa=fa, fb=fb: self.gate_up(
                    gw, uw, g_off, u_off, g_rs, u_rs, fb - fa, g_blocks,
                    acts.xq, acts.dx, acts.xs, acts.xf, tok_ptr, tok_idx, active, h, fa, prompt,
                )
            )  # fmt: skip
            second.append(
                lambda dw=dw, d_off=d_off, d_rs=d_rs, da=da, db=db: self.down(
                    dw, d_off, d_rs, db - da, d_blocks, h, self.down_kind.act_form,
                    tok_ptr, tok_idx, tok_w, active, out, da, prompt,
                )
            )  # fmt: skip
        return first, second


class ExpertsHandle:
    def __init__(self, handle: Handle, out: np.ndarray):
        self.handle = handle
        self.out = out

    def wait(self) -> np.ndarray:
        """float32 [T, D]: the routing-weighted sum of the chosen experts."""
        self.handle.wait()
        return self.out
