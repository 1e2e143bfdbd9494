"""The native decode step (cpu_ops.decode) against the Python forward pass and hetero.routing."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from test_quants import random_rows

import hetero
from cpu_ops.blocks import BLOCKS
from cpu_ops.decode import _kernel as native_kernel
from cpu_ops.decode import route as native_route
from cpu_ops.matmul import CpuMatrix
from hetero.ops import split_joint_kv_b
from hetero.routing import route
from modelfile.gguf_file import TensorInfo
from modelfile.quants import dequantize


@pytest.mark.parametrize(
    "gating,bias,groups,normalize,scale",
    [
        ("softmax", False, (1, 1), False, 1.0),
        ("sigmoid", True, (8, 4), True, 2.5),
        ("softmax", False, (4, 2), True, 1.0),
    ],
)
def test_native_routing_matches_the_reference(gating, bias, groups, normalize, scale):
    rng = np.random.default_rng()
    for _ in range(20):
        logits = (rng.standard_normal(64) * 2).astype(np.float32)
        b = (rng.standard_normal(64) * 0.1).astype(np.float32) if bias else np.zeros(0, np.float32)
        ids, weights = route(torch.from_numpy(logits)[None], 6, gating, torch.from_numpy(b) if bias else None,
                             *groups, normalize, scale)  # fmt: skip
        n_ids, n_weights = native_route(logits, b, gating == "sigmoid", 6, *groups, normalize, scale)
        ref = dict(zip(ids[0].tolist(), weights[0].tolist(), strict=True))
        assert set(n_ids.tolist()) == set(ref)
        np.testing.assert_allclose(n_weights, [ref[i] for i in n_ids.tolist()], rtol=1e-5)


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("tiny", {"n_expert_used": 8}),
        ("v3", {"n_layer": 2, "n_expert": 8, "n_expert_used": 8, "n_group": 1, "n_group_used": 1}),
        ("tiny", {"n_expert_used": 8, "split_kv_b": False}),  # k_b / v_b derived from the joint kv_b
    ],
)
def test_native_decode_matches_the_python_forward(synth, preset, overrides):
    """Same logits as the Python forward pass on the same cache, over several steps, for 1-3
    workers (uneven shares). F32 weights take the activations as they are (F16 would round
    them to float16) and every expert is used, so no rounding step or near-tied top-k choice
    can move; what is left is summation order."""
    path = synth(preset, "F32", **overrides)
    ids = [0, *np.random.default_rng().integers(0, 600, 9).tolist()]
    for threads in (1, 2, 3):
        model = hetero.load_model(path, threads=threads)
        assert model.net.decode_step is not None
        fast = _decode(model, ids, model.net.decode_step)
        reference = _decode(model, ids, None)
        np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def _decode(model, ids, native):
    """Logits of ids[3:] decoded one at a time after a prefill of ids[:3]."""
    model.net.decode_step = native
    cache = model.new_cache(16)
    model.forward(ids[:3], cache)
    return np.concatenate([model.forward([t], cache).numpy() for t in ids[3:]])


def test_native_decode_only_when_every_weight_is_on_the_engine(synth):
    path = synth("tiny", "Q8_0")
    assert hetero.load_model(path).net.decode_step is not None
    assert hetero.load_model(path, cpu_kernels=False).net.decode_step is None


def _compiled_signatures(model) -> int:
    """How many compiled specialisations the CPU engine's numba functions hold."""
    import numba

    import cpu_ops.activations
    import cpu_ops.decode
    import cpu_ops.kernels
    import cpu_ops.spin

    dispatchers = [*cpu_ops.kernels.MATMUL.values(), *cpu_ops.kernels.MATMUL_STACK.values()]
    for module in (cpu_ops.activations, cpu_ops.decode, cpu_ops.spin):
        dispatchers += [v for v in vars(module).values() if isinstance(v, numba.core.dispatcher.Dispatcher)]
    for block in model.net.blocks:
        if block.block.kind == "moe":
            dispatchers += [block.experts.cpu.gate_up, block.experts.cpu.down]
    return sum(len(d.signatures) for d in dispatchers)


