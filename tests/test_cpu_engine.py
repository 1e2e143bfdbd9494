"""The executor (pinning, async jobs, errors), NUMA topology, and the fused expert MLP against float64."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from test_quants import random_rows

from cpu_ops.activations import GROUP, Q8_0, Q8_1, Q8_K, quantize
from cpu_ops.executor import Executor, plan_workers
from cpu_ops.experts import CpuExperts, Stack
from cpu_ops.matmul import CpuMatrix
from cpu_ops.topology import Topology, detect_topology, parse_cpulist, simulated
from modelfile.errors import HeteroError
from modelfile.quants import dequantize


def test_cpulist_and_detected_topology(tmp_path):
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    mine = sorted(os.sched_getaffinity(0))
    for i, cpus in enumerate([mine[::2], mine[1::2]]):
        (tmp_path / f"node{i}").mkdir()
        (tmp_path / f"node{i}" / "cpulist").write_text(",".join(map(str, cpus)))
    topo = detect_topology(tmp_path)
    if len(mine) > 1:
        assert topo.nodes == (tuple(mine[::2]), tuple(mine[1::2]))
    assert detect_topology(tmp_path / "missing").nodes == (tuple(mine),)  # no /sys: one node
    assert detect_topology().n_cpus == len(mine)


def test_workers_spread_over_nodes_in_proportion():
    topo = Topology(((0, 1, 2, 3), (4, 5), (6, 7)))
    workers = plan_workers(topo, 4)
    assert [w.node for w in workers] == [0, 0, 1, 2]
    assert [w.cpu for w in workers] == [0, 1, 4, 6]
    assert len({w.cpu for w in plan_workers(topo, None)}) == 8
    assert all(w.cpu is None for w in plan_workers(topo, 3, pin=False))
    for bad in (0, 65):  # 65 > 8 per CPU: a typo, not oversubscription
        with pytest.raises(HeteroError, match=f"--threads {bad}: this machine has 8 CPUs"):
            plan_workers(topo, bad)


def test_workers_are_pinned_and_jobs_run_asynchronously():
    with Executor(threads=2) as ex:
        seen = [None] * 2

        def where(i):
            seen[i] = os.sched_getaffinity(0)

        ex.run([lambda: where(0), lambda: where(1)])
        assert seen == [{w.cpu} for w in ex.workers]
        gate = threading.Event()
        handle = ex.submit([gate.wait, None])  # the caller goes on while a worker is busy
        assert not handle.done()
        gate.set()
        handle.wait()
        assert handle.done()


def test_worker_errors_reach_wait():
    with Executor(threads=2) as ex:

        def boom():
            raise RuntimeError("kernel failed")

        with pytest.raises(RuntimeError, match="kernel failed"):
            ex.run([boom, lambda: time.sleep(0.01)])
        ex.run([lambda: None, lambda: None])  # still usable
        with pytest.raises(ValueError, match="3 tasks for 2 workers"):
            ex.submit([None] * 3)


def test_engine_limits_torch_to_one_thread():
    before = torch.get_num_threads()
    try:
        with Executor(threads=2):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


E, D = 8, 256


def _stack(qtype, rows, k, rng):
    raw = random_rows(qtype, E * rows, k // GGML_QUANT_SIZES[qtype][0], rng)
    dense = dequantize(torch.from_numpy(raw), qtype, k).double().numpy().reshape(E, rows, k)
    return Stack(raw.reshape(E, rows, -1), qtype, k), dense


def _block_mins(raw: np.ndarray, qtype) -> np.ndarray | None:
    """float64 [E, rows, K / 32]: each block's min m (weight = d * q + m) for Q4_1 and Q5_1."""
    if qtype not in (T.Q4_1, T.Q5_1):
        return None
    size = GGML_QUANT_SIZES[qtype][1]
    blocks = np.ascontiguousarray(raw).reshape(*raw.shape[:2], -1, size)
    return np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float64)


def _sum_rounding(qa, t: int) -> np.ndarray:
    """float64 [K / 32]: what Q8_1's block sum s = float16(d * sum(q)), rounded from float32 as
    the kernels do, adds over float16(d) * sum(q) (the weights' min multiplies s)."""
    sums = qa.xs[t].reshape(-1, 2).sum(1).astype(np.float32)
    s = (qa.dx[t].astype(np.float32) * sums).astype(np.float16).astype(np.float64)
    return s - qa.dx[t].astype(np.float16).astype(np.float64) * sums


