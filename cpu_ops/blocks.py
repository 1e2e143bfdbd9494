"""One GGUF block times its slice of activations, as LLVM IR, for each supported type.

The kernels read GGUF blocks as they lie in the file (no repack, no float copy). Activations
come quantized (see `activations.py`): int8 values `xq`, a float scale `dx` per 32 (the same
for all 8 groups of a 256-value block when the weight type has 256-value blocks, so those
bodies accumulate in int32 and convert once per block) and integer sums `xs` per 16, so a
block's integer dot products need only its own scales:

    dot(w, x) = sum over groups g of  scale_w(g) * dx(g) * (q_w(g) . q_x(g))  [ - offsets ]

where K-quant mins and the zero points of Q4_0/Q5_0/Q6_K are folded in with `xs`, never by
widening weights. Float types (F32/F16/BF16) multiply the float activations `xf` directly.

Each body takes the activations of one or more tokens (decoding the weight block once for all
of them: prefill's reuse) and returns, per token, a vector of 8 floats whose lanes sum to the
block's contribution; the row loop in `kernels.py` accumulates those vectors and sums the lanes
once per row.
"""

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from llvmlite import ir

from cpu_ops.activations import FORMATS
from cpu_ops.capabilities import ENGINE_TYPES, values_per_block
from cpu_ops.simd import (
    F16,
    F32,
    I8,
    I16,
    I32,
    I64,
    broadcast,
    const,
    dot_s8_s8,
    dot_u8_s8,
    fma,
    from_scalars,
    hadd_i16,
    hadd_i32,
    load,
    lookup16,
    madd_i16,
    shuffle,
    sign_s8,
    splat,
    to_float,
    vec,
)
from modelfile.quants.iquants import BIT_SIGN_ROWS, GRID_BYTES, SIGN_ROWS
from modelfile.quants.legacy import IQ4_LEVELS
from modelfile.quants.types import QUANT_TYPES, resolve


@dataclass(frozen=True)
class Act:
    """Pointers (i8*) to a block's activations: int8 values, scales per 32, int sums per 16, floats."""

    xq: ir.Value
    dx: ir.Value
    xs: ir.Value
    xf: ir.Value


def _f16(b, base, offset):
    return b.fpext(load(b, base, offset, F16), F32)


def _to_f16(b, v):
    """A float32 rounded to float16 (ties to even, as llama.cpp's stores), as a float32."""
    return b.fpext(b.fptrunc(v, F16), F32)


def _splat_f(b, v, n=8):
    return broadcast(b, from_scalars(b, [v]), 0, n)


def _pairs(b, v16):
    """16 x i32 -> 8 x i32 sums of adjacent lanes (per-16 sums into per-32 sums)."""
    return b.add(shuffle(b, v16, list(range(0, 16, 2))), shuffle(b, v16, list(range(1, 16, 2))))


def _ones16(b):
    return splat(I16, 16, 1)


# -- K-quants (256 values) ---------------------------------------------------------------------


def _k_scales(b, w, at):
    """The 12 packed bytes of Q4_K/Q5_K -> 16 x i16: 8 sub-block scales, then 8 mins (6 bits)."""
    u = [load(b, w, at + 4 * i, I32) for i in range(3)]
    m1, m2, m3 = const(I32, 0x3F3F3F3F), const(I32, 0x0F0F0F0F), const(I32, 0x03030303)
    sc_lo = b.and_(u[0], m1)
    sc_hi = b.or_(b.and_(u[2], m2), b.shl(b.and_(b.lshr(u[0], const(I32, 6)), m3), const(I32, 4)))
    mn_lo = b.and_(u[1], m1)
    mn_hi = b.or_(
        b.and_(b.lshr(u[2], const(I32, 4)), m2), b.shl(b.and_(b.lshr(u[1], const(I32, 6)), m3), const(I32, 4))
    )
    return b.zext(b.bitcast(from_scalars(b, [sc_lo, sc_hi, mn_lo, mn_hi]), vec(I8, 16)), vec(I16, 16))


def _block_scale(b, a):
    """The activations' scale for a whole 256-value block (they are quantized per 256 here)."""
    return _splat_f(b, load(b, a.dx, 0, F32))


def _sum(b, vectors):
    total = vectors[0]
    for v in vectors[1:]:
        total = b.add(total, v)
    return total


def _scaled_dots(b, acts, quants, lane_scales, sign_rows=None):
    """Per token: the 8 x i32 sum over 32-value groups g of lane_scales[g] * (quants[g] . x_g),
    unsigned quants through vpmaddubsw (sign_rows: +-1 bytes put on x_g first). Group by group,
    every token's sum at once: a decoded group and its scales are live for one group only,
    which keeps a many-token body within the 16 vector registers of AVX2 (token by token, all
    8 groups stay live and spill: 53 stack accesses per Q4_K block of 4 tokens, now 16)."""
    sums = [None] * len(acts)
    for g, q in enumerate(quants):
        for t, a in enumerate(acts):
            x = load(b, a.xq, 32 * g, I8, 32)
            p = madd_i16(b, dot_u8_s8(b, q, x if sign_rows is None else sign_s8(b, x, sign_rows[g])), lane_scales[g])
            sums[t] = p if sums[t] is None else b.add(sums[t], p)
    return sums


