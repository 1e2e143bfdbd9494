"""Shared fixtures: synthetic GGUF files (written once per session) and llama.cpp as the oracle."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable is
# read when a kernel is defined, so it must be set before anything imports gpu_ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest

from hetero.synth.llama_cpp import available as llama_cpp_available
from hetero.synth.llama_cpp import quiet_stderr
from hetero.synth.writer import write_synthetic

# Where the GPU side runs in these tests: CUDA where there is one (the GPU check kit's machine),
# else the CPU standing in for it (CI).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Quantized test files come from llama.cpp's own quantizer where it is installed (the parity tests
# compare with llama.cpp on files it made itself); elsewhere (the GPU machine) from hetero's.
QUANTIZER = "llama.cpp" if llama_cpp_available() else "hetero"

# Routing mechanisms of DeepSeek-V3 on the tiny shapes.
V3_MECHANISMS = dict(
    gating="sigmoid", selection_bias=True, norm_topk=True, routed_scale=2.5, q_lora_rank=256,
    yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=1.0,
)  # fmt: skip


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """synth(preset, quant, **overrides) -> path of a synthetic model, cached for the session."""
    root = tmp_path_factory.mktemp("models")
    made = {}

    def make(preset="tiny", quant="F32", splits=1, quantizer=QUANTIZER, **overrides):
        key = (preset, quant, splits, quantizer, tuple(sorted(overrides.items())))
        if key not in made:
            name = f"m{len(made)}-{preset}-{quant}.gguf"
            made[key] = write_synthetic(root / name, preset, quant, splits=splits, quantizer=quantizer, **overrides)[0]
        return made[key]

    return make


def random_prompt(n_tokens: int, bos_id: int, vocab_limit: int = 600) -> list[int]:
    """Fresh random token ids every run, starting with BOS like a real prompt."""
    rng = np.random.default_rng()
    return [bos_id, *rng.integers(0, vocab_limit, n_tokens - 1).tolist()]


def logits_in_chunks(model, ids: list[int], rng, shortest: int = 1) -> np.ndarray:
    """model's logits for every position of ids, prefilled in chunks of random lengths from
    `shortest` to 9 tokens (the last one too), on a fresh cache."""
    cuts = np.cumsum(rng.integers(shortest, 10, len(ids)))
    cuts = [0, *cuts[cuts <= len(ids) - shortest].tolist(), len(ids)]
    cache = model.new_cache()
    return np.concatenate([model.forward(ids[a:b], cache).cpu().numpy() for a, b in zip(cuts, cuts[1:], strict=False)])


def oracle():
    """llama-cpp-python, the reference. A missing one fails the test, except where the run says
    it cannot have one (HETERO_WITHOUT_ORACLE=1: the GPU check kit's machine, which has no
    compiler and no network); there the comparisons are skipped and say why."""
    if os.environ.get("HETERO_WITHOUT_ORACLE"):
        pytest.skip("no llama.cpp on this machine (HETERO_WITHOUT_ORACLE)")
    import llama_cpp

    return llama_cpp


def llama_logits(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position, float32 KV cache, no flash attention."""
    return llama_logits_each(path, [ids])[0]


def llama_logits_each(path, prompts: list[list[int]]) -> list[np.ndarray]:
    """llama_logits of each prompt on a fresh cache, the file loaded once."""
    if not prompts:
        return []
    llama_cpp = oracle()
    outs = []
    with quiet_stderr():
        f32 = llama_cpp.GGML_TYPE_F32
        llm = llama_cpp.Llama(
            str(path), n_ctx=max(64, *map(len, prompts)), logits_all=True, n_threads=2, verbose=False,
            type_k=f32, type_v=f32, flash_attn=False,
        )  # fmt: skip
        for ids in prompts:
            llm.reset()  # the next eval drops every cached position
            llm.eval(ids)
            outs.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return outs


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="session")
def r1_header(tmp_path_factory):
    """A DeepSeek-R1-shaped Q4_K_M split set (9 files) whose data region is a sparse hole."""
    from hetero.synth.header_only import write_header_only

    return write_header_only(tmp_path_factory.mktemp("r1") / "DeepSeek-R1-Q4_K_M.gguf", splits=9)


@pytest.fixture(scope="session")
def v2_lite_header(tmp_path_factory):
    """DeepSeek-V2-Lite's 27 layers at their published shapes, header only."""
    from hetero.synth.header_only import write_header_only
    from hetero.synth.presets import make_preset

    return write_header_only(tmp_path_factory.mktemp("v2lite") / "V2-Lite-Q4_K_M.gguf", make_preset("v2-lite"))[0]
