"""A whole decode step (one token, every weight on the CPU engine) in native code.

Between the kernels of a decode step the Python forward pass spends ~4 ms of a ~25 ms step on
the V2-Lite-shaped file (a thousand interpreter calls and small torch ops), and each of its ~25
hand-offs passes the GIL between threads. Here every worker runs this one function on its own
share of each op and the workers meet at a native spin barrier between ops (llama.cpp's threads
walk their graph the same way), so a step is one hand-off. Small vector work (norms, residuals,
routing) is done by every worker on a private copy: identical inputs give identical results,
which saves a barrier each time.

The step interprets a program: one row per block of the model's description (modelfile/blocks.py),
built at load by hetero/models/native.py, with one body per block kind here (_mla, _mlp, _moe).
Weights are addressed by a tensor table (address, kernel code, rows, row width, row bytes, values
per block, activation format; a row per tensor). The math is that of the torch blocks
(hetero/models/blocks.py), which stay the reference; tests compare the two.
"""

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from cpu_ops.activations import float_values_buffer, quantize_into
from cpu_ops.kernels import matmul_rows_any
from cpu_ops.spin import SPIN_POLLS, _load_acquire, fetch_add, spin_until
from modelfile.blocks import MATRICES, VECTORS

# columns of the tensor table
ADDR, CODE, ROWS, WIDTH, ROW_BYTES, VALUES, ACT_FORM = range(7)

# The program: one row per block of the model's description, its columns generated from the
# block vocabulary (modelfile/blocks.py): the kind's code, the block's cache layer, the offset
# of its input norm in the float parameters, then one column per role of any kind (a tensor
# table row for a matrix, a parameter offset for a vector; -1 where the block has none).
KINDS = tuple(MATRICES)
ROLES = tuple(dict.fromkeys(role for kind in KINDS for role in (*MATRICES[kind], *VECTORS[kind])))
COLUMNS = {name: i for i, name in enumerate(("kind", "cache_layer", "norm", *ROLES))}
_KIND, _CACHE, _NORM = COLUMNS["kind"], COLUMNS["cache_layer"], COLUMNS["norm"]
_MLA, _MLP, _MOE = KINDS.index("mla"), KINDS.index("mlp"), KINDS.index("moe")
_Q, _QA, _QB, _KVA, _KB, _VB, _OUT = (COLUMNS[r] for r in ("q", "q_a", "q_b", "kv_a", "k_b", "v_b", "out"))
_QA_NORM, _KV_NORM = COLUMNS["q_a_norm"], COLUMNS["kv_a_norm"]
_GATE, _UP, _DOWN = COLUMNS["gate"], COLUMNS["up"], COLUMNS["down"]
_ROUTER, _BIAS = COLUMNS["router"], COLUMNS["bias"]
_GATE_E, _UP_E, _DOWN_E = COLUMNS["gate_exps"], COLUMNS["up_exps"], COLUMNS["down_exps"]

# the integer configuration: the model config's fields by name, then what the step adds
CONFIG_FIELDS = ("n_embd", "n_head", "qk_nope_dim", "qk_rope_dim", "v_head_dim", "kv_lora_rank", "n_expert",
                 "n_expert_used", "n_group", "n_group_used", "norm_topk", "n_ff_expert")  # fmt: skip
CONFIG = {name: i for i, name in enumerate((*CONFIG_FIELDS, "sigmoid", "output", "output_norm"))}
_C_EMBD, _C_HEAD, _C_NOPE, _C_ROPE, _C_VDIM, _C_RANK = (CONFIG[f] for f in CONFIG_FIELDS[:6])
_C_EXPERTS, _C_USED, _C_GROUPS, _C_GROUPS_USED, _C_NORM_TOPK, _C_FF_EXPERT = (CONFIG[f] for f in CONFIG_FIELDS[6:])
_C_SIGMOID, _C_OUTPUT, _C_OUTPUT_NORM = CONFIG["sigmoid"], CONFIG["output"], CONFIG["output_norm"]


@intrinsic
def _bytes_at(typingctx, address):
    """An i8 pointer from an integer address (the tensor table's first column)."""

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.CPointer(types.uint8)(types.int64), codegen