def _k_body(b, w, acts, quants, scales_at):
    """Shared tail of Q4_K and Q5_K: dx * (d * sum_g sc_g q_g.x_g - dmin * sum_g m_g sum(x_g))."""
    sm = _k_scales(b, w, scales_at)
    scales = [broadcast(b, sm, g, 16) for g in range(8)]
    mins = b.zext(shuffle(b, sm, list(range(8, 16))), vec(I32, 8))
    d, dmin = _splat_f(b, _f16(b, w, 0)), _splat_f(b, _f16(b, w, 2))
    out = []
    for a, dots in zip(acts, _scaled_dots(b, acts, quants, scales), strict=True):
        msum = b.mul(mins, _pairs(b, load(b, a.xs, 0, I32, 16)))
        v = b.fsub(b.fmul(to_float(b, dots), d), b.fmul(to_float(b, msum), dmin))
        out.append(b.fmul(v, _block_scale(b, a)))
    return out


def q4_k(b, w, acts):
    quants = []
    for j in range(4):
        qs = load(b, w, 16 + 32 * j, I8, 32)
        quants += [b.and_(qs, splat(I8, 32, 15)), b.lshr(qs, splat(I8, 32, 4))]
    return _k_body(b, w, acts, quants, 4)


ROWS = 8  # rows a multi-row body decodes together: two sets of four (a qword of each fills a register)


def _qword_columns(b, chunks):
    """4 rows' 32-byte chunks -> 4 vectors, vector k holding qword k of rows 0-3 in order (a 4 x 4
    transpose of qwords: 4 in-lane unpacks and 4 half swaps)."""
    q = [b.bitcast(c, vec(I64, 4)) for c in chunks]
    even01, odd01 = shuffle(b, q[0], [0, 4, 2, 6], q[1]), shuffle(b, q[0], [1, 5, 3, 7], q[1])
    even23, odd23 = shuffle(b, q[2], [0, 4, 2, 6], q[3]), shuffle(b, q[2], [1, 5, 3, 7], q[3])
    cols = (
        shuffle(b, even01, [0, 1, 4, 5], even23),
        shuffle(b, odd01, [0, 1, 4, 5], odd23),
        shuffle(b, even01, [2, 3, 6, 7], even23),
        shuffle(b, odd01, [2, 3, 6, 7], odd23),
    )
    return [b.bitcast(c, vec(I8, 32)) for c in cols]


def _qword_of(b, base, offset):
    """The 8 bytes at base + offset in all four qwords of a vector (vpbroadcastq)."""
    return b.bitcast(broadcast(b, from_scalars(b, [load(b, base, offset, I64)]), 0, 4), vec(I8, 32))


def _row_pairs(b, values):
    """Four scalars (one per row) -> 8 lanes, row r in lanes 2r and 2r + 1."""
    return from_scalars(b, [v for v in values for _ in range(2)])


def _q4_k_set(b, ws):
    """Per-block constants of four rows: per group the scales (16 x i16, lanes 4r..4r+3 = row r's),
    the mins as rows 0 and 2, then rows 1 and 3 (for the tail's vpmaddwd pair and vphaddd), and
    d, dmin in lanes 2r, 2r + 1."""
    sms = [_k_scales(b, w, 4) for w in ws]  # 16 x i16 each: 8 scales, then 8 mins
    scales = []
    for g in range(8):
        s01 = shuffle(b, sms[0], [g] * 4 + [16 + g] * 4, sms[1])
        s23 = shuffle(b, sms[2], [g] * 4 + [16 + g] * 4, sms[3])
        scales.append(shuffle(b, s01, list(range(16)), s23))
    mins_lo = list(range(8, 16)) + list(range(24, 32))
    mins = shuffle(b, sms[0], mins_lo, sms[2]), shuffle(b, sms[1], mins_lo, sms[3])
    d = _row_pairs(b, [_f16(b, w, 0) for w in ws])
    dmin = _row_pairs(b, [_f16(b, w, 2) for w in ws])
    return scales, mins, d, dmin


def q4_k_rows(b, ws, tokens):
    """ROWS rows' Q4_K blocks (pointers ws) times every token of `tokens` (a `kernels.TokenLoop`):
    per token and set of four rows, 8 float lanes (row r's share in lanes 2r and 2r + 1) added
    into tokens.acc.

    With one row per register every 32-value group and token costs a vpmaddubsw and a vpmaddwd
    (the scale and the widening to 32 bits), and the multiply ports are the bound. Here a
    register holds 8 values of each of four rows (`_qword_columns`), a group's four registers
    meet the token's 8-byte pieces broadcast, and their 16-bit sums add exactly (15 * 127 * 2 * 4
    < 2^15) before one vpmaddwd with the four rows' scales: 5 multiplies per 4 rows, group and
    token instead of 8. Each broadcast piece serves both sets of rows (one set alone is bound by
    the loads). A group's 8 quant registers and 2 scales stay in registers while a run-time
    loop passes every token over them; the tokens' 32-bit sums wait in memory (unrolled over
    tokens, the quants spilled instead: 650 stack accesses per block of 8 tokens). The mins meet
    the activations' per-32 sums in 16 bits as well, a tail per token shared by four rows."""
    sets = [ws[i : i + 4] for i in range(0, len(ws), 4)]
    consts = [_q4_k_set(b, rows) for rows in sets]
    for g in range(8):
        c, high = divmod(g, 2)
        quants = []
        for rows in sets:
            cols = _qword_columns(b, [load(b, w, 16 + 32 * c, I8, 32) for w in rows])
            quants.append([b.lshr(q, splat(I8, 32, 4)) if high else b.and_(q, splat(I8, 32, 15)) for q in cols])

        def group(t, a, g=g, quants=quants):
            xs = [_qword_of(b, a.xq, 32 * g + 8 * k) for k in range(4)]
            for i, (scales, *_) in enumerate(consts):
                pieces = [dot_u8_s8(b, q, x) for q, x in zip(quants[i], xs, strict=True)]
                p = madd_i16(b, _sum(b, pieces), scales[g])
                slot = tokens.dot(t, i)
                b.store(p if g == 0 else b.add(b.load(slot), p), slot)

        tokens.each(group)

    def tail(t, a):
        sums = b.trunc(_pairs(b, load(b, a.xs, 0, I32, 16)), vec(I16, 8))  # per 32: |sum| <= 32 * 127
        both = shuffle(b, sums, list(range(8)) * 2)
        for i, (_, (mins02, mins13), d, dmin) in enumerate(consts):
            msum = hadd_i32(b, madd_i16(b, mins02, both), madd_i16(b, mins13, both))  # lanes 2r, 2r+1: row r
            v = b.fsub(b.fmul(to_float(b, b.load(tokens.dot(t, i))), d), b.fmul(to_float(b, msum), dmin))
            slot = tokens.acc(t, i)
            b.store(b.fadd(b.load(slot), b.fmul(v, _block_scale(b, a))), slot)

    tokens.each(tail)


