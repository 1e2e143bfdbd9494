"""Quantized matmul kernels: rows of GGUF blocks times quantized activations, one thread each.

`row_dot(code, ...)` is one output value: a loop over the row's blocks (LLVM IR from
`blocks.py`) accumulating 8 float lanes. `matmul_rows` runs a range of rows for every token,
so prefill (many tokens) reuses each weight row from L1 while a tile of tokens' activations
stays in L2. The kernels release the GIL and never start threads: the executor (`executor.py`)
decides who runs which rows. `matmul_rows_any` is the native step's entry: the type is known
only at run time there, so one switch picks the type's own row loop. Types with a multi-row
body (`BlockKind.rows`: Q4_K) take ROWS rows at once for prompts (`rows_dot`, docs/ARCHITECTURE.md).
"""

from dataclasses import dataclass

import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from cpu_ops.blocks import BLOCKS, GROUP, ROWS, Act, legacy_group
from cpu_ops.simd import F32, I8, I32, I64, const, hsum, vec

UNROLL_32 = 4  # 32-value blocks per loop step, each into its own accumulator


def _i8_pointer(context, builder, array_type, array):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(data, I8.as_pointer())


def _act(builder, ptrs, xo) -> Act:
    """Pointers to the activations from element xo (a multiple of 32) on."""
    return Act(
        xq=builder.gep(ptrs[0], [xo]),
        dx=builder.gep(ptrs[1], [builder.mul(builder.udiv(xo, const(I64, 32)), const(I64, 4))]),
        xs=builder.gep(ptrs[2], [builder.mul(builder.udiv(xo, const(I64, 16)), const(I64, 4))]),
        xf=builder.gep(ptrs[3], [builder.mul(xo, const(I64, 4))]),
    )


def _acts_at(builder, ptrs, x_off, x_stride, n_tok: int, i, values: int) -> list[Act]:
    """Pointers to n_tok tokens' activations (token t at element x_off + t * x_stride) from value
    i * values of the row on."""
    acts = []
    for t in range(n_tok):
        token = builder.add(x_off, builder.mul(x_stride, const(I64, t)))
        acts.append(_act(builder, ptrs, builder.add(token, builder.mul(i, const(I64, values)))))
    return acts


def _row_dot_codegen(kind, n_tok: int, lone: bool = True):
    """IR for n_tok dot products of one weight row with n_tok activation rows (stride x_stride):
    each block of the row is decoded once and multiplied with every token's slice.

    32-value blocks each add a float vector into the sum (their scales differ per block), and
    one accumulator would chain those adds: a float add's latency per 32 values. For one token
    their loop takes UNROLL_32 blocks per step into as many accumulators (the K-quants convert
    once per 256 values and keep one); several tokens are as many chains already, and more
    accumulators would spill out of AVX2's 16 registers (Q8_0, 4 tokens: 220 instructions and
    16 stack accesses per step of 4 blocks before, 52 and none per block now). The add fuses
    with the 32-value legacy bodies' last multiply (the `contract` flag) into one fma, as
    llama.cpp's dot does. For several tokens the legacy types take GROUP blocks per step
    (`blocks.legacy_group`: one conversion and scaling per 8 blocks; Q8_0 at 64 tokens 12.6 ->
    22 GMAC/s per thread, Q5_0 11-16 -> 27), the rest of the row block by block. So a prompt's
    32-value sums run in another order than one token's; `lone=False` gives one token the
    several-token order (a prompt's token alone in its call: see `rows_of`)."""

    def codegen(context, builder, sig, args):
        _, w_arr, w_off, n_blocks, xq, dx, xs, xf, x_off, x_stride = args
        w_ptr = _i8_pointer(context, builder, sig.args[1], w_arr)
        ptrs = [_i8_pointer(context, builder, t, a) for t, a in zip(sig.args[4:8], (xq, dx, xs, xf), strict=True)]
        zero = ir.Constant(vec(F32, 8), [0.0] * 8)
        several = n_tok > 1 or not lone
        grouped = kind.values_of is not None and several
        unroll = UNROLL_32 if kind.values == 32 and not several else 1  # many tokens: a chain each
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(n_tok)] for _ in range(unroll)]

        def acts_at(i, values):
            return _acts_at(builder, ptrs, x_off, x_stride, n_tok, i, values)

        def add_into(into, vectors):
            for acc, v in zip(into, vectors, strict=True):
                builder.store(builder.fadd(builder.load(acc), v, flags=("contract",)), acc)

        def block(i, into):
            wp = builder.gep(w_ptr, [builder.add(w_off, builder.mul(i, const(I64, kind.nbytes)))])
            add_into(into, kind.body(builder, wp, acts_at(i, kind.values)))

        first = const(I64, 0)
        if grouped:  # GROUP blocks at a time, then the rest one by one
            with cgutils.for_range(builder, builder.udiv(n_blocks, const(I64, GROUP))) as loop:
                wp = builder.gep(w_ptr, [builder.add(w_off, builder.mul(loop.index, const(I64, GROUP * kind.nbytes)))])
                acts = acts_at(loop.index, GROUP * kind.values)
                add_into(accs[0], legacy_group(builder, wp, acts, kind))
            first = builder.mul(builder.udiv(n_blocks, const(I64, GROUP)), const(I64, GROUP))
        steps = builder.udiv(builder.sub(n_blocks, first), const(I64, unroll))
        with cgutils.for_range(builder, steps) as loop:
            for u in range(unroll):
                step = builder.add(builder.mul(loop.index, const(I64, unroll)), const(I64, u))
                block(builder.add(first, step), accs[u])
        if unroll > 1:
            done = builder.add(first, builder.mul(steps, const(I64, unroll)))
            with cgutils.for_range(builder, builder.sub(n_blocks, done)) as loop:
                block(builder.add(done, loop.index), accs[0])
        sums = []
        for t in range(n_tok):
            total = builder.load(accs[0][t])
            for u in range(1, unroll):
                total = builder.fadd(total, builder.load(accs[u][t]))
            sums.append(hsum(builder, total))
        return sums[0] if n_tok == 1 else context.make_tuple(builder, sig.return_type, sums)

    return codegen


