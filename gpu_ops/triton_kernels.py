"""The Triton kernels behind gpu_ops.matmul (imported only where Triton runs).

Each program owns one tile of BLOCK_N weight rows (the formats' TILE, so each chunk of the tile
is one contiguous block of memory) and BLOCK_M activation rows, and walks K in chunks,
rebuilding the weights in registers from the GPU formats of gpu_ops.formats. Rows past the
end of a matrix are the formats' zero padding, so weight loads need no masks. int4: 64-value
chunks (32 bytes of each row: low nibbles are values 0-31, high ones 32-63), weights
d * sc * q - dmin * m. int8: 32-value chunks, weights d * q, d * sc * q (Q6_K, Q3_K, the grid
types) or d * sc * q - dmin * mn (Q2_K, Q5_K).

Two ways to multiply a chunk, chosen per launch (DOT):
- decode (1-8 tokens): broadcast products summed in registers. Decode is memory-bound, so
  what matters is that each weight byte is read once per call whatever the number of tokens,
  and that the loop does little besides: one token keeps its products in a [BLOCK_N, C]
  accumulator and reduces it once at the end (summing each chunk across lanes as it came
  took V3's output head from 0.33 to 1.14 ms on an H200).
- prefill (more tokens): tl.dot on the tile, which puts the tensor cores to work (TF32 on
  float32 tiles: float32's range, a 10-bit mantissa, accumulation in float32).

Gathered mode (GATHER) serves routed experts inside a captured CUDA graph: the weight rows are
a stack of experts [E * N, K], grid axis 1 runs over (token, slot) pairs, and each program
reads its expert's id from device memory, so nothing goes back to the host.
"""

import functools

import torch
import triton
import triton.language as tl

from gpu_ops.formats import TILE, Int4Rows, Int8Rows

BLOCK_N = 64
GEMM_BLOCK_M = 32


@triton.jit
def _tile(ids_ptr, TPG, K, SPLIT_CHUNKS, CHUNK: tl.constexpr, X_DIV: tl.constexpr, GATHER: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """This program's weight tile, its rows within the matrix (or expert), its x and y rows,
    and its share of K: chunks [first, end) of CHUNK values."""
    lane = tl.arange(0, BLOCK_N)
    tile = tl.program_id(0)
    rows = tile * BLOCK_N + lane
    if GATHER:
        tile = tl.load(ids_ptr + tl.program_id(1)) * TPG + tile
    toks = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    first = tl.program_id(2) * SPLIT_CHUNKS
    return tile, lane, rows, toks, toks // X_DIV, first, tl.minimum(first + SPLIT_CHUNKS, K // CHUNK)


@triton.jit
def _store(y_ptr, acc, toks, rows, M, N):
    """This program's sums into its split's slice of y [splits, M, N]."""
    y = y_ptr + tl.program_id(2) * M * N + toks[:, None] * N + rows[None, :]
    tl.store(y, acc, mask=(toks < M)[:, None] & (rows < N)[None, :])


@triton.jit
def _zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr, WIDE: tl.constexpr):
    """The accumulator: [BLOCK_N, C] partial sums for one token (WIDE), else [BLOCK_M, BLOCK_N]."""
    if WIDE:
        acc = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def _accumulate(acc, x, w, DOT: tl.constexpr, WIDE: tl.constexpr):
    """acc += x [BLOCK_M, C] @ w [BLOCK_N, C].T; WIDE (one token) keeps the products apart
    until _sums, so the loop does no cross-lane reduction per chunk."""
    if WIDE:
        acc = acc + w * x
    elif DOT:
        acc = acc + tl.dot(x, tl.trans(w))
    else:
        acc = acc + tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def _sums(acc, WIDE: tl.constexpr):
    """The accumulator as [BLOCK_M, BLOCK_N]."""
    if WIDE:
        sums = tl.sum(acc, axis=1)[None, :]
    else:
        sums = acc
    return sums


