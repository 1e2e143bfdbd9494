"""Quantized matmul kernels: rows of GGUF blocks times quantized activations, one thread each.

`row_dot(code, ...)` is one output value: a loop over the row's blocks (LLVM IR from
`blocks.py`) accumulating 8 float lanes. `matmul_rows` runs a range of rows for every token,
so prefill (many tokens) reuses each weight row from L1 while the activations stay in L2. The
kernels release the GIL and never start threads: the executor (`executor.py`) decides who runs
which rows.
"""

import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from cpu_ops.blocks import BLOCKS, Act
from cpu_ops.simd import F32, I8, I64, const, hsum, vec


def _i8_pointer(context, builder, array_type, array):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(data, I8.as_pointer())


@intrinsic
def row_dot(typingctx, code, w, w_off, n_blocks, xq, dx, xs, xf, x_off):
    """Dot product of one weight row (n_blocks blocks of type `code` at byte w_off of w) with
    the activations starting at element x_off (a multiple of 32). `code` must be a constant."""
    if not isinstance(code, types.IntegerLiteral):
        raise numba.errors.TypingError("row_dot needs the block type as a literal")
    kind = next(k for k in BLOCKS.values() if k.code == code.literal_value)
    sig = types.float32(code, w, w_off, n_blocks, xq, dx, xs, xf, x_off)

    def codegen(context, builder, sig, args):
        _, w_arr, w_off, n_blocks, xq, dx, xs, xf, x_off = args
        w_ptr = _i8_pointer(context, builder, sig.args[1], w_arr)
        ptrs = [_i8_pointer(context, builder, t, a) for t, a in zip(sig.args[4:8], (xq, dx, xs, xf), strict=False)]
        acc = cgutils.alloca_once_value(builder, ir.Constant(vec(F32, 8), [0.0] * 8))
        with cgutils.for_range(builder, n_blocks) as loop:
            i = loop.index
            wp = builder.gep(w_ptr, [builder.add(w_off, builder.mul(i, const(I64, kind.nbytes)))])
            xo = builder.add(x_off, builder.mul(i, const(I64, kind.values)))
            act = Act(
                xq=builder.gep(ptrs[0], [xo]),
                dx=builder.gep(ptrs[1], [builder.mul(builder.udiv(xo, const(I64, 32)), const(I64, 4))]),
                xs=builder.gep(ptrs[2], [builder.mul(builder.udiv(xo, const(I64, 16)), const(I64, 4))]),
                xf=builder.gep(ptrs[3], [builder.mul(xo, const(I64, 4))]),
            )
            builder.store(builder.fadd(builder.load(acc), kind.body(builder, wp, act)), acc)
        return hsum(builder, builder.load(acc))

    return sig, codegen


def _make_matmul(code: int):
    @numba.njit(nogil=True, cache=True)
    def matmul_rows(w, w_off, row_stride, n_rows, n_blocks, xq, dx, xs, xf, x_off, n_tok, out, out_col):
        """out[t, out_col + r] = row r . activations of token t (from column x_off), r < n_rows."""
        k = xf.shape[1]
        for r in range(n_rows):
            base = w_off + r * row_stride
            for t in range(n_tok):
                out[t, out_col + r] = row_dot(code, w, base, n_blocks, xq, dx, xs, xf, t * k + x_off)

    return matmul_rows


MATMUL = {qtype: _make_matmul(kind.code) for qtype, kind in BLOCKS.items()}
