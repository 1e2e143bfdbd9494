"""GPU weight formats and kernels against GGUF's own dequantization and a float64 matmul.

The kernels run on DEVICE: CUDA where there is one (the GPU check kit), else the CPU under
TRITON_INTERPRET=1 (set in conftest.py before anything imports Triton), so CI checks the same
kernel source that a GPU compiles.
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from gpu_ops.attention import mla_decode, mla_decode_torch
from gpu_ops.experts import GpuExperts
from gpu_ops.formats import Int4Rows, Int8Rows
from gpu_ops.matmul import DECODE_TOKENS, gathered_matmul, gpu_matmul, repack, torch_matmul, triton_runs_on
from modelfile.quants.types import with_scales
from tests.conftest import DEVICE

GRID = (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M)  # widened to Q6_K's int8 layout
K_INT8 = (T.Q6_K, T.Q5_K, T.Q3_K, T.Q2_K, T.IQ4_XS)  # Q5_K and Q2_K with a min per 16
INT8_32 = (T.Q8_0, T.Q5_0, T.Q4_0, T.IQ4_NL, T.Q4_1, T.Q5_1)  # Q4_1 and Q5_1 with a min per 32
FORMATS = {T.Q4_K: Int4Rows, **dict.fromkeys(K_INT8 + INT8_32 + GRID, Int8Rows)}
# Prefill tiles go through tl.dot: float32 under the interpreter, TF32 on CUDA (a 10-bit
# mantissa, as METHOD.md's ~3e-4 for tf32 products), hence a wider per-element bound there.
DOT_REL = 2e-3 if DEVICE.type == "cuda" else 1e-5


def on_device(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).to(DEVICE)


def random_blocks(qtype, rows: int, k: int, rng) -> np.ndarray:
    """uint8 [rows, row_bytes] of random blocks with small finite float16 scales; with several
    blocks, the first is all zero bytes (a zero block)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * (k // block), size), dtype=np.uint8)
    raw = with_scales(qtype, raw, lambda n: rng.random(n) * 0.02)
    if len(raw) > 1:
        raw[0] = 0
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("rows,k", [(1, 256), (37, 768), (130, 512)])
def test_repacked_weights_dequantize_bit_for_bit(qtype, rows, k):
    raw = random_blocks(qtype, rows, k, np.random.default_rng())
    w = repack(raw, qtype, k, DEVICE)
    assert isinstance(w, FORMATS[qtype])
    np.testing.assert_array_equal(w.dequantize_rows(0, rows).cpu().numpy(), dequantize(raw, qtype).reshape(rows, k))


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("groups,rows,chunks", [(1, 200, 4), (3, 70, 3)])
def test_repacking_to_a_device_goes_chunk_by_chunk(qtype, groups, rows, chunks, monkeypatch):
    """Rows are repacked a tile (or a stack's matrix) at a time into tensors made once on the
    device: the same weights as one repack, every byte placed is reported (the loading bar)."""
    import gpu_ops.matmul as gm

    raw = random_blocks(qtype, groups * rows, 512, np.random.default_rng())
    monkeypatch.setattr(gm, "REPACK_CHUNK_BYTES", 1)  # one unit per chunk: 200 rows = 3 tiles + 8 rows
    reports = []
    with gm.report_placed_bytes(reports.append):
        w = repack(raw, qtype, 512, torch.device("cpu"), groups=groups)
    assert len(reports) == chunks
    whole = repack(raw, qtype, 512, groups=groups)
    sizes = [t.numel() * t.element_size() for t in vars(whole).values() if isinstance(t, torch.Tensor)]
    assert sum(reports) == sum(sizes)
    n = groups * rows
    np.testing.assert_array_equal(w.dequantize_rows(0, n).numpy(), whole.dequantize_rows(0, n).numpy())
    np.testing.assert_array_equal(whole.dequantize_rows(0, n).numpy(), dequantize(raw, qtype).reshape(n, -1))


def test_types_without_a_gpu_format_stay_on_the_reference_path():
    """Every declared quant type has one; a row that is not whole blocks of it does not."""
    from modelfile.quants.types import QUANT_TYPES

    assert {t for t, d in QUANT_TYPES.items() if d.gpu is None} == {T.F32, T.F16, T.BF16}  # floats run as they are
    assert repack(np.zeros((1, 144), np.uint8), T.Q4_K, 128) is None
    assert repack(np.zeros((1, 54), np.uint8), T.TQ1_0, 256) is None


def _check(y: torch.Tensor, raw: np.ndarray, qtype, x: np.ndarray, rel: float = 1e-5):
    w = dequantize(raw, qtype).reshape(raw.shape[0], -1).astype(np.float64)
    ref = x.astype(np.float64) @ w.T
    bound = rel * (np.abs(x).astype(np.float64) @ np.abs(w).T) + 1e-30
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = np.abs(y.cpu().numpy() - ref) / bound * rel
    assert np.all(err <= rel), f"worst {err.max():.2e} of |x||w| (bound {rel:.0e})"


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 3, DECODE_TOKENS])
@pytest.mark.parametrize("rows,k", [(1, 256), (63, 512), (130, 768)])
def test_triton_kernels_match_float64(qtype, tokens, rows, k):
    assert triton_runs_on(DEVICE), "the Triton kernels must run in CI (TRITON_INTERPRET=1)"
    rng = np.random.default_rng()
    raw = random_blocks(qtype, rows, k, rng)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    w = repack(raw, qtype, k, DEVICE)
    assert w.triton
    _check(gpu_matmul(on_device(x), w), raw, qtype, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("tokens", [2, DECODE_TOKENS + 3])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
def test_half_precision_activations(dtype, tokens, triton):
    """float16/bfloat16 activations are widened to float32 as they are loaded: the result is
    the float32 product of the rounded activations."""
    rng = np.random.default_rng()
    raw = random_blocks(T.Q4_K, 70, 512, rng)
    x = on_device(rng.standard_normal((tokens, 512)).astype(np.float32)).to(dtype)
    y = gpu_matmul(x, repack(raw, T.Q4_K, 512, DEVICE, triton=triton))
    assert y.dtype == torch.float32
    _check(y, raw, T.Q4_K, x.float().cpu().numpy(), DOT_REL if triton and tokens > DECODE_TOKENS else 1e-5)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [DECODE_TOKENS + 1, 45])
