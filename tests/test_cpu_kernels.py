"""CPU kernels against dequantize + float64 matmul, on fresh random blocks and inputs.

The integer kernels multiply activations quantized per 32 values (cpu_ops/activations.py), so
the oracle multiplies the same quantized activations in float64: what remains is float32
rounding, bounded by |W| @ |x|. The activation rounding itself is checked separately.
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from test_quants import random_rows

import cpu_ops.matmul
from cpu_ops.activations import BF16, F16, F32, GROUP, Q8_0, Q8_1, Q8_K, quantize
from cpu_ops.blocks import BLOCKS
from cpu_ops.executor import Executor
from cpu_ops.matmul import INLINE_BYTES, CpuMatrix, CpuStack, supported
from modelfile.quants import dequantize

FLOATS = (T.F32, T.F16, T.BF16)


def weights(qtype, rows, k, rng):
    raw = random_rows(qtype, rows, k // GGML_QUANT_SIZES[qtype][0], rng)
    return raw, dequantize(torch.from_numpy(raw), qtype, k).double().numpy()


def oracle(qtype, dense, acts, raw):
    """The float64 product and the sum of |terms| that bounds float32 rounding. Types with a min
    (Q4_1, Q5_1) take Q8_1 activations: the min meets s = float16(d * sum(q)) per 32 values, as
    in llama.cpp, not the sum of the dequantized values; d * sum is a float32 product there
    (rounded from float64 instead, one s in ~10^4 lands an ulp of float16 apart)."""
    x = acts.xf.astype(np.float64) if qtype in FLOATS else acts.dequantized()
    if acts.form != Q8_1 or qtype in FLOATS:
        return x @ dense.T, np.abs(x) @ np.abs(dense).T
    mins = raw.reshape(raw.shape[0], -1, GGML_QUANT_SIZES[qtype][1])[:, :, 2:4].copy().view(np.float16)[..., 0]
    m = mins.astype(np.float64)  # [rows, blocks]
    sums = acts.xs.reshape(acts.n_tokens, -1, 2).sum(-1).astype(np.float32)  # exact: |sum| <= 32 * 127
    s = (acts.dx * sums).astype(np.float16).astype(np.float64)  # [T, blocks]: float32 d * sum, then float16
    scaled = dense - np.repeat(m, 32, axis=1)
    return x @ scaled.T + s @ m.T, np.abs(x) @ np.abs(scaled).T + np.abs(s) @ np.abs(m).T


@pytest.fixture(scope="module")
def executor():
    with Executor(threads=2) as ex:
        yield ex


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda t: t.name)
# tokens: 1, fours, and fours with 1, 2 or 3 left over (each count has its own row step), eights
# for 256-value blocks; blocks: 32-value types take 8 at a time where a row has them, then the rest
# (9, 11: with 2 or 3 tokens too); 70 and 100 tokens of 11 and 96 blocks span two tiles of tokens.
# Types with a multi-row body take 8 rows at once from 3 tokens on (19 rows: two eights and 3 rows
# alone), at most 16 tokens a call in even shares (33: three calls of 11), tiles of 8 (96 blocks)
@pytest.mark.parametrize(
    "rows,blocks,tokens",
    [(1, 1, 1), (7, 3, 1), (37, 2, 5), (9, 2, 6), (5, 1, 7), (130, 1, 16), (3, 11, 13), (2, 8, 4), (3, 9, 7),
     (2, 8, 6), (2, 11, 70), (1, 96, 100), (19, 2, 3), (16, 2, 2), (8, 1, 33), (16, 96, 20)],
)  # fmt: skip
def test_matmul_matches_float64(qtype, rows, blocks, tokens, executor):
    rng = np.random.default_rng()
    k = blocks * BLOCKS[qtype].values
    raw, dense = weights(qtype, rows, k, rng)
    matrix = CpuMatrix(raw, qtype, k)
    acts = matrix.quantize(rng.standard_normal((tokens, k)).astype(np.float32) * rng.uniform(0.1, 10))
    expected, bound = oracle(qtype, dense, acts, raw)
    for ex in (None, executor):  # the calling thread, and rows split over two workers
        ours = matrix(ex, acts)
        assert ours.shape == (tokens, rows) and ours.dtype == np.float32
        assert np.all(np.abs(ours - expected) <= 2e-6 * bound + 1e-30)


LEGACY = [q for q, kind in BLOCKS.items() if kind.values_of is not None]


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x7F, 0x80])
def test_grouped_legacy_blocks_at_their_extremes(qtype, fill):
    """Every value byte at one extreme and every activation at +-127: the grouped body's 16-bit
    sums (Q4_0, Q5_0) and vpmaddubsw's pair sums (Q8_0: -128 * -127 twice) stay exact."""
    rng = np.random.default_rng()
    raw, _ = weights(qtype, 3, 16 * 32, rng)
    blocks = raw.reshape(3, 16, -1)
    blocks[:, :, 2:] = fill  # the float16 scale d stays in bytes 0-1
    assert_exact_at_unit_activations(qtype, raw, 16 * 32, rng)