@triton.jit
def _int4_kernel(x_ptr, q_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr, y_ptr, ids_ptr, M, N, K, TPG, SPLIT_CHUNKS,
                 X_DIV: tl.constexpr, GATHER: tl.constexpr, DOT: tl.constexpr, WIDE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    tile, lane, rows, toks, xrows, first, end = _tile(ids_ptr, TPG, K, SPLIT_CHUNKS, 64, X_DIV, GATHER, BLOCK_M,
                                                      BLOCK_N)  # fmt: skip
    tok_ok = toks < M
    byte = tl.arange(0, 32)
    acc = _zeros(BLOCK_M, BLOCK_N, 32, WIDE)
    for c in range(first, end):
        packed = tl.load(q_ptr + (tile * (K // 64) + c) * (BLOCK_N * 32) + lane[:, None] * 32 + byte[None, :])
        at = (tile * (K // 256) + c // 4) * BLOCK_N + lane
        d = tl.load(d_ptr + at).to(tl.float32)
        dmin = tl.load(dmin_ptr + at).to(tl.float32)
        for half in tl.static_range(2):
            sub = (tile * (K // 32) + 2 * c + half) * BLOCK_N + lane
            scale = d * tl.load(sc_ptr + sub).to(tl.float32)
            low = dmin * tl.load(mn_ptr + sub).to(tl.float32)
            nibble = (packed >> (4 * half)) & 15
            w = scale[:, None] * nibble.to(tl.float32) - low[:, None]  # [BLOCK_N, 32]
            x = tl.load(x_ptr + xrows[:, None] * K + c * 64 + half * 32 + byte[None, :],
                        mask=tok_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
            acc = _accumulate(acc, x, w, DOT, WIDE)
    _store(y_ptr, _sums(acc, WIDE), toks, rows, M, N)


@triton.jit
def _int8_kernel(x_ptr, q_ptr, d_ptr, sc_ptr, mn_ptr, dmin_ptr, y_ptr, ids_ptr, M, N, K, TPG, SPLIT_CHUNKS,
                 D_GROUP: tl.constexpr, HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, X_DIV: tl.constexpr,
                 GATHER: tl.constexpr, DOT: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    tile, lane, rows, toks, xrows, first, end = _tile(ids_ptr, TPG, K, SPLIT_CHUNKS, 32, X_DIV, GATHER, BLOCK_M,
                                                      BLOCK_N)  # fmt: skip
    tok_ok = toks < M
    byte = tl.arange(0, 32)
    acc = _zeros(BLOCK_M, BLOCK_N, 32, WIDE)
    for c in range(first, end):
        q = tl.load(q_ptr + (tile * (K // 32) + c) * (BLOCK_N * 32) + lane[:, None] * 32 + byte[None, :])
        at = (tile * (K // D_GROUP) + (c * 32) // D_GROUP) * BLOCK_N + lane
        d = tl.load(d_ptr + at).to(tl.float32)
        if HAS_SC:  # a d per 256 times an int8 scale per 16 (two per chunk)
            sub = (tile * (K // 16) + c * 2) * BLOCK_N + lane
            first_half = byte[None, :] < 16
            sc_lo = tl.load(sc_ptr + sub).to(tl.float32)
            sc_hi = tl.load(sc_ptr + sub + BLOCK_N).to(tl.float32)
            s = d[:, None] * tl.where(first_half, sc_lo[:, None], sc_hi[:, None])
        else:
            s = d[:, None]
        w = s * q.to(tl.float32)  # [BLOCK_N, 32]
        if HAS_MIN:  # unsigned codes: minus dmin (per 256) times a min per 16
            dmin = tl.load(dmin_ptr + at).to(tl.float32)
            mn_lo = tl.load(mn_ptr + sub).to(tl.float32)
            mn_hi = tl.load(mn_ptr + sub + BLOCK_N).to(tl.float32)
            w = w - dmin[:, None] * tl.where(first_half, mn_lo[:, None], mn_hi[:, None])
        x = tl.load(x_ptr + xrows[:, None] * K + c * 32 + byte[None, :], mask=tok_ok[:, None], other=0.0).to(tl.float32)
        acc = _accumulate(acc, x, w, DOT, WIDE)
    _store(y_ptr, _sums(acc, WIDE), toks, rows, M, N)


FLOAT_BLOCK_O, FLOAT_BLOCK_I = 64, 64


@triton.jit
def _float_stack_kernel(x_ptr, w_ptr, y_ptr, E, OUT, IN, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """y[t, e, o] = sum_i x[t, e, i] * w[e, o, i] for a stack of float weights (float16, bfloat16
    or float32) widened to float32 in registers, not in memory: one program per matrix, BLOCK_O
    of its rows and token. Products stay apart until the end, as in the one-token GEMV."""
    e, t = tl.program_id(0), tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for start in range(0, IN, BLOCK_I):
        k = start + cols
        w = tl.load(w_ptr + (e * OUT + rows[:, None]) * IN + k[None, :],
                    mask=(rows < OUT)[:, None] & (k < IN)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        x = tl.load(x_ptr + (t * E + e) * IN + k, mask=k < IN, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    tl.store(y_ptr + (t * E + e) * OUT + rows, tl.sum(acc, axis=1), mask=rows < OUT)


def float_stack_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x float32 [T, E, IN] contiguous, w float [E, OUT, IN] contiguous -> float32 [T, E, OUT].
    Each token's programs read the stack again: meant for one decoded token (R1's W_UK)."""
    if w.numel() >= 2**31:  # the kernel's offsets are int32
        raise ValueError(f"a float stack of {w.numel()} values is past the kernel's int32 offsets")
    t, e, k = x.shape
    out = w.shape[1]
    y = torch.empty(t, e, out, dtype=torch.float32, device=x.device)
    _float_stack_kernel[(e, triton.cdiv(out, FLOAT_BLOCK_O), t)](x, w, y, e, out, k, BLOCK_O=FLOAT_BLOCK_O,
                                                                  BLOCK_I=FLOAT_BLOCK_I)  # fmt: skip
    return y


# Split-K target for decode GEMVs. On an H200 (docs/benchmarks.md, 2026-11-30), 8 programs per
# SM against 2 took V3's q_a and shared-expert GEMVs from 12-14 us to 8-13 us and attn_output
# from 155 to 60 us (Q4_K): a GEMV streams its weights, and only many programs in flight cover
# the memory latency. The output head (2020 tiles) is the same either way.
GEMV_PROGRAMS_PER_SM = 8


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def programs_wanted(device: torch.device, per_sm: int) -> int:
    """per_sm programs per SM on a GPU; a few under the interpreter (enough to test the splits)."""
    return per_sm * _sm_count(device) if device.type == "cuda" else 16


def _launch(x, w, rows: int, cols: int, tiles: int, ids, x_div: int, block_m: int, dot: bool) -> torch.Tensor:
    """y [rows (tokens or slots), cols (the rows of one matrix or of each slot's expert)].

    A GEMV with few tiles (kv_a: 9 of 64 rows) would leave most SMs idle while it streams
    its weights, so decode launches split K as well until there are programs_wanted of them,
    and the partial sums are added afterwards (static shapes: graph-capturable).
    """
    assert BLOCK_N == TILE, "a program's rows are one tile of the format"
    _, k = w.shape
    chunks = k // (64 if isinstance(w, Int4Rows) else 32)
    grid = (tiles, triton.cdiv(rows, block_m))
    wanted = programs_wanted(x.device, GEMV_PROGRAMS_PER_SM)
    splits = 1 if dot else max(1, min(chunks, triton.cdiv(wanted, grid[0] * grid[1])))
    per_split = triton.cdiv(chunks, splits)
    splits = triton.cdiv(chunks, per_split)
    y = torch.empty(splits, rows, cols, dtype=torch.float32, device=x.device)
    gather = ids is not None
    wide = block_m == 1 and not dot
    flags = {"X_DIV": x_div, "GATHER": gather, "DOT": dot, "WIDE": wide, "BLOCK_M": block_m, "BLOCK_N": BLOCK_N}
    ids = ids if gather else y  # an unused pointer
    args = (rows, cols, k, w.tiles_per_group, per_split)
    if isinstance(w, Int4Rows):
        _int4_kernel[(*grid, splits)](x, w.q, w.sc, w.mn, w.d, w.dmin, y, ids, *args, **flags)
    else:
        sc, mn, dmin = (t if t is not None else w.d for t in (w.sc, w.mn, w.dmin))  # w.d: an unused pointer
        _int8_kernel[(*grid, splits)](x, w.q, w.d, sc, mn, dmin, y, ids, *args, D_GROUP=w.d_group,
                                      HAS_SC=w.sc is not None, HAS_MIN=w.mn is not None, **flags)  # fmt: skip
    return y[0] if splits == 1 else y.sum(0)


def matmul(x: torch.Tensor, w: Int4Rows | Int8Rows, decode_tokens: int) -> torch.Tensor:
    """x float32/float16/bfloat16 [T, K] contiguous -> float32 [T, N] for a one-group w; broadcast
    sums up to `decode_tokens` rows, tl.dot above."""
    if w.groups != 1:
        raise ValueError("a stack of matrices multiplies through gathered_matmul")
    m = x.shape[0]
    dot = m > decode_tokens
    block_m = GEMM_BLOCK_M if dot else triton.next_power_of_2(m)
    return _launch(x, w, m, w.rows_per_group, w.tiles_per_group, None, 1, block_m, dot)


def gathered_matmul(x: torch.Tensor, w: Int4Rows | Int8Rows, ids: torch.Tensor, x_per_token: bool) -> torch.Tensor:
    """Row s of the result = x[s // A or s] @ matrix ids[s] of the stack w, transposed.

    ids: int [T, A] on x's device; x: [T, K] (x_per_token: every slot of a token reads its
    row) or [T * A, K]. Returns float32 [T * A, w.rows_per_group].
    """
    x_div = ids.shape[1] if x_per_token else 1
    return _launch(x, w, ids.numel(), w.rows_per_group, w.tiles_per_group, ids.reshape(-1), x_div, 1, False)