def _reference(dense, x, ids, weights, gate_form, down_form, float_gate=False, mins=(None, None, None)):
    """float64 expert MLP on the activations as the kernels quantize them (float weights take x
    rounded to their own format). Returns the result and the error allowed per element: float32
    rounding (relative to the sum of |terms|), plus what the kernel's float32 h (within dh of the float64 one: 2e-6 of
    the gate and up sums of |terms|) can change in h's int8 rounding: one step for a value near
    a rounding boundary (within 1e-3 of a step, or within what dh and the group's amax moving
    by its own dh shift it), and, for groups whose float16 scale (Q8_0 and Q8_1, group 32) sits
    that close to a float16 rounding midpoint, the other scale: one float16 ulp per int8 unit.
    mins: each stack's block mins (Q4_1, Q5_1), which multiply Q8_1's rounded block sums."""
    g, u, d = dense
    g_min, u_min, d_min = mins
    down_group = GROUP[down_form]
    xq = quantize(x, gate_form)
    xa = xq.xf.astype(np.float64) if float_gate else xq.dequantized()
    out = np.zeros_like(xa)
    allowed = np.zeros_like(xa)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], weights[t], strict=True):
            gg, uu = g[e] @ xa[t], u[e] @ xa[t]
            if g_min is not None:
                gg, uu = gg + g_min[e] @ _sum_rounding(xq, t), uu + u_min[e] @ _sum_rounding(xq, t)
            sig = 1 / (1 + np.exp(-np.clip(gg, -80, 80)))
            h = gg * sig * uu
            dg, du = 2e-6 * (np.abs(g[e]) @ np.abs(xa[t])), 2e-6 * (np.abs(u[e]) @ np.abs(xa[t]))
            dh = np.abs(sig * (1 + gg * (1 - sig)) * uu) * dg + np.abs(gg * sig) * du  # how far h may move
            hq = quantize(h[None].astype(np.float32), down_form)
            ha = hq.dequantized()[0]
            step = np.repeat(hq.dx[0].astype(np.float64), 32)
            groups = np.abs(h).reshape(-1, down_group)
            top = groups.argmax(-1)
            amax = groups[np.arange(len(top)), top]
            amax_moves = dh.reshape(-1, down_group)[np.arange(len(top)), top] / np.where(amax > 0, amax, 1)
            multiplier = np.repeat(127 / np.where(amax > 0, amax, 1), down_group)
            shift = np.abs(h) * multiplier * np.repeat(amax_moves, down_group)  # in steps, from amax moving
            frac = np.abs(h * multiplier) % 1.0
            near = np.abs(frac - 0.5) < 1e-3 + dh * multiplier + shift
            flip = np.zeros_like(h)
            if down_form in (Q8_0, Q8_1):  # the scale is float16(amax / 127): near a midpoint, either way
                scale = amax / 127
                d16 = scale.astype(np.float16)
                up, down = np.nextafter(d16, np.float16(np.inf)), np.nextafter(d16, np.float16(0))
                mid = np.minimum(np.abs(scale - (d16 + up.astype(np.float64)) / 2),
                                 np.abs(scale - (d16 + down.astype(np.float64)) / 2))  # fmt: skip
                close = mid <= scale * amax_moves + 1e-12
                ulp = np.abs(up.astype(np.float64) - d16)
                flip = np.repeat(close * ulp, 32) * np.abs(np.rint(ha / np.where(step > 0, step, 1)))
            out[t] += w * (d[e] @ ha + (0.0 if d_min is None else d_min[e] @ _sum_rounding(hq, 0)))
            allowed[t] += abs(w) * (2e-5 * (np.abs(d[e]) @ np.abs(ha)) + np.abs(d[e]) @ (near * step + flip))
    return out, allowed


CASES = {
    "decode": (1, 6, None),
    "prefill": (9, 3, None),
    "one_expert_for_all": (7, 1, 5),
}