def assert_exact_at_unit_activations(qtype, raw, k, rng):
    """raw's rows times activations of all +1, all -1 and random signs (quantized to +-127) match
    the float64 oracle: the integer sums at their extremes did not saturate or wrap."""
    dense = dequantize(torch.from_numpy(raw), qtype, k).double().numpy()
    matrix = CpuMatrix(raw, qtype, k)
    signs = np.where(rng.random((5, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    for x in (np.ones((5, k), np.float32), -np.ones((5, k), np.float32), signs):
        acts = matrix.quantize(x)
        expected, bound = oracle(qtype, dense, acts, raw)
        assert np.all(np.abs(matrix(None, acts) - expected) <= 2e-6 * bound + 1e-30)


MULTI_ROW = [q for q, kind in BLOCKS.items() if kind.rows is not None]


@pytest.mark.parametrize("qtype", MULTI_ROW, ids=lambda t: t.name)
def test_multi_row_sums_at_their_extremes(qtype):
    """Every quant, scale and min at its largest and every activation at +-127: the 16-bit sums
    of four vpmaddubsw (4 * 2 * 15 * 127) and of the mins' per-32 sums stay exact."""
    rng = np.random.default_rng()
    raw, _ = weights(qtype, 16, 4 * 256, rng)
    blocks = raw.reshape(16, 4, -1)
    blocks[:, :, 4:] = 0xFF  # d and dmin (bytes 0-3) stay small and finite
    assert_exact_at_unit_activations(qtype, raw, 4 * 256, rng)


def test_big_matrix_splits_over_workers(executor):
    """Above the inline threshold the rows go to the workers; rows not a multiple of the split."""
    rng = np.random.default_rng()
    raw, dense = weights(T.Q4_K, 4001, 512, rng)
    matrix = CpuMatrix(raw, T.Q4_K, 512)
    acts = matrix.quantize(rng.standard_normal((2, 512)).astype(np.float32))
    expected, bound = oracle(T.Q4_K, dense, acts, raw)
    assert raw.nbytes > INLINE_BYTES
    assert np.all(np.abs(matrix(executor, acts) - expected) <= 2e-6 * bound)
    with pytest.raises(ValueError, match="format"):  # K-quants need Q8_K activations (a scale per 256)
        matrix(executor, quantize(acts.xf, Q8_0))


@pytest.mark.parametrize("form", [Q8_0, Q8_1, Q8_K], ids=["Q8_0", "Q8_1", "Q8_K"])
def test_activations_round_as_llama_cpp(form):
    """llama.cpp's CPU backend quantizes activations per weight type's vec_dot_type: Q8_K for
    the 256-value types, Q8_1 for the 32-value types with a min, Q8_0 for the other 32-value
    ones. All: q = round-half-even(x * m) with m = float32(127 / max|x|) (Q8_K writes the
    largest value's sign into d and q; the products are the same). Scale: 1 / m as float32
    (Q8_K), max|x| / 127 as float16 (Q8_0, the AVX2 path; Q8_1 keeps the float32 that the kernel
    rounds d and s = d * sum(q) from). Written here from those rules in numpy, the engine's
    values must be identical."""
    group = GROUP[form]
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 512)).astype(np.float32) * np.array([1e-3, 1.0, 50.0], np.float32)[:, None]
    x[1, :group] = 0  # an all-zero group
    x[2, 5] = -np.abs(x[2]).max() * 1.5  # a group whose largest value is negative
    a = quantize(x, form)
    g = x.reshape(3, -1, group)
    amax = np.abs(g).max(-1, keepdims=True)
    m = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint((g * m).astype(np.float32))
    assert np.array_equal(a.xq, q.reshape(3, -1).astype(np.int8))
    if form == Q8_K:
        d = np.where(m > 0, np.float32(1) / np.where(m > 0, m, 1), 0).astype(np.float32)
    elif form == Q8_0:
        d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    else:
        d = (amax / np.float32(127)).astype(np.float32)
    assert np.array_equal(a.dx.reshape(3, -1, group // 32), np.broadcast_to(d, (*d.shape[:2], group // 32)))
    assert np.array_equal(a.xs, a.xq.reshape(3, -1, 16).astype(np.int32).sum(-1))
    assert np.all(a.dequantized()[1, :group] == 0)
    assert np.all(np.abs(a.xq).reshape(3, -1, group).max(-1)[[0, 2]] == 127)  # each group uses the full range
    # what that costs: half a step per value, plus the float16 rounding of the step (Q8_0, Q8_1)
    exact_step = np.repeat((amax / 127).reshape(3, -1), group, axis=1)
    step = np.repeat(a.dx.astype(np.float16) if form == Q8_1 else a.dx, 32, axis=1).astype(np.float64)
    bound = 0.5 * exact_step + np.abs(a.xq) * np.abs(step - exact_step)
    assert np.all(np.abs(a.dequantized() - x) <= bound * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("form", [F32, F16, BF16], ids=["F32", "F16", "BF16"])
def test_float_weights_take_activations_in_their_format(form):
    """llama.cpp converts the activations to a float weight's own type before the dot product
    (round half to even): F16 to float16, BF16 to bfloat16; F32 takes them as they are. Checked
    against numpy's and torch's conversions, with values at and beyond float16's range."""
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 256)).astype(np.float32) * np.array([1e-6, 1.0, 3e4], np.float32)[:, None]
    x[0, :4] = [0.0, -0.0, 1e-8, -7e-8]  # float16 subnormals and zeros
    x[2, :3] = [70000.0, -65519.0, np.nan]  # past float16's largest value, just below it, NaN
    a = quantize(x, form)
    expected = {
        F32: x,
        F16: x.astype(np.float16).astype(np.float32),
        BF16: torch.from_numpy(x).to(torch.bfloat16).float().numpy(),
    }[form]
    assert np.array_equal(a.xf, expected, equal_nan=True)
    assert form == F32 or not np.array_equal(a.xf[1], x[1])  # the rounding did happen


def test_unsupported_shapes_and_types():
    assert not supported(T.Q4_K, 128) and supported(T.Q8_0, 128) and not supported(T.TQ1_0, 256)
    with pytest.raises(ValueError, match="no CPU kernel"):  # TQ1_0: not declared
        CpuMatrix(np.zeros((2, 54), np.uint8), T.TQ1_0, 256)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(np.zeros((1, 40), np.float32))


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q4_K, T.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("tokens,rows", [(1, 24), (6, 24), (2, 2000)])  # the last is above INLINE_BYTES of work
def test_stack_multiplies_each_slice_by_its_matrix(qtype, tokens, rows, executor):
    """MLA's per-head products: slice e of the input times matrix e of the stack."""
    rng = np.random.default_rng()
    n, k = 5, 256
    raw, dense = weights(qtype, n * rows, k, rng)
    x = rng.standard_normal((n * tokens, k)).astype(np.float32)
    stack = CpuStack(raw.reshape(n, rows, -1), qtype, n, k)
    assert (stack.raw.nbytes * tokens >= INLINE_BYTES) == (rows > 1000)
    acts = quantize(x, BLOCKS[qtype].act_form)
    xd = acts.xf.astype(np.float64) if qtype in FLOATS else acts.dequantized()
    for ex in (None, executor):
        ours = stack(ex, x, tokens)
        for e in range(n):
            m = dense[e * rows : (e + 1) * rows]
            xe = xd[e * tokens : (e + 1) * tokens]
            expected, bound = xe @ m.T, np.abs(xe) @ np.abs(m).T
            assert np.all(np.abs(ours[:, e * rows : (e + 1) * rows] - expected) <= 2e-6 * bound + 1e-30)


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda t: t.name)
def test_a_prompt_token_sums_the_same_in_any_call(qtype, executor, monkeypatch):
    """A prompt's token gets bit-equal sums however many tokens share its call and however the
    rows are split (the prompt cache's promise: docs/ARCHITECTURE.md). 21 rows: two eights of a
    multi-row body and 5 alone; 9 blocks of 32 values: a group of 8 and one block alone. With
    the executor every call is split over its two workers (INLINE_BYTES 0), rows 0-7 and 8-20:
    split on multiples of 4, rows 8-11 went through the row loop there and an eight-row body
    inline."""
    monkeypatch.setattr(cpu_ops.matmul, "INLINE_BYTES", 0)
    rng = np.random.default_rng()
    kind = BLOCKS[qtype]
    k = (2 if kind.values == 256 else 9) * kind.values
    raw, _ = weights(qtype, 21, k, rng)
    matrix = CpuMatrix(raw, qtype, k)
    x = rng.standard_normal((40, k)).astype(np.float32)
    whole = matrix(None, matrix.quantize(x))
    for n in (2, 3, 5, 9, 17, 33):
        first = int(rng.integers(0, 40 - n))
        for ex in (None, executor):
            assert np.array_equal(matrix(ex, matrix.quantize(x[first : first + n])), whole[first : first + n])
    t = int(rng.integers(0, 40))  # a prompt's token alone in its call (an expert only it chose)
    acts, out = matrix.quantize(x[t : t + 1]), np.empty((1, 21), np.float32)
    matrix.kernel(matrix.raw, 0, matrix.row_bytes, 21, k // kind.values, acts.xq, acts.dx, acts.xs, acts.xf, 0, 1,
                  out, 0, True)  # fmt: skip
    assert np.array_equal(out[0], whole[t])
