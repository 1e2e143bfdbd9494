"""The hybrid decode step (fixed buffers, GPU segments between CPU-expert hand-offs), on CUDA
where there is one, else on the CPU standing in for the GPU: same logits as the plain forward
pass, and as llama.cpp."""

import numpy as np
import pytest
import torch

import hetero
from hetero.models.blocks import Moe
from hetero.models.hybrid import HybridDecode, StaticDecode, StepProfile
from modelfile.deepseek2_tensors import expanded_is_cheaper
from placement.rules import parse_override
from tests.conftest import DEVICE, llama_logits, logits_in_chunks, random_prompt


def _decode(model, ids, step, n_prefill=3):
    """Logits of ids[n_prefill:] decoded one at a time after a prefill of ids[:n_prefill]."""
    model.net.decode_step = step
    cache = model.new_cache(len(ids) + 2)
    model.forward(ids[:n_prefill], cache)
    return np.concatenate([model.forward([t], cache).cpu().numpy() for t in ids[n_prefill:]])


HYBRID_CASES = {
    # dense weights on the "gpu" (floats through torch), experts on the CPU engine
    "f32-experts-on-cpu-engine": ("F32", ["exps=cpu"], True, {}),
    # dense weights in the GPU formats (Int8Rows), experts through the reference ops on the CPU
    "q8_0-experts-on-cpu-reference": ("Q8_0", ["exps=cpu"], False, {}),
    # everything on the "gpu": experts as gathered GEMVs, no hand-off
    "q4_k_m-all-on-gpu": ("Q4_K_M", [], False, {}),
    # the legacy joint kv_b, on the "gpu" as its derived stacks (float16 W_UK, W_UV in int4)
    "q4_k_m-joint-kv_b-all-on-gpu": ("Q4_K_M", [], False, {"split_kv_b": False}),
}


