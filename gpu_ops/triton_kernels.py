"""The Triton kernels behind gpu_ops.matmul (imported only where Triton runs).

Each program owns BLOCK_N rows and walks K in chunks, rebuilding the weights in registers from
the GPU formats of gpu_ops.formats and accumulating every token's products with them. Decode
is memory-bound, so each weight byte is read once per call whatever the number of tokens (1-8).
int4: 64-value chunks (32 bytes of each row: low nibbles are values 0-31, high ones 32-63),
weights d * sc * q - dmin * m. int8: 32-value chunks, weights scale * q.
"""

import torch
import triton
import triton.language as tl

from gpu_ops.formats import Int4Rows, Int8Rows

BLOCK_N = 64


@triton.jit
def _int4_kernel(x_ptr, q_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr, y_ptr, M, N, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    toks = tl.arange(0, BLOCK_M)
    tok_ok = toks < M
    lane = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, K // 64):
        packed = tl.load(q_ptr + rows[:, None] * (K // 2) + c * 32 + lane[None, :], mask=row_ok[:, None], other=0)
        d = tl.load(d_ptr + rows * (K // 256) + c // 4, mask=row_ok, other=0.0)
        dmin = tl.load(dmin_ptr + rows * (K // 256) + c // 4, mask=row_ok, other=0.0)
        for half in tl.static_range(2):
            sub = rows * (K // 32) + 2 * c + half
            scale = d * tl.load(sc_ptr + sub, mask=row_ok, other=0).to(tl.float32)
            low = dmin * tl.load(mn_ptr + sub, mask=row_ok, other=0).to(tl.float32)
            nibble = (packed >> (4 * half)) & 15
            w = scale[:, None] * nibble.to(tl.float32) - low[:, None]  # [BLOCK_N, 32]
            x = tl.load(x_ptr + toks[:, None] * K + c * 64 + half * 32 + lane[None, :],
                        mask=tok_ok[:, None], other=0.0)  # fmt: skip
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + toks[:, None] * N + rows[None, :], acc, mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _int8_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, GROUP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    toks = tl.arange(0, BLOCK_M)
    tok_ok = toks < M
    lane = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, K // 32):
        q = tl.load(q_ptr + rows[:, None] * K + c * 32 + lane[None, :], mask=row_ok[:, None], other=0)
        s = tl.load(
            s_ptr + rows[:, None] * (K // GROUP) + (c * 32 + lane[None, :]) // GROUP, mask=row_ok[:, None], other=0.0
        )
        w = s * q.to(tl.float32)  # [BLOCK_N, 32]
        x = tl.load(x_ptr + toks[:, None] * K + c * 32 + lane[None, :], mask=tok_ok[:, None], other=0.0)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + toks[:, None] * N + rows[None, :], acc, mask=tok_ok[:, None] & row_ok[None, :])


def matmul(x: torch.Tensor, w: Int4Rows | Int8Rows) -> torch.Tensor:
    """x float32 [T, K] contiguous, T small -> float32 [T, N], by the kernel of w's format."""
    n, k = w.shape
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, BLOCK_N),)
    blocks = {"BLOCK_M": triton.next_power_of_2(m), "BLOCK_N": BLOCK_N}
    if isinstance(w, Int4Rows):
        _int4_kernel[grid](x, w.q, w.sc, w.mn, w.d, w.dmin, y, m, n, k, **blocks)
    else:
        _int8_kernel[grid](x, w.q, w.scale, y, m, n, k, GROUP=w.group, **blocks)
    return y
