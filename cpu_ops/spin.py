"""Waiting without sleeping: a native spin on a counter, for the hand-offs between kernels.

A sleeping thread on this kind of machine (a VM whose idle vCPUs halt) takes 50-150 us to wake,
and a decode step hands work to the workers ~25 times. So workers and the caller first spin on
a counter in native code, without the GIL (a Python loop would hold it and starve the thread
doing the work), calling sched_yield between polls so a spinning thread gives its core to
any thread that has real work. Only after `SPIN_POLLS` polls (~ milliseconds) do they fall
back to blocking, so an idle engine costs nothing.
"""

import threading

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

SPIN_POLLS = 4000  # each poll is one sched_yield (~0.5-1 us when no other thread wants the core)


@intrinsic
def _load_acquire(typingctx, arr, index):
    """arr[index] of an int64 array, read with acquire ordering (never hoisted out of a loop)."""

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(a.data, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(arr, index), codegen


@intrinsic
def _pause(typingctx):
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _sched_yield(typingctx):
    """libc's sched_yield, declared in the IR (a ctypes handle would keep numba from caching)."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@numba.njit(nogil=True, cache=True)
def spin_until(counters: np.ndarray, index: int, target: int, polls: int) -> bool:
    """Whether counters[index] reached `target` within `polls` polls (GIL released meanwhile)."""
    for _ in range(polls):
        if _load_acquire(counters, index) >= target:
            return True
        _pause()
        _sched_yield()
    return _load_acquire(counters, index) >= target


@intrinsic
def _fetch_add(typingctx, arr, index, value):
    """Atomically add value to arr[index] of an int64 array; returns the value before."""

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", builder.gep(a.data, [args[1]]), args[2], "seq_cst")

    return types.int64(arr, index, types.int64), codegen


@numba.njit(nogil=True, cache=True)
def fetch_add(counters: np.ndarray, index: int, value: int) -> int:
    return _fetch_add(counters, index, value)


class SpinBarrier:
    """n threads meet here once; waiting spins natively (see above) instead of sleeping.

    A thread that fails calls abort(), which releases the others with BrokenBarrierError, as
    threading.Barrier does, so no worker waits forever for one that died.
    """

    def __init__(self, n: int):
        self.n = n
        self.state = np.zeros(2, np.int64)  # threads arrived (n more on abort), aborted

    def wait(self) -> None:
        fetch_add(self.state, 0, 1)
        while not spin_until(self.state, 0, self.n, SPIN_POLLS):
            pass  # a long phase (prefill): keep yielding the core until the others arrive
        if self.state[1]:
            raise threading.BrokenBarrierError

    def abort(self) -> None:
        self.state[1] = 1
        fetch_add(self.state, 0, self.n)
