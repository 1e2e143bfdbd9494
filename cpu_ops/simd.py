"""A few LLVM vector building blocks for the quantized dot-product kernels.

numba has no vector types and widens integer arithmetic to 64 bits, so its loops never reach the
8-bit multiply-adds that make a quantized GEMV memory-bound (see docs/benchmarks.md). The block
kernels in `blocks.py` are therefore written as LLVM IR with these helpers and called from numba
as intrinsics. Six helpers name AVX2 instructions (vpmaddubsw, vpmaddwd, vpsignb, vpshufb, vphaddw/d);
everything else is plain LLVM vector IR. `HAVE_AVX2` gates the whole engine, and machines
without it use the reference torch ops.
"""

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32 = ir.HalfType(), ir.FloatType()


def _host_features() -> set[str]:
    return {f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+")}


HAVE_AVX2 = "avx2" in _host_features()


def vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def const(t: ir.Type, v) -> ir.Constant:
    return ir.Constant(t, v)


def splat(t: ir.Type, n: int, v) -> ir.Constant:
    return ir.Constant(vec(t, n), [v] * n)


def load(b: ir.IRBuilder, base: ir.Value, offset, t: ir.Type, n: int = 0) -> ir.Value:
    """n values of type t (a scalar when n == 0) at byte offset `offset` of the i8* base."""
    p = b.gep(base, [offset if isinstance(offset, ir.Value) else const(I64, offset)])
    return b.load(b.bitcast(p, (vec(t, n) if n else t).as_pointer()), align=1)


def shuffle(b: ir.IRBuilder, v: ir.Value, lanes: list[int], other: ir.Value | None = None) -> ir.Value:
    """Pick lanes of v (and of `other`, numbered after v's) into a new vector."""
    other = other if other is not None else ir.Constant(v.type, None)
    return b.shuffle_vector(v, other, ir.Constant(vec(I32, len(lanes)), lanes))


def broadcast(b: ir.IRBuilder, v: ir.Value, lane: int, n: int) -> ir.Value:
    """Lane `lane` of vector v repeated n times."""
    return shuffle(b, v, [lane] * n)


def from_scalars(b: ir.IRBuilder, values: list[ir.Value]) -> ir.Value:
    out = ir.Constant(vec(values[0].type, len(values)), None)
    for i, v in enumerate(values):
        out = b.insert_element(out, v, const(I32, i))
    return out


def hsum(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Sum of all lanes (integer or float) by halving."""
    n = v.type.count
    add = b.fadd if isinstance(v.type.element, ir.FloatType) else b.add
    while n > 1:
        n //= 2
        v = add(shuffle(b, v, list(range(n))), shuffle(b, v, list(range(n, 2 * n))))
    return b.extract_element(v, const(I32, 0))


def _x86(b: ir.IRBuilder, name: str, ret: ir.Type, *args: ir.Value) -> ir.Value:
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return b.call(fn, list(args))


def dot_u8_s8(b: ir.IRBuilder, u: ir.Value, s: ir.Value) -> ir.Value:
    """32 unsigned x 32 signed bytes -> 16 x i16 sums of adjacent products (vpmaddubsw).

    The sums saturate at 2^15, so u must stay below 128: weights of at most 6 bits here
    (63 * 127 * 2 fits); signed 8-bit weights go through `dot_s8_s8`.
    """
    return _x86(b, "llvm.x86.avx2.pmadd.ub.sw", vec(I16, 16), u, s)


def madd_i16(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """16 x i16 times 16 x i16 -> 8 x i32 sums of adjacent products (vpmaddwd)."""
    return _x86(b, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), x, y)


def dot_s8_s8(b: ir.IRBuilder, w: ir.Value, s: ir.Value) -> ir.Value:
    """32 signed x 32 signed bytes -> 16 x i16 pair sums: |w| times s with w's sign (vpsignb)."""
    absw = _x86(b, "llvm.x86.avx2.psign.b", vec(I8, 32), w, w)
    return dot_u8_s8(b, absw, _x86(b, "llvm.x86.avx2.psign.b", vec(I8, 32), s, w))


def hadd_i16(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """16 x i16 pair sums of x and y, per 128-bit half: 4 of x's pairs, then 4 of y's (vphaddw)."""
    return _x86(b, "llvm.x86.avx2.phadd.w", vec(I16, 16), x, y)


def hadd_i32(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """8 x i32 pair sums of x and y, per 128-bit half: x0+x1, x2+x3, y0+y1, y2+y3, then the same
    of lanes 4-7 (vphaddd)."""
    return _x86(b, "llvm.x86.avx2.phadd.d", vec(I32, 8), x, y)


def sign_s8(b: ir.IRBuilder, x: ir.Value, signs: ir.Value) -> ir.Value:
    """32 bytes of x, each negated where the byte of `signs` is negative (vpsignb; signs +-1)."""
    return _x86(b, "llvm.x86.avx2.psign.b", vec(I8, 32), x, signs)


def lookup16(b: ir.IRBuilder, table: ir.Value, idx: ir.Value) -> ir.Value:
    """table[idx] per byte for a 16-entry byte table (vpshufb; idx in 0..15)."""
    both = shuffle(b, table, list(range(16)) * 2)
    return _x86(b, "llvm.x86.avx2.pshuf.b", vec(I8, 32), both, idx)


def to_float(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return b.sitofp(v, vec(F32, v.type.count))


def fma(b: ir.IRBuilder, x: ir.Value, y: ir.Value, acc: ir.Value) -> ir.Value:
    """acc + x * y; LLVM fuses it under the contract flag."""
    return b.fadd(acc, b.fmul(x, y, flags=("contract",)), flags=("contract",))
