"""The Triton kernels behind gpu_ops.matmul (imported only where Triton runs).

Each program owns BLOCK_N weight rows and BLOCK_M activation rows and walks K in chunks,
rebuilding the weights in registers from the GPU formats of gpu_ops.formats. int4: 64-value
chunks (32 bytes of each row: low nibbles are values 0-31, high ones 32-63), weights
d * sc * q - dmin * m. int8: 32-value chunks, weights d * q or d * sc * q (Q6_K).

Two ways to multiply a chunk, chosen per launch (DOT):
- decode (1-8 tokens): broadcast products summed in registers. Decode is memory-bound, so
  what matters is that each weight byte is read once per call whatever the number of tokens.
- prefill (more tokens): tl.dot on the tile, which puts the tensor cores to work (TF32 on
  float32 tiles: float32's range, a 10-bit mantissa, accumulation in float32).

Gathered mode (GATHER) serves routed experts inside a captured CUDA graph: the weight rows are
a stack of experts [E * N, K], grid axis 1 runs over (token, slot) pairs, and each program
reads its expert's id from device memory, so nothing goes back to the host.
"""

import torch
import triton
import triton.language as tl

from gpu_ops.formats import Int4Rows, Int8Rows

BLOCK_N = 64
GEMM_BLOCK_M = 32


@triton.jit
def _tile(x_ptr, ids_ptr, M, N, K, X_DIV: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):  # fmt: skip
    """This program's output rows (toks, into y), the weight rows it reads, and its x rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    toks = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    wrows = rows
    if GATHER:
        wrows = rows + tl.load(ids_ptr + tl.program_id(1)) * N
    return rows, wrows, toks, toks // X_DIV


@triton.jit
def _accumulate(acc, x, w, DOT: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x [BLOCK_M, C] @ w [BLOCK_N, C].T"""
    if DOT:
        return acc + tl.dot(x, tl.trans(w))
    return acc + tl.sum(x[:, None, :] * w[None, :, :], axis=2)


@triton.jit
def _int4_kernel(x_ptr, q_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr, y_ptr, ids_ptr, M, N, K,
                 X_DIV: tl.constexpr, GATHER: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    rows, wrows, toks, xrows = _tile(x_ptr, ids_ptr, M, N, K, X_DIV, GATHER, BLOCK_M, BLOCK_N)
    row_ok = rows < N
    tok_ok = toks < M
    lane = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, K // 64):
        packed = tl.load(q_ptr + wrows[:, None] * (K // 2) + c * 32 + lane[None, :], mask=row_ok[:, None], other=0)
        d = tl.load(d_ptr + wrows * (K // 256) + c // 4, mask=row_ok, other=0.0).to(tl.float32)
        dmin = tl.load(dmin_ptr + wrows * (K // 256) + c // 4, mask=row_ok, other=0.0).to(tl.float32)
        for half in tl.static_range(2):
            sub = wrows * (K // 32) + 2 * c + half
            scale = d * tl.load(sc_ptr + sub, mask=row_ok, other=0).to(tl.float32)
            low = dmin * tl.load(mn_ptr + sub, mask=row_ok, other=0).to(tl.float32)
            nibble = (packed >> (4 * half)) & 15
            w = scale[:, None] * nibble.to(tl.float32) - low[:, None]  # [BLOCK_N, 32]
            x = tl.load(x_ptr + xrows[:, None] * K + c * 64 + half * 32 + lane[None, :],
                        mask=tok_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
            acc = _accumulate(acc, x, w, DOT)
    tl.store(y_ptr + toks[:, None] * N + rows[None, :], acc, mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _int8_kernel(x_ptr, q_ptr, d_ptr, sc_ptr, y_ptr, ids_ptr, M, N, K, D_GROUP: tl.constexpr,
                 HAS_SC: tl.constexpr, X_DIV: tl.constexpr, GATHER: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    rows, wrows, toks, xrows = _tile(x_ptr, ids_ptr, M, N, K, X_DIV, GATHER, BLOCK_M, BLOCK_N)
    row_ok = rows < N
    tok_ok = toks < M
    lane = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, K // 32):
        q = tl.load(q_ptr + wrows[:, None] * K + c * 32 + lane[None, :], mask=row_ok[:, None], other=0)
        d = tl.load(d_ptr + wrows * (K // D_GROUP) + (c * 32) // D_GROUP, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_SC:  # Q6_K: d per 256 times an int8 scale per 16
            sub = wrows[:, None] * (K // 16) + c * 2 + lane[None, :] // 16
            sc = tl.load(sc_ptr + sub, mask=row_ok[:, None], other=0)
            s = d[:, None] * sc.to(tl.float32)
        else:
            s = d[:, None]
        w = s * q.to(tl.float32)  # [BLOCK_N, 32]
        x = tl.load(x_ptr + xrows[:, None] * K + c * 32 + lane[None, :], mask=tok_ok[:, None], other=0.0).to(tl.float32)
        acc = _accumulate(acc, x, w, DOT)
    tl.store(y_ptr + toks[:, None] * N + rows[None, :], acc, mask=tok_ok[:, None] & row_ok[None, :])


def _launch(x, w, y, n, grid, ids, x_div, block_m, dot):
    k = w.shape[1]
    m = y.shape[0]
    gather = ids is not None
    flags = {"X_DIV": x_div, "GATHER": gather, "DOT": dot, "BLOCK_M": block_m, "BLOCK_N": BLOCK_N}
    ids = ids if gather else y  # an unused pointer
    if isinstance(w, Int4Rows):
        _int4_kernel[grid](x, w.q, w.sc, w.mn, w.d, w.dmin, y, ids, m, n, k, **flags)
    else:
        sc = w.sc if w.sc is not None else w.d  # an unused pointer without sub-block scales
        _int8_kernel[grid](x, w.q, w.d, sc, y, ids, m, n, k, D_GROUP=w.d_group, HAS_SC=w.sc is not None, **flags)


def matmul(x: torch.Tensor, w: Int4Rows | Int8Rows, decode_tokens: int) -> torch.Tensor:
    """x float32/float16/bfloat16 [T, K] contiguous -> float32 [T, N]; broadcast sums up to
    `decode_tokens` rows, tl.dot above."""
    n, _ = w.shape
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    dot = m > decode_tokens
    block_m = GEMM_BLOCK_M if dot else triton.next_power_of_2(m)
    _launch(x, w, y, n, (triton.cdiv(n, BLOCK_N), triton.cdiv(m, block_m)), None, 1, block_m, dot)
    return y


def gathered_matmul(x: torch.Tensor, w: Int4Rows | Int8Rows, ids: torch.Tensor, rows_per_expert: int,
                    x_per_token: bool) -> torch.Tensor:  # fmt: skip
    """Row s of the result = x[s // A or s] @ expert ids[s] of w (a stack of [rows_per_expert, K]).T.

    ids: int [T, A] on x's device; x: [T, K] (x_per_token: every slot of a token reads its
    row) or [T * A, K]. Returns float32 [T * A, rows_per_expert].
    """
    slots = ids.numel()
    y = torch.empty(slots, rows_per_expert, dtype=torch.float32, device=x.device)
    x_div = ids.shape[1] if x_per_token else 1
    grid = (triton.cdiv(rows_per_expert, BLOCK_N), slots)
    _launch(x, w, y, rows_per_expert, grid, ids.reshape(-1), x_div, 1, False)
    return y