@pytest.mark.parametrize("case", HYBRID_CASES)
def test_static_step_equals_the_plain_forward(synth, case, monkeypatch):
    """Every expert used (no near-tied top-k choice can flip) and, with the CPU engine, F32
    weights, whose activations are not rounded (F16's are, to float16): what is left between
    the two is summation order."""
    quant, rules, cpu_kernels, overrides = HYBRID_CASES[case]
    # The torch side of the seam: the Triton kernels are tested alone (test_gpu_kernels) and in
    # a whole hybrid model (test_placement), and interpreting them here would take minutes.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path = synth("tiny", quant, n_expert_used=8, **overrides)
    model = hetero.load_model(path, gpu_mem="8GiB", rules=[parse_override(r) for r in rules], cpu_kernels=cpu_kernels)
    step = model.net.decode_step
    assert isinstance(step, HybridDecode)
    ids = random_prompt(9, model.tokenizer.bos_id)
    fast = _decode(model, ids, step)
    stages = step.step.stages
    if rules:  # one segment per MoE layer's hand-off, then the last one
        assert len(stages) == sum(isinstance(b, Moe) for b in model.net.blocks) + 1
    else:
        assert len(stages) == 1 and model.net.find(1, "moe").experts.gpu is not None
    reference = _decode(model, ids, None)
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_static_step_overlaps_shared_experts_with_the_cpu(synth, monkeypatch):
    """Shared experts on the "gpu" run in their own segment while the CPU engine has the
    routed ones; the profile sees every hand-off layer and the step's parts."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = hetero.load_model(synth("tiny", "Q8_0"), gpu_mem="8GiB", rules=[parse_override("exps=cpu")])
    step = model.net.decode_step
    step.profile = profile = StepProfile()
    cache = model.new_cache(8)
    model.forward([1, 2], cache)
    for t in (3, 4, 5):
        model.forward([t], cache)
    moe_layers = [b.block.layer for b in model.net.blocks if isinstance(b, Moe)]
    assert sorted(profile.layers) == moe_layers
    for i in moe_layers:
        hand_off = step.step.stages[moe_layers.index(i)][1]
        assert hand_off.shared is not None  # shared experts beside the routed ones
        times = profile.layers[i]
        assert len(times.gpu) == len(times.cpu) == len(times.wait) == 3
        assert all(t > 0 for t in times.gpu + times.cpu) and all(t >= 0 for t in times.wait)
    assert len(profile.step) == 3 and len(profile.tail_gpu) == 3
    for k in range(3):  # the segments are parts of their step
        parts = profile.tail_gpu[k] + sum(profile.layers[i].gpu[k] + profile.layers[i].wait[k] for i in moe_layers)
        assert parts <= profile.step[k]


def test_segments_are_captured_only_when_all_their_weights_are_on_the_gpu(synth, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = hetero.load_model(synth("tiny", "Q8_0"), gpu_mem="8GiB", rules=[parse_override("exps=cpu")])
    step = StaticDecode(model.net, model.new_cache(4))
    other = "cpu" if DEVICE.type == "cuda" else "cuda"
    assert step.segment_weights_on(DEVICE.type) and not step.segment_weights_on(other)
    on_cuda = DEVICE.type == "cuda"  # graphs are captured on CUDA only
    assert step.capturable() == on_cuda and all(seg.capture == on_cuda for seg, _ in step.stages)
    q = model.net.find(1, "mla").q
    q.gpu = None  # as if the plan had left one matrix in CPU RAM
    q.raw = q.raw.to("meta")
    assert not step.segment_weights_on(DEVICE.type)


def test_a_bfloat16_cache_as_on_a_gpu(synth, monkeypatch):
    """On CUDA the latent cache is bfloat16 (what the planner budgets). The static step reads it
    as the plain forward does, and rounding the latents moves the logits by well under 1%."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = hetero.load_model(synth("tiny", "F32", n_expert_used=8), gpu_mem="8GiB",
                              rules=[parse_override("exps=cpu")], cpu_kernels=False)  # fmt: skip
    ids = random_prompt(9, model.tokenizer.bos_id)
    model.net.cache_dtype = torch.float32  # what the CPU keeps (on CUDA the plan says bfloat16)
    float32 = _decode(model, ids, None)
    model.net.cache_dtype = torch.bfloat16
    assert model.new_cache(2).dtype == torch.bfloat16
    plain = _decode(model, ids, None)
    static = _decode(model, ids, HybridDecode(model.net))
    np.testing.assert_allclose(static, plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    assert 0 < np.linalg.norm(plain - float32) / np.linalg.norm(float32) < 1e-2


def test_a_new_cache_gets_new_buffers(synth, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = hetero.load_model(synth("tiny", "Q8_0"), gpu_mem="8GiB", rules=[parse_override("exps=cpu")])
    ids = random_prompt(6, model.tokenizer.bos_id)
    first = _decode(model, ids, model.net.decode_step)
    step = model.net.decode_step.step
    second = _decode(model, ids, model.net.decode_step)
    assert model.net.decode_step.step is not step
    np.testing.assert_array_equal(first, second)
    with pytest.raises(ValueError, match="another cache"):
        step(1, model.new_cache(4))


HYBRID_LLAMA_CASES = {
    # every expert used, as in the core parity tests: a near-tied top-2 of 8 can go either way
    # between two correct implementations and then moves a row by several percent
    "q8_0-tiny": (("tiny", "Q8_0", {"n_expert_used": 8}), 5e-2),
    "q8_0-tiny-joint-kv_b": (("tiny", "Q8_0", {"n_expert_used": 8, "split_kv_b": False}), 5e-2),
    "q4_k_m-v3": (("v3", "Q4_K_M", {"n_layer": 2, "n_expert": 8, "n_expert_used": 8, "n_group": 1}), 5e-2),
}


@pytest.mark.parametrize("case", HYBRID_LLAMA_CASES)
def test_hybrid_decode_matches_llama_cpp(synth, case, monkeypatch):
    """Dense parts on the "gpu" in GPU formats, routed experts on the CPU engine: a prefill, then
    tokens decoded one at a time through the static step, against llama.cpp's logits within the
    core parity limits."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (preset, quant, overrides), limit = HYBRID_LLAMA_CASES[case]
    path = synth(preset, quant, **overrides)
    model = hetero.load_model(path, gpu_mem="8GiB", rules=[parse_override("exps=cpu")])
    assert isinstance(model.net.decode_step, HybridDecode)
    ids = random_prompt(12, model.tokenizer.bos_id)
    ref = llama_logits(path, ids)
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    assert rel(model.logits(ids[:6]), ref[:6]) <= limit  # prefill: GEMM kernels, experts overlapped
    assert rel(_decode(model, ids, model.net.decode_step, n_prefill=6), ref[6:]) <= limit


def test_expanded_and_absorbed_attention_agree(synth):
    """Prefill's expanded MLA (keys and values made from the latents), the absorbed form, and
    the absorbed form token by token (the CPU's, batch-invariant) give the same logits (F32,
    float64-level agreement), on a fresh cache and after cached tokens."""
    model = hetero.load_model(synth("v3", "F32", n_layer=2), cpu_kernels=False)
    ids = random_prompt(14, model.tokenizer.bos_id)
    out = {}
    for form in ("absorbed", "expanded", "each"):
        model.net.attention_form = form
        cache = model.new_cache(16)
        out[form] = np.concatenate([model.forward(part, cache).cpu().numpy() for part in (ids[:9], ids[9:])])
    ref = out["absorbed"]
    for form in ("expanded", "each"):
        np.testing.assert_allclose(out[form], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_the_attention_form_follows_the_cost():
    class V3:
        n_head, kv_lora_rank, qk_nope_dim, qk_rope_dim, v_head_dim = 128, 512, 128, 64, 128

    assert expanded_is_cheaper(V3, 64, 64)  # a fresh prompt
    assert not expanded_is_cheaper(V3, 1, 100)  # a decoded token over a cache
    assert not expanded_is_cheaper(V3, 64, 4096) and expanded_is_cheaper(V3, 200, 4096)  # crossing at ~171


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_equals_eager(synth):
    """On CUDA the segments are captured once and replayed; the logits must not change."""

    class Eager(HybridDecode):
        def __call__(self, token, cache):
            if self.step is None or self.step.cache is not cache:
                self.step = StaticDecode(self.net, cache)
                for segment, hand_off in self.step.stages:
                    for seg in (segment, hand_off and hand_off.shared):
                        if seg:
                            seg.capture = False
            return self.step(token, cache)

    model = hetero.load_model(synth("tiny", "Q4_K_M", n_expert_used=8), gpu_mem="8GiB",
                              rules=[parse_override("exps=cpu")], cpu_kernels=False)  # fmt: skip
    ids = random_prompt(8, model.tokenizer.bos_id)
    replayed = _decode(model, ids, model.net.decode_step)
    assert all(seg.graph is not None for seg, _ in model.net.decode_step.step.stages)
    ref = _decode(model, ids, Eager(model.net))
    np.testing.assert_allclose(replayed, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_long_prompts_are_prefilled_in_chunks(synth, monkeypatch):
    """A prompt whose attention scores would pass the budget goes through in passes of at most
    64 tokens, in even shares (never a one-token pass: it would be summed as a decoded token);
    the logits are those of one pass (F32, reference ops, a float32 cache: in a
    bfloat16 one, a float32 rounding difference between a chunk's absorbed attention and one
    pass's expanded form can round a cached latent the other way, ~1e-4 of the logits on CUDA)."""
    import modelfile.deepseek2_tensors as ds

    model = hetero.load_model(synth("tiny", "F32"), cpu_kernels=False)
    model.net.cache_dtype = torch.float32
    ids = random_prompt(150, model.tokenizer.bos_id)
    whole = model.logits(ids)
    monkeypatch.setattr(ds, "SCORES_BYTES", 1)
    assert model.net.prefill_chunk(150) == 64
    passes = []
    forward = model.net.forward
    monkeypatch.setattr(model.net, "forward", lambda i, c, *rest: passes.append(len(i)) or forward(i, c, *rest))
    chunked = model.logits(ids)
    assert passes[1:] == [50, 50, 50]
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_a_prompt_split_at_odd_places_equals_one_pass(synth):
    """Prefill in chunks of 1 to 9 tokens (one token goes through the native decode step, a few
    through the prompt kernels' leftover paths, the attention form changing with each chunk's
    share of cached positions) gives the logits of one pass over the whole prompt: F32 weights
    on the CPU engine, every expert used, so only summation order differs."""
    model = hetero.load_model(synth("tiny", "F32", n_expert_used=8), gpu_mem="0")
    model.net.cache_dtype = torch.float32
    rng = np.random.default_rng()
    for _ in range(3):
        ids = random_prompt(40, model.tokenizer.bos_id)
        whole = model.logits(ids)
        chunked = logits_in_chunks(model, ids, rng)
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