def _row_dot_intrinsic(n_tok: int, lone: bool = True):
    @intrinsic
    def row_dot(typingctx, code, w, w_off, n_blocks, xq, dx, xs, xf, x_off, x_stride):
        """Dot products of one weight row (n_blocks blocks of type `code`, a literal, at byte w_off
        of w) with the activations of n_tok tokens starting at element x_off (a multiple of 32)."""
        if not isinstance(code, types.IntegerLiteral):
            raise numba.errors.TypingError("row_dot needs the block type as a literal")
        kind = next(k for k in BLOCKS.values() if k.code == code.literal_value)
        ret = types.float32 if n_tok == 1 else types.UniTuple(types.float32, n_tok)
        return ret(code, w, w_off, n_blocks, xq, dx, xs, xf, x_off, x_stride), _row_dot_codegen(kind, n_tok, lone)

    return row_dot


ROW_TOKENS = 16  # tokens a multi-row call takes at most (its per-token sums live on the stack)
MULTI_ROW_TOKENS = 3  # decoding, fewer tokens than this go row by row (one token: its rows serve nobody else)


@dataclass(frozen=True)
class TokenLoop:
    """What a multi-row body (`BlockKind.rows`) sees of a call's tokens at one block: a run-time
    loop over them with each token's activations, and per token and set of four rows a slot for
    the block's integer sums (`dot`) and one for the running float sum (`acc`)."""

    builder: ir.IRBuilder
    ptrs: list
    first: ir.Value  # element offset of token 0's activations at this block
    stride: ir.Value  # elements from one token to the next
    n_tok: ir.Value
    dots: ir.Value
    accs: ir.Value

    def each(self, body) -> None:
        b = self.builder
        with cgutils.for_range(b, self.n_tok) as loop:
            body(loop.index, _act(b, self.ptrs, b.add(self.first, b.mul(loop.index, self.stride))))

    def dot(self, t, i):
        return _slot(self.builder, self.dots, t, i)

    def acc(self, t, i):
        return _slot(self.builder, self.accs, t, i)