q4_k.rows = q4_k_rows


def q5_k(b, w, acts):
    qh = load(b, w, 16, I8, 32)
    quants = []
    for j in range(4):
        qs = load(b, w, 48 + 32 * j, I8, 32)
        for k, nib in enumerate((b.and_(qs, splat(I8, 32, 15)), b.lshr(qs, splat(I8, 32, 4)))):
            high = b.shl(b.and_(b.lshr(qh, splat(I8, 32, 2 * j + k)), splat(I8, 32, 1)), splat(I8, 32, 4))
            quants.append(b.or_(nib, high))
    return _k_body(b, w, acts, quants, 4)


def q6_k(b, w, acts):
    """d * sc16 * (q - 32): unsigned q through vpmaddubsw, the 32 offset through the x sums."""
    quants, scales = [], []
    for n in range(2):
        ql0, ql1 = load(b, w, 64 * n, I8, 32), load(b, w, 64 * n + 32, I8, 32)
        qh = load(b, w, 128 + 32 * n, I8, 32)
        scales.append(b.sext(load(b, w, 192 + 8 * n, I8, 8), vec(I16, 8)))
        for k, (ql, shift) in enumerate(((ql0, 0), (ql1, 0), (ql0, 4), (ql1, 4))):
            nib = (
                b.and_(b.lshr(ql, splat(I8, 32, shift)), splat(I8, 32, 15)) if shift else b.and_(ql, splat(I8, 32, 15))
            )
            high = b.shl(b.and_(b.lshr(qh, splat(I8, 32, 2 * k)), splat(I8, 32, 3)), splat(I8, 32, 4))
            quants.append(b.or_(nib, high))
    sc16 = shuffle(b, scales[0], list(range(16)), scales[1])
    return _offset_body(b, acts, quants, sc16, 5, _splat_f(b, _f16(b, w, 208)))


def _offset_body(b, acts, quants, sc16, offset_bits, d):
    """Shared tail of Q3_K and Q6_K: dx * d * sum over 16-value groups of sc * (q - 2^offset_bits) . x,
    with 8 groups of 32 unsigned q (vpmaddubsw), signed i16 scales sc16 per 16 values, and the
    offset taken through the activations' sums per 16."""
    lane_scales = [_per16_scale_lanes(b, sc16, g) for g in range(len(quants))]
    scales32 = b.sext(sc16, vec(I32, 16))
    out = []
    for a, dots in zip(acts, _scaled_dots(b, acts, quants, lane_scales), strict=True):
        offsets = _pairs(b, b.mul(scales32, load(b, a.xs, 0, I32, 16)))  # per 32: sum of sc * sum(x) per 16
        isum = b.sub(dots, b.shl(offsets, splat(I32, 8, offset_bits)))
        out.append(b.fmul(to_float(b, isum), b.fmul(d, _block_scale(b, a))))
    return out


def _per16_scale_lanes(b, sc16, g):
    """The 16 x i16 lane scales of 32-value group g when each 16 values has its own scale:
    vpmaddubsw leaves 16 pair sums, the first 8 from values 0-15, the last 8 from 16-31."""
    return shuffle(b, sc16, [2 * g] * 8 + [2 * g + 1] * 8)


def q2_k(b, w, acts):
    """d * sc16 * q - dmin * m16 (4-bit scale and min per 16 values, 2-bit q): the 2-bit values
    through vpmaddubsw, the mins through the x sums per 16.

    Layout (84 bytes): scales [16] (scale low nibble, min high), qs [64], d, dmin. Group g of 32
    values (g = 4n + j) is bits 2j..2j+1 of qs[32n .. 32n + 32], scales 2g and 2g + 1."""
    sc_bytes = load(b, w, 0, I8, 16)
    sc16 = b.zext(b.and_(sc_bytes, splat(I8, 16, 15)), vec(I16, 16))
    mins16 = b.zext(b.lshr(sc_bytes, splat(I8, 16, 4)), vec(I32, 16))
    quants, lane_scales = [], []
    for n in range(2):
        qs = load(b, w, 16 + 32 * n, I8, 32)
        for j in range(4):
            shifted = b.lshr(qs, splat(I8, 32, 2 * j)) if j else qs
            quants.append(b.and_(shifted, splat(I8, 32, 3)))
            lane_scales.append(_per16_scale_lanes(b, sc16, 4 * n + j))
    d, dmin = _splat_f(b, _f16(b, w, 80)), _splat_f(b, _f16(b, w, 82))
    out = []
    for a, dots in zip(acts, _scaled_dots(b, acts, quants, lane_scales), strict=True):
        msum = _pairs(b, b.mul(mins16, load(b, a.xs, 0, I32, 16)))
        v = b.fsub(b.fmul(to_float(b, dots), d), b.fmul(to_float(b, msum), dmin))
        out.append(b.fmul(v, _block_scale(b, a)))
    return out