EXPERT_TYPES = [
    (T.Q4_K, T.Q6_K), (T.Q4_K, T.Q5_0), (T.Q8_0, T.IQ4_XS), (T.BF16, T.Q4_0), (T.Q2_K, T.Q3_K), (T.Q3_K, T.Q2_K),
    (T.Q5_1, T.Q4_1), (T.Q4_K, T.Q5_1),  # Q8_1 activations, weights with a min (llama.cpp's fallback types)
]  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("types", EXPERT_TYPES, ids=str)
@pytest.mark.parametrize("nodes", [1, 2])
def test_fused_experts_match_float64(case, types, nodes):
    """Fresh weights and inputs; 2 simulated NUMA nodes pack node-local copies and must agree."""
    rng = np.random.default_rng()
    tokens, used, only = CASES[case]
    gate_t, down_t = types
    f = 512
    (gs, g), (us, u), (ds, d) = _stack(gate_t, f, D, rng), _stack(gate_t, f, D, rng), _stack(down_t, D, f, rng)
    # Q8_1 keeps each block's sum as a float16, as llama.cpp does: these random weights' positive
    # mins would push h's block sums past 65504 at unit-scale inputs, no real layer's
    scale = 0.1 if {gate_t, down_t} & {T.Q4_1, T.Q5_1} else 1.0
    x = (scale * rng.standard_normal((tokens, D))).astype(np.float32)
    ids = np.stack([rng.choice(E - 1, used, replace=False) for _ in range(tokens)])  # expert 7: never chosen
    if only is not None:
        ids[:] = only
    weights = rng.random((tokens, used)).astype(np.float32)
    with Executor(threads=2, topology=simulated(nodes)) as ex:
        experts = CpuExperts(gs, us, ds, ex)
        ours = experts.submit(x, ids, weights).wait()
        forms = experts.gate_kind.act_form, experts.down_kind.act_form
    mins = (_block_mins(gs.raw, gate_t), _block_mins(us.raw, gate_t), _block_mins(ds.raw, down_t))
    expected, allowed = _reference((g, u, d), x, ids, weights, *forms, float_gate=gate_t == T.BF16, mins=mins)
    err = np.abs(ours - expected)
    assert np.all(err <= allowed + 1e-30), float((err / allowed).max())


def test_four_workers_split_gate_up_by_rows_and_down_by_rows():
    rng = np.random.default_rng()
    (gs, g), (us, u), (ds, d) = _stack(T.Q4_K, 256, D, rng), _stack(T.Q4_K, 256, D, rng), _stack(T.Q4_K, D, 256, rng)
    x = rng.standard_normal((3, D)).astype(np.float32)
    ids = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6]])
    weights = rng.random((3, 4)).astype(np.float32)
    with Executor(threads=4, topology=Topology((tuple(sorted(os.sched_getaffinity(0))),)), pin=False) as ex:
        experts = CpuExperts(gs, us, ds, ex)
        assert [s.f_range for s in experts.shares] == [(0, 64), (64, 128), (128, 192), (192, 256)]
        assert [s.d_range for s in experts.shares] == [(0, 64), (64, 128), (128, 192), (192, 256)]
        ours = experts.submit(x, ids, weights).wait()
    expected, allowed = _reference((g, u, d), x, ids, weights, Q8_K, Q8_K)
    assert np.all(np.abs(ours - expected) <= allowed)


def test_a_failing_worker_does_not_hang_the_others():
    rng = np.random.default_rng()
    (gs, _), (us, _), (ds, _) = _stack(T.Q4_K, 256, D, rng), _stack(T.Q4_K, 256, D, rng), _stack(T.Q4_K, D, 256, rng)
    with Executor(threads=2) as ex:
        experts = CpuExperts(gs, us, ds, ex)
        kernel = experts.gate_up

        def second_worker_fails(*args):
            if args[-2] != 0:  # h_col: only the worker whose F-range does not start at 0
                raise RuntimeError("worker failed")
            kernel(*args)

        experts.gate_up = second_worker_fails
        x, ids, w = rng.standard_normal((1, D)).astype(np.float32), np.array([[1]]), np.ones((1, 1), np.float32)
        with pytest.raises((RuntimeError, threading.BrokenBarrierError)):
            experts.submit(x, ids, w).wait()
        experts.gate_up = kernel
        assert np.isfinite(experts.submit(x, ids, w).wait()).all()  # the pool is still usable


def test_node_copies_hold_only_their_share():
    rng = np.random.default_rng()
    (gs, _), (us, _), (ds, _) = _stack(T.Q4_K, 512, D, rng), _stack(T.Q4_K, 512, D, rng), _stack(T.Q5_0, D, 512, rng)
    with Executor(threads=2, topology=simulated(2)) as ex:
        experts = CpuExperts(gs, us, ds, ex)
        held = sum(s.buffers[0].nbytes + s.buffers[1].nbytes + s.buffers[2].nbytes for s in experts.shares)
    assert held == gs.raw.nbytes + us.raw.nbytes + ds.raw.nbytes  # split, not duplicated
    assert all(not np.shares_memory(s.buffers[0], gs.raw) for s in experts.shares)


def test_compiled_kernels_are_cached_under_a_hash_of_the_sources():
    """numba checks only the defining file's timestamp; the IR comes from other modules, so the
    cache directory is named by a hash of all of cpu_ops (a change there recompiles)."""
    import numba

    from cpu_ops.kernel_cache import cache_dir

    if os.environ.get("NUMBA_CACHE_DIR"):
        pytest.skip("the user chose the cache directory")
    cache = cache_dir()
    assert numba.config.CACHE_DIR == str(cache) and len(cache.name) == 16
    rng = np.random.default_rng()
    stack, _ = _stack(T.Q4_K, 4, D, rng)
    m = CpuMatrix(stack.raw.reshape(E * 4, -1), T.Q4_K, D)
    m(None, m.quantize(rng.standard_normal((1, D)).astype(np.float32)))
    assert any(cache.rglob("*.nbi"))