def test_warm_up_compiles_what_a_prompt_and_a_token_need(synth):
    """The CLI shows a spinner around warm_up(); nothing may compile after it (a silent pause)."""
    model = hetero.load_model(synth("tiny", "Q8_0"))
    model.warm_up()
    before = _compiled_signatures(model)
    cache = model.new_cache(8)
    model.forward([model.tokenizer.bos_id, 5, 17, 33, 2], cache)
    model.forward([9], cache)
    assert _compiled_signatures(model) == before


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda t: t.name)
def test_the_native_dispatch_runs_every_engine_type(qtype):
    """The native step's switch over the declared types gives each type's own kernel's result
    (same rows, same quantized activations); an unknown code gives NaN, never another type."""
    rng = np.random.default_rng()
    kind, rows = BLOCKS[qtype], 9
    k = 2 * kind.values
    raw = random_rows(qtype, rows, k // GGML_QUANT_SIZES[qtype][0], rng)
    matrix = CpuMatrix(raw, qtype, k)
    acts = matrix.quantize(rng.standard_normal((1, k)).astype(np.float32))
    expected = matrix(None, acts)
    flat = np.ascontiguousarray(raw).reshape(-1)
    for code, want in ((kind.code, expected), (len(BLOCKS) + 5, np.full_like(expected, np.nan))):
        out = np.zeros((1, rows), np.float32)
        native_kernel(
            code, flat, 0, raw.shape[1], rows, k // kind.values, acts.xq, acts.dx, acts.xs, acts.xf, out[0], 0
        )
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q8_0, T.F32, T.BF16], ids=lambda t: t.name)
def test_a_joint_kv_b_splits_into_the_stacks_it_holds(qtype):
    """The legacy attn_kv_b [H * (N + V), R]: v_b [H, V, R] is its W_UV rows, byte for byte;
    k_b [H, R, N] its W_UK transposed, exactly in a float file's own type and rounded once to
    float16 from a quantized one."""
    h, n, v, r = 3, 32, 64, 256
    rng = np.random.default_rng()
    raw = random_rows(qtype, h * (n + v), r // GGML_QUANT_SIZES[qtype][0], rng)
    info = TensorInfo("blk.0.attn_kv_b.weight", qtype, (h * (n + v), r), raw, None)
    k, vb = split_joint_kv_b(info, h, n, v)
    joint = dequantize(torch.from_numpy(raw), qtype, r).view(h, n + v, r)
    assert vb.qtype == qtype and vb.shape == (h, v, r)
    assert np.array_equal(vb.data.reshape(h, v, -1), raw.reshape(h, n + v, -1)[:, n:])
    w_uk = joint[:, :n].transpose(1, 2)  # [H, R, N]
    exact = qtype in (T.F32, T.BF16)
    assert k.shape == (h, r, n) and k.qtype == (qtype if exact else T.F16)
    derived = dequantize(torch.from_numpy(k.data), k.qtype, n).view(h, r, n)
    assert torch.equal(derived, w_uk if exact else w_uk.half().float())


def test_a_joint_kv_b_decodes_natively_as_it_dequantizes(synth):
    """The same legacy file with kv_b dequantized per use (reference ops) and with the derived
    stacks (the engine, the native step): F32 weights, so only summation order differs."""
    path = synth("v3", "F32", n_layer=2, split_kv_b=False)
    ids = [0, *np.random.default_rng().integers(0, 600, 9).tolist()]
    derived = hetero.load_model(path)
    assert derived.executor_name == "native" and derived.plan.executor == "native"
    plain = hetero.load_model(path, cpu_kernels=False)
    assert plain.net.blocks[0].k_b is None
    fast, reference = _decode(derived, ids, derived.net.decode_step), _decode(plain, ids, None)
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
