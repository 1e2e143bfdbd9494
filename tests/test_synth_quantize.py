"""hetero's own quantizer for synthetic models: valid GGUF blocks, llama.cpp's type mix, and a
demo that runs where llama.cpp is not installed."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import llama_logits, oracle, random_prompt, rel_err
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gguf_quants

import hetero
from hetero.synth.quantize import MIXES, quantize, tensor_type
from hetero.synth.writer import write_synthetic
from modelfile.errors import HeteroError

# Relative RMS error of round-to-nearest on Gaussian rows (measured 0.077, 0.037, 0.019, 0.0053,
# 0.043, 0.041): a block laid out wrongly (a nibble or scale in the wrong place) is off by ~100%.
RMS_LIMIT = {T.Q4_K: 0.1, T.Q5_K: 0.05, T.Q6_K: 0.025, T.Q8_0: 0.008, T.Q5_0: 0.06, T.Q5_1: 0.06}


@pytest.mark.parametrize("qtype", list(RMS_LIMIT), ids=lambda t: t.name)
def test_blocks_dequantize_to_the_values(qtype):
    rng = np.random.default_rng()
    x = rng.standard_normal((40, 768)).astype(np.float32) * rng.uniform(1e-3, 30, (40, 1)).astype(np.float32)
    x[1] = np.abs(x[1])  # no negative values: the min is 0
    x[2] = -np.abs(x[2])
    x[3, :256] = 0  # an all-zero super-block beside ordinary ones
    x[4] += 5.0  # far from zero
    back = gguf_quants.dequantize(quantize(x, qtype), qtype)
    for row, ref in zip(back, x, strict=True):
        if np.any(ref):
            assert np.linalg.norm(row - ref) <= RMS_LIMIT[qtype] * np.linalg.norm(ref)
    assert np.all(back[3, :256] == 0)


def test_k_quants_refuse_rows_that_are_not_whole_super_blocks():
    with pytest.raises(HeteroError, match="multiple of 256"):
        quantize(np.ones((2, 96), np.float32), T.Q4_K)


@pytest.mark.parametrize("ftype", list(MIXES))
@pytest.mark.parametrize(
    "preset, overrides",
    [("tiny", {"n_layer": 17}), ("v3", {"n_layer": 2, "n_embd": 512, "n_ff_expert": 256, "n_ff_dense": 512})],
    ids=["tiny-17-layers", "v3-narrow"],
)
def test_type_mix_is_llama_cpps(tmp_path, ftype, preset, overrides):
    """Every tensor gets the type llama.cpp's quantizer gives it in a file of that mix."""
    oracle()  # llama.cpp's quantizer is the reference
    ours = write_synthetic(tmp_path / "ours.gguf", preset, ftype, quantizer="hetero", **overrides)[0]
    ref = write_synthetic(tmp_path / "ref.gguf", preset, ftype, quantizer="llama.cpp", **overrides)[0]
    types = [{t.name: t.tensor_type.name for t in GGUFReader(f).tensors} for f in (ours, ref)]
    assert types[0] == types[1]


def test_numpy_quantized_file_matches_llama_cpp(synth):
    """llama.cpp reads hetero's blocks as hetero does: logits within the quantized parity limit."""
    oracle()
    path = synth("tiny", "Q4_K_M", quantizer="hetero", n_expert_used=8)  # every expert: no routing flips
    model = hetero.load_model(path)
    ids = random_prompt(16, model.tokenizer.bos_id)
    assert rel_err(model.logits(ids), llama_logits(path, ids)) < 5e-2


def test_mixes_hetero_cannot_write_name_the_way_out(tmp_path):
    with pytest.raises(HeteroError, match="IQ4_XS needs llama.cpp's"):
        write_synthetic(tmp_path / "x.gguf", "tiny", "IQ4_XS", quantizer="hetero")


@pytest.mark.parametrize("qtype", [T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.Q2_K, T.Q3_K],
                         ids=lambda t: t.name)  # fmt: skip
def test_types_without_an_encoder_get_random_blocks_of_the_values_scale(qtype):
    """Random bytes with float16 factors drawn around the right scale: the dequantized weights
    have about the values' root mean square (within the factors' +-25% spread), whatever it is."""
    rng = np.random.default_rng()
    for rms in (1e-3, 0.05, 3.0):
        values = (rng.standard_normal((64, 512)) * rms).astype(np.float32)
        blocks = quantize(values, qtype)
        weights = gguf_quants.dequantize(blocks, qtype)
        assert weights.shape == values.shape and np.all(np.isfinite(weights))
        assert 0.7 < np.sqrt(np.mean(weights.astype(np.float64) ** 2)) / rms < 1.3
        assert np.array_equal(quantize(values, qtype), blocks)  # the same values, the same bytes


def test_expert_mixes_put_routed_experts_in_their_types(tmp_path):
    """UD-IQ1_S: routed gate/up in IQ1_S, their down projections in IQ2_XXS, the rest as Q4_K_M
    gives it; rows that are not whole super-blocks (V2-Lite's 1408-wide down) take IQ4_NL."""
    path = write_synthetic(tmp_path / "ud.gguf", "tiny", "UD-IQ1_S")[0]
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    q4km = {t.name: t.tensor_type for t in GGUFReader(write_synthetic(tmp_path / "q.gguf", "tiny", "Q4_K_M",
                                                                      quantizer="hetero")[0]).tensors}  # fmt: skip
    for name, qtype in types.items():
        if "_exps." in name:
            assert qtype == (T.IQ2_XXS if "ffn_down" in name else T.IQ1_S), name
        else:
            assert qtype == q4km[name], name
    assert tensor_type("blk.1.ffn_down_exps.weight", (64, 2048, 1408), "UD-IQ1_S", 27, 64) == T.IQ4_NL
    assert tensor_type("blk.1.ffn_up_exps.weight", (64, 1408, 2048), "Q4_K_M+IQ2_XS", 27, 64) == T.IQ2_XS


MALFORMED = [("Q4_K_M+IQ9_Z", "unknown expert type"), ("Q9_K+IQ2_XS", "dense mix"),
             ("Q4_K_M+TQ1_0", "ones hetero reads"), ("UD-IQ7", "unknown quant")]  # fmt: skip


@pytest.mark.parametrize("quant, error", MALFORMED)
def test_a_malformed_expert_mix_is_refused(tmp_path, quant, error):
    with pytest.raises(HeteroError, match=error):
        write_synthetic(tmp_path / "x.gguf", "tiny", quant)


def test_demo_runs_where_llama_cpp_cannot_be_imported(tmp_path):
    """The README's main job on a machine without llama-cpp-python: the demo model is written,
    tokenized and run by hetero alone."""
    from cpu_ops.kernel_cache import cache_dir as _cache_dir

    shim = tmp_path / "shim" / "llama_cpp"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('llama_cpp is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": str(shim.parent), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "NUMBA_CACHE_DIR": str(_cache_dir()), "COLUMNS": "120"}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv = ['hetero', 'demo', '--max-tokens', '6']; "
         "from cli.main import main; main()"],  # fmt: skip
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "decode" in run.stdout and "assistant:" in run.stdout
    assert (tmp_path / "cache" / "hetero" / "demo-v3-Q4_K_M.gguf").stat().st_size > 100 * 2**20