def test_triton_gemm_matches_float64(qtype, tokens):
    """Above DECODE_TOKENS rows the kernels multiply tiles with tl.dot (prefill)."""
    rng = np.random.default_rng()
    raw = random_blocks(qtype, 70, 512, rng)
    x = rng.standard_normal((tokens, 512)).astype(np.float32)
    y = gpu_matmul(on_device(x), repack(raw, qtype, 512, DEVICE))
    _check(y, raw, qtype, x, DOT_REL)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
def test_gathered_matmul_picks_each_slot_s_expert(qtype, triton):
    """Rows of a stack of 5 experts [5 * 70, 512]; ids chosen on the device, repeats included."""
    rng = np.random.default_rng()
    n_expert, rows, k = 5, 70, 512
    raw = random_blocks(qtype, n_expert * rows, k, rng)
    w = repack(raw, qtype, k, DEVICE, groups=n_expert, triton=triton)  # 70 rows each: two tiles of 64
    ids = torch.from_numpy(rng.integers(0, n_expert, (3, 2)))
    ids[2] = ids[2, 0]  # both slots of a token on one expert
    per_token = rng.standard_normal((3, k)).astype(np.float32)
    per_slot = rng.standard_normal((6, k)).astype(np.float32)
    for x, x_per_token in ((per_token, True), (per_slot, False)):
        y = gathered_matmul(on_device(x), w, ids.to(DEVICE), x_per_token)
        for s, e in enumerate(ids.reshape(-1).tolist()):
            xs = x[s // 2 if x_per_token else s][None]
            _check(y[s : s + 1], raw[e * rows : (e + 1) * rows], qtype, xs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("shape", [(3, 100, 48), (4, 64, 128)], ids=str)  # [E, OUT, IN]: a ragged tile and a whole one
@pytest.mark.parametrize("triton", [True, False])
def test_float_stacks_match_float64(dtype, tokens, shape, triton):
    """A float stack (W_UK derived from a joint kv_b) per matrix, as stored: the kernel widens
    it in registers; the torch path as a float32 copy. Both against float64."""
    from gpu_ops.matmul import float_stack_matmul

    if triton and not triton_runs_on(DEVICE):
        pytest.skip("Triton does not run here")
    rng = np.random.default_rng()
    e, out, k = shape
    w = on_device(rng.standard_normal(shape).astype(np.float32)).to(dtype)
    x = on_device(rng.standard_normal((tokens, e, k)).astype(np.float32))
    y = float_stack_matmul(x, w, triton)
    assert y.dtype == torch.float32 and y.shape == (tokens, e, out)
    w64, x64 = w.double().cpu().numpy(), x.double().cpu().numpy()
    ref = np.einsum("tek,enk->ten", x64, w64)
    bound = 1e-6 * np.einsum("tek,enk->ten", np.abs(x64), np.abs(w64))  # float32 sums of k terms
    assert np.all(np.abs(y.cpu().numpy() - ref) <= bound)


@pytest.mark.parametrize("tokens", [3, DECODE_TOKENS + 4])
def test_gpu_experts_match_float64(tokens):
    """Gathered (decode) and grouped (prefill) expert paths against a float64 MoE."""
    rng = np.random.default_rng()
    n_expert, d, f, a = 6, 256, 512, 3
    qtypes, widths = (T.Q4_K, T.Q4_K, T.Q6_K), (d, d, f)
    raws = [random_blocks(q, n_expert * (f if k == d else d), k, rng) for q, k in zip(qtypes, widths, strict=True)]
    experts = GpuExperts(
        *(repack(r, q, k, DEVICE, groups=n_expert) for r, q, k in zip(raws, qtypes, widths, strict=True))
    )
    gate, up = (dequantize(r, T.Q4_K).reshape(n_expert, f, d).astype(np.float64) for r in raws[:2])
    down = dequantize(raws[2], T.Q6_K).reshape(n_expert, d, f).astype(np.float64)
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    ids = np.stack([rng.choice(n_expert, a, replace=False) for _ in range(tokens)])
    weights = rng.random((tokens, a)).astype(np.float32)
    ref = np.zeros((tokens, d))
    for t in range(tokens):
        for e, wt in zip(ids[t], weights[t], strict=True):
            g, u = gate[e] @ x[t], up[e] @ x[t]
            ref[t] += wt * (down[e] @ (g / (1 + np.exp(-g)) * u))
    y = experts(on_device(x), on_device(ids), on_device(weights)).cpu().numpy()
    rel = DOT_REL if tokens > DECODE_TOKENS else 1e-5  # an expert given > DECODE_TOKENS rows takes tl.dot
    assert np.abs(y - ref).max() <= rel * np.abs(ref).max()


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "heads,rank,rope,length", [(4, 128, 16, 1), (20, 96, 24, 37), (16, 512, 64, 70), (4, 64, 16, 400)]
)
def test_mla_decode_attention_matches_float64(heads, rank, rope, length, cache_dtype, triton):
    """Absorbed MLA attention for one token over the first `length` rows of a longer cache
    buffer whose other rows hold large stale values, which must not leak in. A bfloat16 cache
    (the GPU's) is compared with float64 math on its rounded values."""
    rng = np.random.default_rng()
    cache = rng.standard_normal((length + 40, rank + rope)).astype(np.float32)  # runs of positions past the end
    cache[length:] *= 1e4
    stored = on_device(cache).to(cache_dtype)
    cache = stored.float().cpu().numpy()
    q_latent = rng.standard_normal((heads, rank)).astype(np.float32)
    q_rope = rng.standard_normal((heads, rope)).astype(np.float32)
    scale = 0.05
    lat, kr = cache[:length, :rank].astype(np.float64), cache[:length, rank:].astype(np.float64)
    scores = (q_latent @ lat.T + q_rope @ kr.T) * scale
    p = np.exp(scores - scores.max(1, keepdims=True))
    ref = (p / p.sum(1, keepdims=True)) @ lat
    attend = mla_decode if triton else mla_decode_torch
    assert triton_runs_on(DEVICE)
    for known in (None, length):  # the length only on the device (graphs), or also on the host
        o = attend(on_device(q_latent), on_device(q_rope), stored, on_device(np.array([length])), scale, known)
        err = np.abs(o.cpu().numpy() - ref).max() / np.abs(lat).max()
        assert err <= 1e-5, f"{err:.2e} of the largest latent"


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 20])
def test_torch_path_matches_float64(qtype, tokens):
    rng = np.random.default_rng()
    raw = random_blocks(qtype, 300, 512, rng)
    x = rng.standard_normal((tokens, 512)).astype(np.float32)
    _check(torch_matmul(on_device(x), repack(raw, qtype, 512, DEVICE, triton=False)), raw, qtype, x)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_the_planner_budgets_the_repacked_size(qtype):
    """placement.cost plans GPU memory from the header alone; it must match what repack makes."""
    from placement.cost import gpu_format

    for groups, rows, k in ((1, 7, 512), (1, 130, 256), (3, 70, 256)):  # padded to whole tiles of rows
        raw = random_blocks(qtype, groups * rows, k, np.random.default_rng())
        w = repack(raw, qtype, k, groups=groups)
        made = sum(t.numel() * t.element_size() for t in vars(w).values() if isinstance(t, torch.Tensor))
        shape = (rows, k) if groups == 1 else (groups, rows, k)
        assert gpu_format(qtype, shape, raw.nbytes)[1] == made