def test_the_expert_kernels_are_found_again_by_the_next_process(tmp_path):
    """Each (gate/up type, down type) pair compiles an expert kernel; its cache entry is keyed by
    what the kernel captures, which must pickle the same in every process (a compiled function
    did not: every run compiled them again, seconds each, and the index grew by one per run)."""
    code = """
import numpy as np
from gguf import GGMLQuantizationType as T
from benchmarks.cpu_kernels import random_matrix
from cpu_ops.executor import Executor
from cpu_ops.experts import CpuExperts, Stack, _kernel
rng = np.random.default_rng()
stacks = [Stack(random_matrix(T.Q4_K, 2 * r, k, rng).reshape(2, r, -1), T.Q4_K, k)
          for r, k in ((256, 256), (256, 256), (256, 256))]
with Executor(threads=1) as ex:
    x = rng.standard_normal((2, 256)).astype(np.float32)
    CpuExperts(*stacks, ex).submit(x, np.array([[0], [1]]), np.ones((2, 1), np.float32)).wait()
k = _kernel("gate_up", T.Q4_K, T.Q4_K)
print(len(k.stats.cache_hits), len(k.stats.cache_misses))
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    runs = [subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]  # fmt: skip
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert [r.stdout.split() for r in runs] == [["0", "1"], ["1", "0"]]


def test_cache_writes_hold_a_lock_other_processes_wait_for(tmp_path):
    """numba picks a cache entry's file number from the index it read: two processes saving at
    once could give two kernels one file. Saves take an exclusive lock on the cache directory,
    so a second save waits for the first (a thread stands in for the other process: flock
    locks separate opens of the file against each other)."""
    from cpu_ops import kernel_cache

    class FakeCache:  # what _cache_lock reads of numba's Cache
        class _cache_file:
            _index_path = str(tmp_path / "kernels.nbi")

    order = []
    first_inside, release = threading.Event(), threading.Event()

    def slow_save(cache, sig, data):
        order.append(f"{data} in")
        if data == "first":
            first_inside.set()
            release.wait(30)
        order.append(f"{data} out")

    save = kernel_cache._locked_save(slow_save)
    first = threading.Thread(target=save, args=(FakeCache(), None, "first"))
    first.start()
    first_inside.wait(30)
    second = threading.Thread(target=save, args=(FakeCache(), None, "second"))
    second.start()
    time.sleep(0.3)  # time enough for the second save to get in, were there no lock
    assert order == ["first in"]
    release.set()
    first.join(30)
    second.join(30)
    assert order == ["first in", "first out", "second in", "second out"]


def test_without_avx2_the_model_falls_back_to_the_reference_ops(synth, monkeypatch):
    import hetero
    import hetero.model

    path = synth("tiny", "Q8_0", n_expert_used=8)
    monkeypatch.setattr(hetero.model, "HAVE_AVX2", False)
    plain = hetero.load_model(path)
    assert plain.executor is None and plain.net.find(1, "moe").experts.cpu is None
    monkeypatch.undo()
    fast = hetero.load_model(path, threads=2)
    assert fast.executor is not None and fast.executor.n_threads == 2
    ids = [plain.tokenizer.bos_id, *np.random.default_rng().integers(0, 600, 9).tolist()]
    ref, ours = plain.logits(ids), fast.logits(ids)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 3e-2  # int8 activation rounding only


def test_spin_primitives_count_exactly_and_give_up_in_time():
    """fetch_add from two threads loses no increment; spin_until sees a store from another
    thread and returns False when nothing arrives; an aborted barrier releases its waiters."""
    from cpu_ops.spin import SpinBarrier, fetch_add, spin_until

    counter = np.zeros(1, np.int64)
    n = int(np.random.default_rng().integers(20_000, 40_000))

    def add():
        for _ in range(n):
            fetch_add(counter, 0, 1)

    threads = [threading.Thread(target=add) for _ in range(2)]
    for t in threads:
        t.start()
    assert spin_until(counter, 0, 2 * n, 10_000_000)  # waits for the other threads' stores
    for t in threads:
        t.join()
    assert counter[0] == 2 * n
    assert not spin_until(counter, 0, 2 * n + 1, 100)

    barrier, seen = SpinBarrier(3), []

    def meet():
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            seen.append("broken")

    waiters = [threading.Thread(target=meet) for _ in range(2)]
    for t in waiters:
        t.start()
    barrier.abort()  # the third party fails instead of arriving
    for t in waiters:
        t.join(timeout=10)
    assert seen == ["broken", "broken"]