def _q3_k_scales(b, w, at):
    """The 12 packed bytes of Q3_K -> 16 x i16 signed scales (6 bits, minus 32): low nibbles
    from bytes 0-7, the two high bits of each from bytes 8-11."""
    u = [load(b, w, at + 4 * i, I32) for i in range(3)]
    low4, high2 = const(I32, 0x0F0F0F0F), const(I32, 0x03030303)

    def join(low, shift_low, shift_high):
        lo = b.and_(b.lshr(low, const(I32, shift_low)) if shift_low else low, low4)
        hi = b.and_(b.lshr(u[2], const(I32, shift_high)) if shift_high else u[2], high2)
        return b.or_(lo, b.shl(hi, const(I32, 4)))

    words = [join(u[0], 0, 0), join(u[1], 0, 2), join(u[0], 4, 4), join(u[1], 4, 6)]
    unsigned = b.zext(b.bitcast(from_scalars(b, words), vec(I8, 16)), vec(I16, 16))
    return b.sub(unsigned, splat(I16, 16, 32))


def q3_k(b, w, acts):
    """d * sc16 * (q - 4) with q = 2 low bits + 4 * high bit (0..7): unsigned q through
    vpmaddubsw with signed scales per 16, the 4 offset through the x sums per 16.

    Layout (110 bytes): hmask [32], qs [64], scales [12], d. Group g of 32 values (g = 4n + j)
    takes bits 2j..2j+1 of qs[32n .. 32n + 32] and bit g of hmask[0 .. 32]."""
    hmask = load(b, w, 0, I8, 32)
    quants = []
    for n in range(2):
        qs = load(b, w, 32 + 32 * n, I8, 32)
        for j in range(4):
            g = 4 * n + j
            low = b.and_(b.lshr(qs, splat(I8, 32, 2 * j)) if j else qs, splat(I8, 32, 3))
            high = b.and_(b.lshr(hmask, splat(I8, 32, g)) if g else hmask, splat(I8, 32, 1))
            quants.append(b.or_(low, b.shl(high, splat(I8, 32, 2))))
    return _offset_body(b, acts, quants, _q3_k_scales(b, w, 96), 2, _splat_f(b, _f16(b, w, 108)))