def _slot(builder, slots, t, i):
    """Token t's slot for the set of four rows i in a stack array of ROW_TOKENS * ROWS // 4."""
    return builder.gep(slots, [builder.add(builder.mul(t, const(I64, ROWS // 4)), const(I64, i))])


def _rows_codegen(kind):
    """IR for ROWS rows times n_tok <= ROW_TOKENS tokens through the type's multi-row body,
    written to out[out_row + t, out_col + r]. A type without one writes nothing (callers check
    MULTI_ROW)."""

    def codegen(context, builder, sig, args):
        _, w_arr, w_off, row_stride, n_blocks, xq, dx, xs, xf, x_off, x_stride, n_tok, out, out_row, out_col = args
        if kind.rows is None:
            return context.get_dummy_value()
        w_ptr = _i8_pointer(context, builder, sig.args[1], w_arr)
        ptrs = [_i8_pointer(context, builder, t, a) for t, a in zip(sig.args[5:9], (xq, dx, xs, xf), strict=True)]
        slots = const(I64, ROW_TOKENS * ROWS // 4)
        dots = cgutils.alloca_once(builder, vec(I32, 8), size=slots)
        accs = cgutils.alloca_once(builder, vec(F32, 8), size=slots)
        with cgutils.for_range(builder, slots) as loop:
            builder.store(ir.Constant(vec(F32, 8), [0.0] * 8), builder.gep(accs, [loop.index]))
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]), "llvm.prefetch.p0i8"
        )
        with cgutils.for_range(builder, n_blocks) as loop:
            block = builder.add(w_off, builder.mul(loop.index, const(I64, kind.nbytes)))
            ws = [builder.gep(w_ptr, [builder.add(block, builder.mul(row_stride, const(I64, r)))]) for r in range(ROWS)]
            for r in range(ROWS):  # the same block of the next ROWS rows, read after this call's last block
                ahead = builder.gep(ws[r], [builder.mul(row_stride, const(I64, ROWS))])
                for line in range(0, kind.nbytes, 64):
                    builder.call(
                        prefetch, [builder.gep(ahead, [const(I64, line)]), const(I32, 0), const(I32, 3), const(I32, 1)]
                    )
            first = builder.add(x_off, builder.mul(loop.index, const(I64, kind.values)))
            kind.rows(builder, ws, TokenLoop(builder, ptrs, first, x_stride, n_tok, dots, accs))
        out_arr = context.make_array(sig.args[12])(context, builder, out)
        with cgutils.for_range(builder, n_tok) as loop:
            for i in range(ROWS // 4):
                total = builder.load(_slot(builder, accs, loop.index, i))
                for r in range(4):
                    lanes = [builder.extract_element(total, const(I32, 2 * r + j)) for j in range(2)]
                    index = [builder.add(out_row, loop.index), builder.add(out_col, const(I64, 4 * i + r))]
                    ptr = cgutils.get_item_pointer(context, builder, sig.args[12], out_arr, index)
                    builder.store(builder.fadd(lanes[0], lanes[1]), ptr)
        return context.get_dummy_value()

    return codegen


@intrinsic
def rows_dot(
    typingctx, code, w, w_off, row_stride, n_blocks, xq, dx, xs, xf, x_off, x_stride, n_tok, out, out_row, out_col
):
    """out[out_row + t, out_col + r] = row r . token t for ROWS rows (row_stride bytes apart from
    byte w_off of w) and n_tok <= ROW_TOKENS tokens (x_stride elements apart from element x_off)."""
    if not isinstance(code, types.IntegerLiteral):
        raise numba.errors.TypingError("rows_dot needs the block type as a literal")
    kind = next(k for k in BLOCKS.values() if k.code == code.literal_value)
    sig = types.none(
        code, w, w_off, row_stride, n_blocks, xq, dx, xs, xf, x_off, x_stride, n_tok, out, out_row, out_col
    )
    return sig, _rows_codegen(kind)


row_dot = _row_dot_intrinsic(1)
row_dot1 = _row_dot_intrinsic(1, lone=False)  # a prompt's token alone in its call, summed as if it were not
row_dot2 = _row_dot_intrinsic(2)  # what is left of a prompt's tokens after fours (an expert's few)
row_dot3 = _row_dot_intrinsic(3)
row_dot4 = _row_dot_intrinsic(4)  # prefill: four tokens per decoded weight block
row_dot8 = _row_dot_intrinsic(8)
MULTI_ROW = tuple(kind.rows is not None for kind in sorted(BLOCKS.values(), key=lambda k: k.code))
WIDE = tuple(kind.values == 256 for kind in sorted(BLOCKS.values(), key=lambda k: k.code))
TILE_BYTES = 256 << 10  # a tile of tokens' activations, kept in L2 while every row passes over it


@intrinsic
def matmul_rows_any(typingctx, code, w, w_off, row_stride, n_rows, n_blocks, xq, dx, xs, xf, out, out_col):
    """One token times n_rows rows of a weight whose block type is known only at run time (the
    native step's tensors): out[out_col + r] = row r . activations, out a 1-D float32 array. A
    switch on `code` over every engine type, each case that type's own row loop (the switch
    inside the loop cost Q8_0 half its speed); an unknown code writes NaN."""
    row_sig = types.float32(code, w, w_off, n_blocks, xq, dx, xs, xf, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        code_v, w_a, w_off_v, stride_v, n_rows_v, n_blocks_v, xq_a, dx_a, xs_a, xf_a, out_a, out_col_v = args
        out_arr = context.make_array(sig.args[10])(context, builder, out_a)

        def store(r, value):
            index = builder.add(out_col_v, r)
            builder.store(value, cgutils.get_item_pointer(context, builder, sig.args[10], out_arr, [index]))

        done = builder.append_basic_block("rows_done")
        unknown = builder.append_basic_block("unknown_type")
        switch = builder.switch(code_v, unknown)
        zero = const(I64, 0)
        for kind in BLOCKS.values():
            case = builder.append_basic_block(f"type_{kind.code}")
            switch.add_case(ir.Constant(code_v.type, kind.code), case)
            builder.position_at_end(case)
            with cgutils.for_range(builder, n_rows_v) as loop:
                offset = builder.add(w_off_v, builder.mul(loop.index, stride_v))
                row_args = (code_v, w_a, offset, n_blocks_v, xq_a, dx_a, xs_a, xf_a, zero, zero)
                store(loop.index, _row_dot_codegen(kind, 1)(context, builder, row_sig, row_args))
            builder.branch(done)
        builder.position_at_end(unknown)
        with cgutils.for_range(builder, n_rows_v) as loop:
            store(loop.index, ir.Constant(F32, float("nan")))
        builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.none(code, w, w_off, row_stride, n_rows, n_blocks, xq, dx, xs, xf, out, out_col), codegen


def is_prompt(n_tokens: int) -> bool:
    """Whether a call of n_tokens tokens is part of a prompt pass (rows_of's prompt=True) or a
    decoded token. A prompt pass has two tokens or more: hetero.models.net never cuts a prompt
    into a one-token pass, and the server never prefills a one-token rest after its cache. (The
    output head of a pass asked for its last row only is a one-token call: the same in a cold
    run and a cached one, which both ask so.)"""
    return n_tokens > 1


@numba.njit(nogil=True, inline="always")
def rows_of(code, w, w_off, row_stride, n_rows, n_blocks, xq, dx, xs, xf, x_off, n_tok, out, out_col, prompt):
    """out[t, out_col + r] = row r . activations of token t (from column x_off), r < n_rows, for
    weights of block type `code`. Inlined into its caller, where `code` is a closure constant
    (a literal): kernels that capture the code, not a compiled function, pickle the same in
    every process, so numba's disk cache finds them again.

    Tokens go in tiles whose activations fit TILE_BYTES; every row passes over one tile before
    the next (a 512-token prompt's activations, 1.4 MB at 2048 wide, would otherwise come from
    L3 for every row: Q4_K 3072 x 2048 went 33 -> 60 GMAC/s on 2 threads). Within a tile a row
    is decoded once per 8 tokens (256-value types) or 4, then 3, 2 or 1 for what is left; types
    with a multi-row body take ROWS rows at a time over tiles of MULTI_ROW_TOKENS or more
    (Q4_K, 704 x 2048, one thread: 1.1x the row loop at 3 tokens, 1.5x at 5-6, 0.9x at 2).

    prompt=True (a prompt pass): each token's sums come out the same however many tokens share
    the call, so a prompt split anywhere gives the same numbers (the prompt cache's promise,
    docs/ARCHITECTURE.md "Prompts are batch-invariant"). The one place the order depends on
    the count is the row loop's lone token, whose 32-value types unroll into several chains,
    and the switch to the multi-row body; a prompt's lone token takes the several-token order
    and the multi-row body at any count (0.84x and 0.89x the row loop at 1 and 2 tokens, paid
    only by an expert that few of a prompt's tokens chose). Decoding (prompt=False) keeps both."""
    k = xf.shape[1]
    tile = max(8, TILE_BYTES // (k + k // 4 + k // 8) // 8 * 8)  # int8 values, sums per 16, scales per 32
    for t0 in range(0, n_tok, tile):
        t1 = min(n_tok, t0 + tile)
        eights = t0 + (t1 - t0) // 8 * 8 if WIDE[code] else t0
        quads = eights + (t1 - eights) // 4 * 4
        n_here = t1 - t0
        grouped = n_rows // ROWS * ROWS if MULTI_ROW[code] and (prompt or n_here >= MULTI_ROW_TOKENS) else 0
        calls = (n_here + ROW_TOKENS - 1) // ROW_TOKENS  # even shares: 17 tokens go as 8 + 9, not 16 + 1
        for r in range(0, grouped, ROWS):
            base, col = w_off + r * row_stride, out_col + r
            for c in range(calls):
                t, stop = t0 + n_here * c // calls, t0 + n_here * (c + 1) // calls
                rows_dot(code, w, base, row_stride, n_blocks, xq, dx, xs, xf, t * k + x_off, k, stop - t, out, t, col)
        for r in range(grouped, n_rows):
            base = w_off + r * row_stride
            for t in range(t0, eights, 8):
                y8 = row_dot8(code, w, base, n_blocks, xq, dx, xs, xf, t * k + x_off, k)
                for j in range(8):
                    out[t + j, out_col + r] = y8[j]
            for t in range(eights, quads, 4):
                y = row_dot4(code, w, base, n_blocks, xq, dx, xs, xf, t * k + x_off, k)
                out[t, out_col + r] = y[0]
                out[t + 1, out_col + r] = y[1]
                out[t + 2, out_col + r] = y[2]
                out[t + 3, out_col + r] = y[3]
            left, t = t1 - quads, quads
            if left == 3:
                y3 = row_dot3(code, w, base, n_blocks, xq, dx, xs, xf, t * k + x_off, k)
                out[t, out_col + r], out[t + 1, out_col + r], out[t + 2, out_col + r] = y3[0], y3[1], y3[2]
            elif left == 2:
                y2 = row_dot2(code, w, base, n_blocks, xq, dx, xs, xf, t * k + x_off, k)
                out[t, out_col + r], out[t + 1, out_col + r] = y2[0], y2[1]
            elif left == 1 and prompt:
                out[t, out_col + r] = row_dot1(code, w, base, n_blocks, xq, dx, xs, xf, t * k + x_off, k)
            elif left == 1:
                out[t, out_col + r] = row_dot(code, w, base, n_blocks, xq, dx, xs, xf, t * k + x_off, k)


def _make_matmul(code: int):
    @numba.njit(nogil=True, cache=True)
    def matmul_rows(w, w_off, row_stride, n_rows, n_blocks, xq, dx, xs, xf, x_off, n_tok, out, out_col, prompt):
        rows_of(code, w, w_off, row_stride, n_rows, n_blocks, xq, dx, xs, xf, x_off, n_tok, out, out_col, prompt)

    return matmul_rows


def _make_matmul_stack(code: int):
    @numba.njit(nogil=True, cache=True)
    def matmul_stack(w, row_bytes, n_rows, n_blocks, first, stop, xq, dx, xs, xf, n_tok, out, prompt):
        """For matrices e in [first, stop) of a stack [E, n_rows, row_bytes]: out[t, e * n_rows + r]
        = row r of matrix e . activations row e * n_tok + t (MLA's per-head products; a prompt's
        tokens share each decoded block as in matmul_rows)."""
        k = xf.shape[1]
        for e in range(first, stop):
            rows_of(code, w, e * n_rows * row_bytes, row_bytes, n_rows, n_blocks, xq, dx, xs, xf,
                    e * n_tok * k, n_tok, out, e * n_rows, prompt)  # fmt: skip

    return matmul_stack


MATMUL_STACK = {qtype: _make_matmul_stack(kind.code) for qtype, kind in BLOCKS.items()}
MATMUL = {qtype: _make_matmul(kind.code) for qtype, kind in BLOCKS.items()}