@numba.njit(nogil=True, cache=True)
def _kernel(code, w, w_off, row_stride, n_rows, n_blocks, xq, dx, xs, xf, out, out_col):
    """One token through n_rows rows of a weight of type `code` into out[out_col:] (1-D)."""
    matmul_rows_any(code, w, w_off, row_stride, n_rows, n_blocks, xq, dx, xs, xf, out, out_col)


@numba.njit(nogil=True, cache=True)
def _quantized(x, form):
    """x float32 [K] as the kernels' activations in format `form` (int8, scales, sums, floats)."""
    k = x.size
    x2 = x.reshape((1, k))
    xf = float_values_buffer(x2, form)
    xq = np.empty((1, k), np.int8)
    dx = np.empty((1, k // 32), np.float32)
    xs = np.empty((1, k // 16), np.int32)
    quantize_into(x2, xq, dx, xs, xf, form)
    return xq, dx, xs, xf


@numba.njit(nogil=True, cache=True)
def _rows(tensors, t, x, out, first_row, start, stop):
    """Rows [first_row + start, first_row + stop) of tensor t times x, into out[start:stop]
    (out is a 1-D slice whose index 0 is row first_row)."""
    if stop <= start:
        return
    meta = tensors[t]
    xq, dx, xs, xf = _quantized(x, meta[ACT_FORM])
    w = numba.carray(_bytes_at(meta[ADDR]), (first_row + stop) * meta[ROW_BYTES])
    _kernel(meta[CODE], w, (first_row + start) * meta[ROW_BYTES], meta[ROW_BYTES], stop - start,
            meta[WIDTH] // meta[VALUES], xq, dx, xs, xf, out, start)  # fmt: skip


@numba.njit(nogil=True, cache=True)
def _share(n, worker, n_workers):
    """This worker's range of n items, boundaries on multiples of 4 (whole 4-row groups)."""
    units = (n + 3) // 4
    return min(n, units * worker // n_workers * 4), min(n, units * (worker + 1) // n_workers * 4)


@numba.njit(nogil=True, cache=True)
def _matmul(tensors, t, x, out, worker, n_workers):
    """This worker's rows of out = W_t x."""
    start, stop = _share(tensors[t, ROWS], worker, n_workers)
    _rows(tensors, t, x, out, 0, start, stop)


@numba.njit(nogil=True, cache=True)
def _barrier(state, n_workers):
    """All workers meet (state: int64, arrivals at 0, generation at 16; reusable)."""
    generation = _load_acquire(state, 16)
    if fetch_add(state, 0, 1) == n_workers - 1:
        state[0] = 0
        fetch_add(state, 16, 1)
    else:
        while not spin_until(state, 16, generation + 1, SPIN_POLLS):
            pass  # a slow share (a long context's attention): keep yielding until it arrives


@numba.njit(nogil=True, cache=True)
def _rms_norm(x, weight, eps):
    total = 0.0
    for v in x:
        total += np.float64(v) * v
    scale = np.float32(1.0 / np.sqrt(total / x.size + eps))
    return x * scale * weight


@numba.njit(nogil=True, cache=True)
def _rope(x, cos, sin):
    out = np.empty_like(x)
    for i in range(cos.size):
        even, odd = x[2 * i], x[2 * i + 1]
        out[2 * i] = even * cos[i] - odd * sin[i]
        out[2 * i + 1] = even * sin[i] + odd * cos[i]
    return out


@numba.njit(nogil=True, cache=True, fastmath=True)
def _dot(a, b):
    total = np.float32(0.0)
    for i in range(a.size):
        total += a[i] * b[i]
    return total


@numba.njit(nogil=True, cache=True)
def _attend(rows, q_latent, q_rope, kq_scale):
    """One head over the cached rows [S, R+P]: softmax of the scores, then the latent average."""
    rank = q_latent.size
    scores = np.empty(rows.shape[0], np.float32)
    for s in range(rows.shape[0]):
        scores[s] = (_dot(rows[s, :rank], q_latent) + _dot(rows[s, rank:], q_rope)) * np.float32(kq_scale)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    o = np.zeros(rank, np.float32)
    for s in range(rows.shape[0]):
        o += p[s] * rows[s, :rank]
    return o


@numba.njit(nogil=True, cache=True)
def _silu_times(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@numba.njit(nogil=True, cache=True)
def route(logits, bias, sigmoid, n_used, n_group, n_group_used, normalize, scale):
    """hetero.routing.route for one token: (expert ids [A], weights float32 [A])."""
    n = logits.size
    if sigmoid:
        probs = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max())
        probs = e / e.sum()
    choice = probs + bias if bias.size else probs.copy()
    if n_group > 1:
        per = n // n_group
        scores = np.empty(n_group, np.float32)
        for g in range(n_group):
            part = np.sort(choice[g * per : (g + 1) * per])
            scores[g] = part[-1] + part[-2]
        order = np.argsort(-scores, kind="mergesort")
        for g in order[n_group_used:]:
            choice[g * per : (g + 1) * per] = -np.inf
    ids = np.empty(n_used, np.int64)
    for j in range(n_used):
        best = np.argmax(choice)
        ids[j] = best
        choice[best] = -np.inf
    weights = probs[ids]
    if normalize:
        weights = weights / max(weights.sum(), np.float32(6.103515625e-5))
    if scale != 0.0 and scale != 1.0:
        weights = weights * np.float32(scale)
    return ids, weights


@numba.njit(nogil=True, cache=True)
def _mla(worker, n_workers, barrier, tensors, row, params, cfg, eps, kq_scale, xn, cache, pos, cos, sin,
         q_buf, kv_buf, ov_buf, out):  # fmt: skip
    """MLA for one token, absorbed form, over this block's cache layer [S_max, R+P]: the new row
    is written at pos, heads are shared among the workers; out [D] gets this worker's rows."""
    n_head, nope, rope = cfg[_C_HEAD], cfg[_C_NOPE], cfg[_C_ROPE]
    vdim, rank = cfg[_C_VDIM], cfg[_C_RANK]
    h0, h1 = n_head * worker // n_workers, n_head * (worker + 1) // n_workers
    if row[_QA] >= 0:
        qa = kv_buf[rank + rope :]  # the q_lora latent, behind kv in the same buffer
        _matmul(tensors, row[_QA], xn, qa, worker, n_workers)
        _barrier(barrier, n_workers)
        qan = _rms_norm(qa.copy(), params[row[_QA_NORM] : row[_QA_NORM] + qa.size], eps)
        _matmul(tensors, row[_QB], qan, q_buf, worker, n_workers)
    else:
        _matmul(tensors, row[_Q], xn, q_buf, worker, n_workers)
    _matmul(tensors, row[_KVA], xn, kv_buf[: rank + rope], worker, n_workers)
    _barrier(barrier, n_workers)

    new = cache[pos]
    if worker == 0:
        new[:rank] = _rms_norm(kv_buf[:rank], params[row[_KV_NORM] : row[_KV_NORM] + rank], eps)
        new[rank:] = _rope(kv_buf[rank : rank + rope], cos, sin)
    q_lat = np.empty((n_head, rank), np.float32)
    q_rot = np.empty((n_head, rope), np.float32)
    for h in range(h0, h1):
        base = h * (nope + rope)
        _rows(tensors, row[_KB], q_buf[base : base + nope].copy(), q_lat[h], h * rank, 0, rank)
        q_rot[h] = _rope(q_buf[base + nope : base + nope + rope], cos, sin)
    _barrier(barrier, n_workers)  # the new cache row is in

    for h in range(h0, h1):
        o = _attend(cache[: pos + 1], q_lat[h], q_rot[h], kq_scale)
        _rows(tensors, row[_VB], o, ov_buf[h * vdim : (h + 1) * vdim], h * vdim, 0, vdim)
    _barrier(barrier, n_workers)
    _matmul(tensors, row[_OUT], ov_buf.copy(), out, worker, n_workers)


@numba.njit(nogil=True, cache=True)
def _mlp(worker, n_workers, barrier, tensors, row, xn, h_buf, out):
    """The gated SiLU MLP: gate/up by rows, then down by rows into out [D]."""
    d0, d1 = _share(out.size, worker, n_workers)
    f = tensors[row[_GATE], ROWS]
    a, b = _share(f, worker, n_workers)
    g, u = np.empty(f, np.float32), np.empty(f, np.float32)
    _rows(tensors, row[_GATE], xn, g, 0, a, b)
    _rows(tensors, row[_UP], xn, u, 0, a, b)
    h_buf[0, a:b] = _silu_times(g[a:b], u[a:b])
    _barrier(barrier, n_workers)
    _rows(tensors, row[_DOWN], h_buf[0, :f].copy(), out, 0, d0, d1)


@numba.njit(nogil=True, cache=True)
def _moe(worker, n_workers, barrier, tensors, row, params, cfg, routed_scale, xn, router_buf, h_buf, out):
    """Router, then the chosen experts and the shared ones: gate/up by rows of each, a barrier,
    down by rows of the output, weighted and summed into out [D]."""
    d, f_exp = out.size, cfg[_C_FF_EXPERT]
    d0, d1 = _share(d, worker, n_workers)
    _matmul(tensors, row[_ROUTER], xn, router_buf, worker, n_workers)
    _barrier(barrier, n_workers)
    bias = params[row[_BIAS] : row[_BIAS] + router_buf.size] if row[_BIAS] >= 0 else params[:0]
    ids, weights = route(router_buf.copy(), bias, cfg[_C_SIGMOID], cfg[_C_USED], cfg[_C_GROUPS],
                         cfg[_C_GROUPS_USED], cfg[_C_NORM_TOPK], routed_scale)  # fmt: skip
    n_used = ids.size
    a, b = _share(f_exp, worker, n_workers)
    g, u = np.empty(f_exp, np.float32), np.empty(f_exp, np.float32)
    for j in range(n_used):
        _rows(tensors, row[_GATE_E], xn, g, ids[j] * f_exp, a, b)
        _rows(tensors, row[_UP_E], xn, u, ids[j] * f_exp, a, b)
        h_buf[j, a:b] = _silu_times(g[a:b], u[a:b])
    f_sh = tensors[row[_GATE], ROWS] if row[_GATE] >= 0 else 0
    if f_sh:
        a, b = _share(f_sh, worker, n_workers)
        gs, us = np.empty(f_sh, np.float32), np.empty(f_sh, np.float32)
        _rows(tensors, row[_GATE], xn, gs, 0, a, b)
        _rows(tensors, row[_UP], xn, us, 0, a, b)
        h_buf[n_used, a:b] = _silu_times(gs[a:b], us[a:b])
    _barrier(barrier, n_workers)
    part = np.empty(d, np.float32)
    out[d0:d1] = 0.0
    for j in range(n_used):
        _rows(tensors, row[_DOWN_E], h_buf[j, :f_exp].copy(), part, ids[j] * d, d0, d1)
        out[d0:d1] += weights[j] * part[d0:d1]
    if f_sh:
        _rows(tensors, row[_DOWN], h_buf[n_used, :f_sh].copy(), part, 0, d0, d1)
        out[d0:d1] += part[d0:d1]


@numba.njit(nogil=True, cache=True)
def decode_token(
    worker, n_workers, barrier, tensors, program, params, cfg, eps, kq_scale, routed_scale,
    x_in, cache, pos, cos, sin, q_buf, kv_buf, ov_buf, tmp, router_buf, h_buf, logits,
):  # fmt: skip
    """One token through every block of the program and the output head: this worker's share
    of each op. Each block's body writes its rows of tmp; after a barrier every worker adds all
    of tmp to its private residual x. Shared buffers (q_buf .. logits) are written by row
    ranges and read after a barrier."""
    d = cfg[_C_EMBD]
    x = x_in.copy()
    for bi in range(program.shape[0]):
        row = program[bi]
        xn = _rms_norm(x, params[row[_NORM] : row[_NORM] + d], eps)
        kind = row[_KIND]
        if kind == _MLA:
            _mla(worker, n_workers, barrier, tensors, row, params, cfg, eps, kq_scale, xn, cache[row[_CACHE]],
                 pos, cos, sin, q_buf, kv_buf, ov_buf, tmp)  # fmt: skip
        elif kind == _MLP:
            _mlp(worker, n_workers, barrier, tensors, row, xn, h_buf, tmp)
        else:
            _moe(worker, n_workers, barrier, tensors, row, params, cfg, routed_scale, xn, router_buf, h_buf, tmp)
        _barrier(barrier, n_workers)
        x += tmp
    xn = _rms_norm(x, params[cfg[_C_OUTPUT_NORM] : cfg[_C_OUTPUT_NORM] + d], eps)
    _matmul(tensors, cfg[_C_OUTPUT], xn, logits, worker, n_workers)