def iq4_xs(b, w, acts):
    """d * (ls - 32) * table[q]: the non-linear 4-bit grid looked up with vpshufb."""
    table = ir.Constant(vec(I8, 16), list(IQ4_LEVELS))
    high = b.zext(load(b, w, 2, I16), I32)
    low = load(b, w, 4, I8, 4)
    values, scales = [], []
    for k in range(4):
        qs = load(b, w, 8 + 32 * k, I8, 32)
        lo, hi = b.and_(qs, splat(I8, 32, 15)), b.lshr(qs, splat(I8, 32, 4))
        for half in range(2):
            g = 2 * k + half
            idx = shuffle(
                b, lo, list(range(16 * half, 16 * half + 16)) + list(range(32 + 16 * half, 48 + 16 * half)), hi
            )
            ls_lo = b.and_(
                b.lshr(b.zext(b.extract_element(low, const(I32, g // 2)), I32), const(I32, 4 * (g % 2))), const(I32, 15)
            )
            ls_hi = b.shl(b.and_(b.lshr(high, const(I32, 2 * g)), const(I32, 3)), const(I32, 4))
            scale = b.trunc(b.sub(b.or_(ls_lo, ls_hi), const(I32, 32)), I16)
            values.append(lookup16(b, table, idx))
            scales.append(broadcast(b, from_scalars(b, [scale]), 0, 16))
    d = _splat_f(b, _f16(b, w, 0))
    out = []
    for a in acts:
        dots = [madd_i16(b, dot_s8_s8(b, v, load(b, a.xq, 32 * g, I8, 32)), scales[g]) for g, v in enumerate(values)]
        out.append(b.fmul(to_float(b, _sum(b, dots)), b.fmul(d, _block_scale(b, a))))
    return out


# -- grid types (256 values, patterns looked up in a table) -------------------------------------


def _table(b, name: str, data: bytes) -> ir.Value:
    """An i8* to a constant byte table in the kernel's module (made once per module)."""
    try:
        table = b.module.get_global(name)
    except KeyError:
        kind = ir.ArrayType(I8, len(data))
        table = ir.GlobalVariable(b.module, kind, name)
        table.global_constant, table.linkage = True, "internal"
        table.initializer = ir.Constant(kind, bytearray(data))
    return b.bitcast(table, I8.as_pointer())


def _join8(b, parts):
    """Four 8-byte vectors -> one of 32."""
    lo = shuffle(b, parts[0], list(range(16)), parts[1])
    hi = shuffle(b, parts[2], list(range(16)), parts[3])
    return shuffle(b, lo, list(range(32)), hi)


def _rows8(b, table, indices):
    """Four 8-byte rows of a table (i8*), at the given i64 row numbers, as 32 bytes."""
    return _join8(b, [load(b, table, b.mul(i, const(I64, 8)), I8, 8) for i in indices])


def _rows4x8(b, table, indices):
    """Eight 4-byte rows of a table (i8*), at the given i64 row numbers, as 32 bytes."""
    words = [load(b, table, b.mul(i, const(I64, 4)), I32) for i in indices]
    return b.bitcast(from_scalars(b, words), vec(I8, 32))


def _scale_pair(b, lo, hi):
    """Two i32 scales -> 16 x i16: the first for pair sums 0-7 (values 0-15), the second for 8-15."""
    return shuffle(b, from_scalars(b, [b.trunc(lo, I16), b.trunc(hi, I16)]), [h // 8 for h in range(16)])


def _each(b, v, n):
    """The n bytes of vector v, each as an i64."""
    return [b.zext(b.extract_element(v, const(I32, k)), I64) for k in range(n)]


def _sign_indices(b, aux):
    """The four 7-bit sign indices in the low 28 bits of a u32, each as an i64."""
    return [b.zext(b.and_(b.lshr(aux, const(I32, 7 * k)), const(I32, 127)), I64) for k in range(4)]


def _odd(b, nibble):
    """2 * nibble + 1 (i32)."""
    return b.add(b.shl(nibble, const(I32, 1)), const(I32, 1))


def _grid_dots(b, acts, patterns, sign_rows, scales, d):
    """d * sum over groups of scales . (patterns . (x with the signs)): patterns unsigned bytes."""
    dots = _scaled_dots(b, acts, patterns, scales, sign_rows)
    return [b.fmul(to_float(b, s), b.fmul(d, _block_scale(b, a))) for a, s in zip(acts, dots, strict=True)]


def iq2_xxs(b, w, acts):
    """d/8 * sum over 32-value groups of (2s + 1) * (grid patterns . signed x): per group a u32
    of four pattern indices and a u32 of four 7-bit sign indices and the 4-bit s. The signs go
    onto the activations (vpsignb with a +-1 row per sign index), so the unsigned patterns
    (values 8-43) multiply them with vpmaddubsw directly."""
    grid = _table(b, "iq2xxs_grid", GRID_BYTES["IQ2_XXS"])
    signs = _table(b, "iq2_sign_rows", SIGN_ROWS)
    patterns, sign_rows, scales = [], [], []
    for g in range(8):
        patterns.append(_rows8(b, grid, _each(b, load(b, w, 2 + 8 * g, I8, 4), 4)))
        aux = load(b, w, 6 + 8 * g, I32)
        sign_rows.append(_rows8(b, signs, _sign_indices(b, aux)))
        ls = _odd(b, b.lshr(aux, const(I32, 28)))
        scales.append(_scale_pair(b, ls, ls))
    return _grid_dots(b, acts, patterns, sign_rows, scales, _splat_f(b, b.fmul(_f16(b, w, 0), const(F32, 0.125))))


def iq2_xs(b, w, acts):
    """IQ2_XXS with a u16 per 8 values (9-bit pattern index of 512, 7-bit sign index) and a
    4-bit scale per 16 values."""
    grid = _table(b, "iq2xs_grid", GRID_BYTES["IQ2_XS"])
    signs = _table(b, "iq2_sign_rows", SIGN_ROWS)
    patterns, sign_rows, scales = [], [], []
    for g in range(8):
        words = [b.zext(load(b, w, 2 + 8 * g + 2 * k, I16), I64) for k in range(4)]
        patterns.append(_rows8(b, grid, [b.and_(v, const(I64, 511)) for v in words]))
        sign_rows.append(_rows8(b, signs, [b.lshr(v, const(I64, 9)) for v in words]))
        byte = b.zext(load(b, w, 66 + g, I8), I32)
        scales.append(_scale_pair(b, _odd(b, b.and_(byte, const(I32, 15))), _odd(b, b.lshr(byte, const(I32, 4)))))
    return _grid_dots(b, acts, patterns, sign_rows, scales, _splat_f(b, b.fmul(_f16(b, w, 0), const(F32, 0.125))))


def iq2_s(b, w, acts):
    """1024 patterns (a byte of index and 2 bits from qh per 8 values), a sign byte per 8
    values (bit j for value j), a 4-bit scale per 16 values."""
    grid = _table(b, "iq2s_grid", GRID_BYTES["IQ2_S"])
    signs = _table(b, "bit_sign_rows", BIT_SIGN_ROWS)
    patterns, sign_rows, scales = [], [], []
    for g in range(8):
        low = load(b, w, 2 + 4 * g, I8, 4)
        qh = b.zext(load(b, w, 66 + g, I8), I64)
        tops = [b.shl(b.and_(b.lshr(qh, const(I64, 2 * k)), const(I64, 3)), const(I64, 8)) for k in range(4)]
        rows = [b.or_(v, top) for v, top in zip(_each(b, low, 4), tops, strict=True)]
        patterns.append(_rows8(b, grid, rows))
        sign_bytes = load(b, w, 34 + 4 * g, I8, 4)
        sign_rows.append(_rows8(b, signs, _each(b, sign_bytes, 4)))
        byte = b.zext(load(b, w, 74 + g, I8), I32)
        scales.append(_scale_pair(b, _odd(b, b.and_(byte, const(I32, 15))), _odd(b, b.lshr(byte, const(I32, 4)))))
    return _grid_dots(b, acts, patterns, sign_rows, scales, _splat_f(b, b.fmul(_f16(b, w, 0), const(F32, 0.125))))


def iq3_xxs(b, w, acts):
    """4-value patterns of 256 (a byte each), per 32 values a u32 of four 7-bit sign indices
    and a 4-bit scale: d/4 * (2s + 1) * pattern * sign."""
    grid = _table(b, "iq3xxs_grid", GRID_BYTES["IQ3_XXS"])
    signs = _table(b, "iq2_sign_rows", SIGN_ROWS)
    patterns, sign_rows, scales = [], [], []
    for g in range(8):
        index = load(b, w, 2 + 8 * g, I8, 8)
        patterns.append(_rows4x8(b, grid, _each(b, index, 8)))
        aux = load(b, w, 66 + 4 * g, I32)
        sign_rows.append(_rows8(b, signs, _sign_indices(b, aux)))
        ls = _odd(b, b.lshr(aux, const(I32, 28)))
        scales.append(_scale_pair(b, ls, ls))
    return _grid_dots(b, acts, patterns, sign_rows, scales, _splat_f(b, b.fmul(_f16(b, w, 0), const(F32, 0.25))))


def iq3_s(b, w, acts):
    """4-value patterns of 512 (a byte of index, a bit of qh), a sign bit per value, a 4-bit
    scale per 32 values: d * (2s + 1) * pattern * sign."""
    grid = _table(b, "iq3s_grid", GRID_BYTES["IQ3_S"])
    signs = _table(b, "bit_sign_rows", BIT_SIGN_ROWS)
    patterns, sign_rows, scales = [], [], []
    for g in range(8):
        low = load(b, w, 2 + 8 * g, I8, 8)
        qh = b.zext(load(b, w, 66 + g, I8), I64)
        tops = [b.shl(b.and_(b.lshr(qh, const(I64, k)), const(I64, 1)), const(I64, 8)) for k in range(8)]
        rows = [b.or_(v, top) for v, top in zip(_each(b, low, 8), tops, strict=True)]
        patterns.append(_rows4x8(b, grid, rows))
        sign_bytes = load(b, w, 74 + 4 * g, I8, 4)
        sign_rows.append(_rows8(b, signs, _each(b, sign_bytes, 4)))
        byte = b.zext(load(b, w, 106 + g // 2, I8), I32)
        ls = _odd(b, b.and_(b.lshr(byte, const(I32, 4 * (g % 2))), const(I32, 15)))
        scales.append(_scale_pair(b, ls, ls))
    return _grid_dots(b, acts, patterns, sign_rows, scales, _splat_f(b, _f16(b, w, 0)))


def iq1_s(b, w, acts):
    """d * sum over 32-value groups of (2s + 1) * (patterns . x +- sum(x) / 8): per group four
    8-value patterns of -1/0/1 (indices: a byte each, plus 3 bits of the group's u16), and in
    that u16 the 3-bit s and the sign of the 1/8 shift. Integer sums throughout; the shift
    enters as 1/8 of the activations' integer sums, once per block."""
    grid = _table(b, "iq1s_grid", GRID_BYTES["IQ1_S"])
    patterns, scales, shifts = [], [], []
    for g in range(8):
        low = load(b, w, 2 + 4 * g, I8, 4)
        high = b.zext(load(b, w, 34 + 2 * g, I16), I32)
        rows = [
            b.zext(b.or_(b.zext(b.extract_element(low, const(I32, k)), I32),
                         b.shl(b.and_(b.lshr(high, const(I32, 3 * k)), const(I32, 7)), const(I32, 8))), I64)
            for k in range(4)
        ]  # fmt: skip
        patterns.append(_rows8(b, grid, rows))
        ls = b.add(b.shl(b.and_(b.lshr(high, const(I32, 12)), const(I32, 7)), const(I32, 1)), const(I32, 1))
        scales.append(broadcast(b, from_scalars(b, [b.trunc(ls, I16)]), 0, 16))
        negative = b.icmp_unsigned("!=", b.and_(high, const(I32, 0x8000)), const(I32, 0))
        shifts.append(b.select(negative, b.sub(const(I32, 0), ls), ls))
    d = _splat_f(b, _f16(b, w, 0))
    shift_scale = from_scalars(b, shifts)  # 8 x i32: +-(2s + 1) per group
    out = []
    for a in acts:
        dots = [madd_i16(b, dot_s8_s8(b, patterns[g], load(b, a.xq, 32 * g, I8, 32)), scales[g]) for g in range(8)]
        sums = _pairs(b, load(b, a.xs, 0, I32, 16))  # 8 x i32: the activations' sum per 32
        shifted = to_float(b, b.mul(shift_scale, sums))
        total = b.fadd(to_float(b, _sum(b, dots)), b.fmul(shifted, splat(F32, 8, 0.125)))
        out.append(b.fmul(total, b.fmul(d, _block_scale(b, a))))
    return out


def iq1_m(b, w, acts):
    """IQ1_S's patterns with a 3-bit scale per 16 values and a shift sign per 8-value pattern;
    d is assembled from the top nibbles of the four scale words. The shift, +-1/8 per pattern,
    is a +-1 byte vector multiplied into the activations like a pattern."""
    grid = _table(b, "iq1s_grid", GRID_BYTES["IQ1_S"])
    words = [b.zext(load(b, w, 48 + 2 * i, I16), I32) for i in range(4)]
    nibbles = [b.and_(b.lshr(words[i], const(I32, 12 - 4 * i)), const(I32, 0xF << (4 * i))) for i in range(4)]
    bits = b.or_(b.or_(nibbles[0], nibbles[1]), b.or_(nibbles[2], nibbles[3]))  # word i's top nibble -> bits 4i..4i+3
    d = _splat_f(b, b.fpext(b.bitcast(b.trunc(bits, I16), F16), F32))
    patterns, shifts, scales = [], [], []
    for g in range(8):
        low = load(b, w, 4 * g, I8, 4)
        high = b.zext(load(b, w, 32 + 2 * g, I16), I32)  # a nibble per pattern: 3 index bits, the shift's sign
        rows, signs = [], []
        for k in range(4):
            nibble = b.and_(b.lshr(high, const(I32, 4 * k)), const(I32, 15))
            top = b.shl(b.and_(nibble, const(I32, 7)), const(I32, 8))
            rows.append(b.zext(b.or_(b.zext(b.extract_element(low, const(I32, k)), I32), top), I64))
            negative = b.icmp_unsigned("!=", b.and_(nibble, const(I32, 8)), const(I32, 0))
            signs.append(b.select(negative, const(I8, -1), const(I8, 1)))
        patterns.append(_rows8(b, grid, rows))
        shifts.append(shuffle(b, from_scalars(b, signs), [j // 8 for j in range(32)]))
        word = words[g // 2]
        ls = [b.add(b.shl(b.and_(b.lshr(word, const(I32, 6 * (g % 2) + 3 * h)), const(I32, 7)), const(I32, 1)),
                    const(I32, 1)) for h in range(2)]  # fmt: skip
        scales.append(shuffle(b, from_scalars(b, [b.trunc(v, I16) for v in ls]), [h // 8 for h in range(16)]))
    out = []
    for a in acts:
        xq = [load(b, a.xq, 32 * g, I8, 32) for g in range(8)]
        dots = [madd_i16(b, dot_s8_s8(b, patterns[g], xq[g]), scales[g]) for g in range(8)]
        shifted = [madd_i16(b, dot_s8_s8(b, shifts[g], xq[g]), scales[g]) for g in range(8)]
        total = b.fadd(to_float(b, _sum(b, dots)), b.fmul(to_float(b, _sum(b, shifted)), splat(F32, 8, 0.125)))
        out.append(b.fmul(total, b.fmul(d, _block_scale(b, a))))
    return out


# -- 32-value blocks ---------------------------------------------------------------------------


def _nibbles32(b, qs16):
    """16 bytes of two nibbles -> 32 values: low nibbles first, then high (Q4_0/Q5_0 order)."""
    lo, hi = b.and_(qs16, splat(I8, 16, 15)), b.lshr(qs16, splat(I8, 16, 4))
    return shuffle(b, lo, list(range(32)), hi)


def _legacy(b, w, acts, q):
    """d * q . x for one 32-value block of signed values q (the zero point already subtracted)."""
    d = _f16(b, w, 0)
    out = []
    for a in acts:
        dot = madd_i16(b, dot_s8_s8(b, q, load(b, a.xq, 0, I8, 32)), _ones16(b))
        out.append(b.fmul(to_float(b, dot), _splat_f(b, b.fmul(load(b, a.dx, 0, F32), d)), flags=("contract",)))
    return out


GROUP = 8  # 32-value blocks a grouped body takes at once


def legacy_group(b, w, acts, kind):
    """GROUP consecutive 32-value blocks of a legacy kind at once: per token, the blocks' integer
    dot products are summed lane-wise into one vector whose lane j is block j's dot, so
    converting and scaling take one instruction per 8 blocks instead of one each, with the 8
    scales d_j * dx_j as one vector. Each block is still d * dx * (integer dot), rounded as in
    `_legacy`; only the order of the float sum differs.

    Signed values (Q8_0, IQ4_NL) go through vpsignb and vpmaddubsw, each block's pair sums
    widened at once (vpmaddwd) and the blocks joined by vphaddd. Unsigned values with a zero
    point (Q4_0, Q5_0: at most 31) multiply x directly and their pair sums are joined in 16 bits
    (vphaddw; 8 products of at most 31 * 127 stay below 2^15) before one widening per 4 blocks,
    the zero point taken off through the activations' sums: 10 integer multiplies per token and
    8 blocks instead of 16. Blocks are taken in pairs and each token's sums folded as they come,
    which keeps 4 tokens within AVX2's registers."""
    nbytes = kind.nbytes
    ds = [load(b, w, nbytes * j, F16) for j in range(GROUP)]
    d8 = b.fpext(from_scalars(b, ds), vec(F32, GROUP))
    # per token: for blocks 4h..4h+3, lanes 0-3 over their values 0-15, lanes 4-7 over 16-31
    halves = [[] for _ in acts]
    for j in range(0, GROUP, 4):
        for p in (j, j + 2):
            pair = [kind.values_of(b, b.gep(w, [const(I64, nbytes * k)])) for k in (p, p + 1)]
            for t, a in enumerate(acts):
                qx = list(zip(pair, (load(b, a.xq, 32 * k, I8, 32) for k in (p, p + 1)), strict=True))
                if kind.zero is None:
                    pairs = hadd_i32(b, *(madd_i16(b, dot_s8_s8(b, q, x), _ones16(b)) for q, x in qx))
                else:
                    pairs = hadd_i16(b, *(dot_u8_s8(b, q, x) for q, x in qx))
                if p == j:
                    halves[t].append(pairs)
                elif kind.zero is None:
                    halves[t].append(hadd_i32(b, halves[t].pop(), pairs))
                else:
                    halves[t].append(madd_i16(b, hadd_i16(b, halves[t].pop(), pairs), _ones16(b)))
    out = []
    for a, (g0, g1) in zip(acts, halves, strict=True):
        sums = b.add(shuffle(b, g0, [0, 1, 2, 3, 8, 9, 10, 11], g1), shuffle(b, g0, [4, 5, 6, 7, 12, 13, 14, 15], g1))
        if kind.zero is not None:  # lane j: block j's sum of x times the zero point
            sums = b.sub(sums, b.mul(_pairs(b, load(b, a.xs, 0, I32, 16)), splat(I32, 8, kind.zero)))
        out.append(b.fmul(to_float(b, sums), b.fmul(d8, load(b, a.dx, 0, F32, GROUP)), flags=("contract",)))
    return out


def _q4_0_values(b, w):
    """Unsigned (0-15; zero point 8)."""
    return _nibbles32(b, load(b, w, 2, I8, 16))


def _q5_0_values(b, w):
    """Unsigned (0-31; zero point 16). The fifth bits: bit j of the 32-bit qh lifts value j by
    16 (byte-wise test, no 32-bit lanes)."""
    qh = shuffle(b, load(b, w, 2, I8, 4), [j // 8 for j in range(32)])
    bit = b.and_(qh, ir.Constant(vec(I8, 32), [1 << (j % 8) for j in range(32)]))
    high = b.select(b.icmp_unsigned("!=", bit, splat(I8, 32, 0)), splat(I8, 32, 16), splat(I8, 32, 0))
    return b.or_(_nibbles32(b, load(b, w, 6, I8, 16)), high)


def _q8_0_values(b, w):
    return load(b, w, 2, I8, 32)


def _iq4_nl_values(b, w):
    """Q4_0's layout with the non-linear 4-bit levels of IQ4_XS, looked up with vpshufb."""
    return lookup16(b, ir.Constant(vec(I8, 16), list(IQ4_LEVELS)), _nibbles32(b, load(b, w, 2, I8, 16)))


def _legacy_type(values_of, zero=None):
    """A 32-value type's body (one block); as attributes, the block's values (signed, or
    unsigned with a zero point) for its grouped body, `legacy_group`."""

    def body(b, w, acts):
        q = values_of(b, w)
        return _legacy(b, w, acts, q if zero is None else b.sub(q, splat(I8, 32, zero)))

    body.values_of, body.zero = values_of, zero
    body.__doc__ = values_of.__doc__
    return body


q4_0 = _legacy_type(_q4_0_values, zero=8)
q5_0 = _legacy_type(_q5_0_values, zero=16)
q8_0 = _legacy_type(_q8_0_values)
iq4_nl = _legacy_type(_iq4_nl_values)


def _with_min(b, w, acts, q):
    """d * q . x + m * s for one 32-value block with a min (Q4_1/Q5_1): q unsigned; the
    activations are Q8_1, whose float16 d and s = d * sum(q) are rounded here from the float32
    d (cpu_ops/activations.py)."""
    d, m = _f16(b, w, 0), _f16(b, w, 2)
    out = []
    for a in acts:
        dx = load(b, a.dx, 0, F32)
        dot = madd_i16(b, dot_u8_s8(b, q, load(b, a.xq, 0, I8, 32)), _ones16(b))
        xs = load(b, a.xs, 0, I32, 2)
        total = b.sitofp(b.add(b.extract_element(xs, const(I32, 0)), b.extract_element(xs, const(I32, 1))), F32)
        offset = b.insert_element(
            ir.Constant(vec(F32, 8), [0.0] * 8), b.fmul(m, _to_f16(b, b.fmul(dx, total))), const(I32, 0)
        )
        out.append(b.fadd(b.fmul(to_float(b, dot), _splat_f(b, b.fmul(_to_f16(b, dx), d))), offset))
    return out


def q4_1(b, w, acts):
    return _with_min(b, w, acts, _nibbles32(b, load(b, w, 4, I8, 16)))


def q5_1(b, w, acts):
    """Q4_1 with Q5_0's fifth bits (bit j of the u32 at byte 4 lifts value j by 16)."""
    qh = shuffle(b, load(b, w, 4, I8, 4), [j // 8 for j in range(32)])
    bit = b.and_(qh, ir.Constant(vec(I8, 32), [1 << (j % 8) for j in range(32)]))
    high = b.select(b.icmp_unsigned("!=", bit, splat(I8, 32, 0)), splat(I8, 32, 16), splat(I8, 32, 0))
    return _with_min(b, w, acts, b.or_(_nibbles32(b, load(b, w, 8, I8, 16)), high))


def _floats(b, acts, convert):
    weights = [convert(i) for i in range(4)]
    out = []
    for a in acts:
        acc = ir.Constant(vec(F32, 8), [0.0] * 8)
        for i, wv in enumerate(weights):
            acc = fma(b, wv, load(b, a.xf, 32 * i, F32, 8), acc)
        out.append(acc)
    return out


def f32(b, w, acts):
    return _floats(b, acts, lambda i: load(b, w, 32 * i, F32, 8))


def f16(b, w, acts):
    return _floats(b, acts, lambda i: b.fpext(load(b, w, 16 * i, F16, 8), vec(F32, 8)))


def bf16(b, w, acts):
    def widen(i):
        bits = b.shl(b.zext(load(b, w, 16 * i, I16, 8), vec(I32, 8)), splat(I32, 8, 16))
        return b.bitcast(bits, vec(F32, 8))

    return _floats(b, acts, widen)


@dataclass(frozen=True)
class BlockKind:
    code: int  # the integer the numba kernels dispatch on
    values: int
    nbytes: int
    body: object
    act_form: int  # the activations' format (cpu_ops.activations.FORMATS' values)
    values_of: object = None  # 32-value legacy types: one block's values, for `legacy_group`
    zero: int | None = None  # their zero point, where values_of gives them unsigned
    rows: object = None  # a body for ROWS rows at once (prefill), where the type has one


def _kind(code: int, qtype: QType, body) -> BlockKind:
    """Geometry from gguf's table; float types (one value per "block") are taken 32 at a time."""
    block, size = GGML_QUANT_SIZES[qtype]
    values = values_per_block(qtype)
    form = FORMATS[QUANT_TYPES[qtype].activation_format]
    extras = getattr(body, "values_of", None), getattr(body, "zero", None), getattr(body, "rows", None)
    return BlockKind(code, values, size * values // block, body, form, *extras)


# each engine type's body, as its declaration names it (modelfile/quants/types.py); the code is
# the integer the kernels dispatch on, in declaration order
BLOCKS: dict[QType, BlockKind] = {
    qt: _kind(code, qt, resolve(QUANT_TYPES[qt].engine)) for code, qt in enumerate(ENGINE_TYPES)
}
