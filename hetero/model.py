"""The public model object: load a GGUF, get logits, tokenize, generate."""

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cpu_ops.executor import Executor
from cpu_ops.simd import HAVE_AVX2
from gpu_ops.matmul import report_placed_bytes
from hetero.generate import Step, generate_steps
from hetero.kv_cache import KVCache
from hetero.loader import OpBuilder
from hetero.models.hybrid import HybridDecode
from hetero.models.native import NativeDecode, native_decode
from hetero.models.net import Net
from hetero.ops import ExpertBank, planned_name
from hetero.sampling import SamplingParams
from hetero.tokenizer import Tokenizer
from modelfile.blocks import Description
from modelfile.errors import HeteroError
from modelfile.families import family_of, validate_tensors
from modelfile.gguf_file import GGUFModelFile
from placement.hardware import Hardware, detect, with_overrides
from placement.planner import Plan, plan_model
from placement.rules import Rule


class Model:
    """A loaded model of any family in modelfile.families. Weights stay memory-mapped and
    quantized, placed as `plan` says."""

    def __init__(
        self,
        file: GGUFModelFile,
        plan: Plan,
        gpu_device: str | None = None,
        threads: int | None = None,
        numa: str = "auto",
        cpu_kernels: bool = True,
        description: Description | None = None,
        match_llama_cpp: bool = False,
    ):
        """description: the model as blocks; by default the family's for this file (tests pass
        altered ones to see every executor follow); match_llama_cpp: see load_model."""
        self.file = file
        family = family_of(file.metadata)
        self.config = family.config(file.metadata)
        self.tied_output = validate_tensors(family, self.config, {n: t.shape for n, t in file.tensors.items()})
        if family.describe is None:
            raise HeteroError(f"hetero plans {family.architecture} files but cannot run them yet")
        self.plan = plan
        self.n_ctx = plan.ctx
        # "gpu" in a plan is CUDA when present; otherwise the CPU stands in (same code path).
        gpu = torch.device(gpu_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = gpu if plan.weights_bytes("gpu") else torch.device("cpu")
        engine = any(p.backend == "cpu-engine" for p in plan.placements)
        self.executor = Executor(threads, numa) if cpu_kernels and HAVE_AVX2 and engine else None
        if threads and self.executor is None:
            torch.set_num_threads(threads)
        ops = OpBuilder(file.tensors, plan, gpu, self.device, self.executor)
        description = description or family.describe(self.config, file.tensors)
        cache_width = family.cached_values_per_token(self.config)
        self.net = Net(self.config, description, ops, cache_width, getattr(torch, plan.kv_cache_dtype))
        self.net.attention_form = "llama.cpp" if match_llama_cpp else "auto"
        self.net.stream_experts(plan.prediction.prefill_crossover_tokens, gpu)
        self.net.decode_step = native_decode(self.net, self.executor)
        if self.net.decode_step is None and plan.weights_bytes("gpu"):
            self.net.decode_step = HybridDecode(self.net)
        self._check_built_as_planned()
        self.tokenizer = Tokenizer(file.paths[0], file.metadata)

    def backends(self) -> dict[str, str]:
        """What each weight was built to run on (placement.backends' names), read from the ops."""
        built = {}
        for op in self.net.matrix_ops():
            if isinstance(op, ExpertBank):
                built.update(op.backends)
            elif planned_name(op.name) is not None:
                built.setdefault(planned_name(op.name), op.backend)  # kv_b itself first, where it is kept
        return built

    @property
    def executor_name(self) -> str:
        step = self.net.decode_step
        return "native" if isinstance(step, NativeDecode) else "hybrid" if isinstance(step, HybridDecode) else "eager"

    def _check_built_as_planned(self) -> None:
        """The Plan is what runs: a weight built for another backend than the plan names (a plan
        made on another machine, or with other options) is an error, not a silent change of speed."""
        built = self.backends()
        used = self.net.description.tensor_names()  # a test's altered description may leave some out
        wrong = [
            f"{p.name} ({p.backend} in the plan, {built.get(p.name, 'nothing')} here)"
            for p in self.plan.placements
            if p.backend not in ("vector", "lookup") and built.get(p.name) != p.backend and p.name in used
        ]
        if self.executor_name != self.plan.executor:
            wrong.insert(0, f"the decode step ({self.plan.executor} in the plan, {self.executor_name} here)")
        if wrong:
            more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
            raise HeteroError(
                "this machine cannot run the plan as made: " + "; ".join(wrong[:3]) + more + "; make the plan here"
            )

    # -- numbers -------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """A two-token prefill and one decoded token on a scratch cache: compiles (or loads from
        the disk cache) each CPU kernel this model uses, the prefill path's and the native
        decode step's, so neither the first prompt nor the first token is slowed by it."""
        cache = self.new_cache(3)
        self.forward([0, 0], cache)
        self.forward([0], cache)

    def new_cache(self, max_tokens: int | None = None) -> KVCache:
        return self.net.new_cache(max_tokens or self.n_ctx)

    def forward(self, token_ids, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Append tokens to the cache; returns their logits [T, vocab] float32 (or the last row)."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("no tokens to process")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.n_vocab:
            raise ValueError(f"token id outside the vocabulary of {self.config.n_vocab}")
        return self.net.forward(ids, cache, last_only)

    def broken_output_error(self, token_ids) -> HeteroError:
        """Why a logits row came out non-finite (or flat): the tokens run again through the
        multi-token path with a check after every layer, naming the first layer at fault."""
        bad = []

        def watch(layer: int, x: torch.Tensor) -> None:
            if not bad and not bool(torch.isfinite(x).all()):
                bad.append(layer)

        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        logits = self.net.forward(ids, self.new_cache(len(ids)), last_only=True, watch=watch)
        if bad:
            where = f"from layer {bad[0]} on"
        elif not bool(torch.isfinite(logits).all()):
            where = "in the output head"
        else:
            where = "somewhere the diagnosis pass did not see (all its layers were finite)"
        return HeteroError(f"the model's output is not finite numbers ({where}): the file's weights or scales "
                           "are probably damaged (NaN or inf)")  # fmt: skip

    def logits(self, token_ids) -> np.ndarray:
        """Logits float32 [len(token_ids), vocab] from one prefill of a fresh cache."""
        ids = list(token_ids)
        return self.forward(ids, self.new_cache(max(len(ids), 1))).cpu().numpy()

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos)

    def detokenize(self, ids) -> str:
        return self.tokenizer.detokenize(list(ids))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the file's chat template."""
        return self.tokenizer.chat_ids(messages)

    def generate_steps(self, prompt: str | list[int] | list[dict], max_tokens: int = 256, stop=(), **sampling):
        """Like generate, yielding Step records (token, text, timings) for UIs and benchmarks."""
        self.file.check_unchanged()
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        elif prompt and isinstance(prompt[0], dict):
            ids = self.chat_prompt(prompt)
        else:
            ids = list(prompt)
        return generate_steps(self, ids, max_tokens, SamplingParams(**sampling), tuple(stop))

    def generate(self, prompt, max_tokens: int = 256, stop=(), **sampling) -> Iterator[str]:
        """Stream text pieces. prompt: text, token ids, or chat messages [{role, content}, ...].

        sampling: temperature (0 = greedy), top_k, top_p, min_p, seed.
        """
        for step in self.generate_steps(prompt, max_tokens, stop, **sampling):
            if step.text:
                yield step.text


def default_plan(
    file: GGUFModelFile,
    n_ctx: int | None = None,
    gpu_mem=None,
    rules: list[Rule] = (),
    overcommit: bool = True,
    numa: str = "auto",
    cpu_kernels: bool = True,
    gpu_device: str | None = None,
    cache_slots: int = 1,
) -> Plan:
    """The plan load_model makes when given none: this machine (its cached CPU bandwidth), the
    budget; without CUDA a GPU budget is played by the CPU, and predicted as such. numa='off'
    and cpu_kernels=False are run options the plan must know: they change what runs."""
    hw = run_hardware(gpu_mem, numa, cpu_kernels, gpu_device)
    return plan_model(file, hw, n_ctx, rules, overcommit=overcommit, cache_slots=cache_slots)


def run_hardware(gpu_mem=None, numa: str = "auto", cpu_kernels: bool = True, gpu_device: str | None = None) -> Hardware:
    """This machine as a run will use it: the GPU budget (played by the CPU without CUDA, or when
    gpu_device names a non-CUDA device), one NUMA node when numa='off', no CPU engine when
    cpu_kernels=False."""
    hw = detect()
    if gpu_device is not None and torch.device(gpu_device).type != "cuda" and hw.gpu_name != "none":
        budget = hw.gpu_mem if gpu_mem is None else gpu_mem
        hw, gpu_mem = replace(hw, gpu_name="none", gpu_mem=0, gpu_bw=0.0, gpu_flops=0.0), budget
    hw = with_overrides(hw, gpu_mem=gpu_mem, stand_in=True)
    if numa == "off":
        hw = replace(hw, numa_nodes=1)
    return hw if cpu_kernels and HAVE_AVX2 else replace(hw, cpu_engine=False)


def check_runnable(plan: Plan, overcommit: bool = True) -> None:
    """Refuse, in one line, a plan that does not fit (or reads from disk when told not to)."""
    if not overcommit and plan.prediction.disk_bytes_per_token:
        raise HeteroError("the plan's CPU share exceeds RAM (overcommit=False): " + "; ".join(plan.warnings))
    if not plan.fits:
        raise HeteroError("the plan does not fit: " + "; ".join(plan.problems) + f" ({plan.suggestion})")


def load_model(
    path: str | Path | GGUFModelFile,
    n_ctx: int | None = None,
    gpu_mem: str | int | None = None,
    rules: list[Rule] = (),
    plan: Plan | None = None,
    gpu_device: str | None = None,
    threads: int | None = None,
    numa: str = "auto",
    cpu_kernels: bool = True,
    overcommit: bool = True,
    on_gpu_bytes: Callable[[int], None] | None = None,
    match_llama_cpp: bool = False,
) -> Model:
    """Open a deepseek2 GGUF (single file, or any file of a split set, or an opened one) for inference.

    n_ctx: maximum tokens per sequence (default 4096); gpu_mem: GPU budget ("24GiB"; default:
    the detected GPU, none without CUDA); rules: placement overrides; plan: a ready Plan
    (e.g. from `hetero plan --json`), which then decides everything; gpu_device: the torch
    device that plays the plan's "gpu" (default cuda, else the CPU as a stand-in); threads,
    numa ('auto' or 'off'): the CPU engine's workers; cpu_kernels=False runs CPU weights through
    the reference torch ops instead (also what machines without AVX2 get); overcommit=False
    refuses a plan whose CPU share exceeds RAM instead of running it from the page cache;
    on_gpu_bytes(n) hears of every n bytes of weights put on the GPU (a progress bar);
    match_llama_cpp=True runs prompts' attention where llama.cpp's CPU backend rounds its
    activations to int8 (MLA absorbed; expanded through int8 latents for a joint kv_b kept on
    the CPU; absorbed on the GPU, which holds only its derived stacks), not
    in the form with fewer multiply-adds: slower for long prompts, and on the CPU engine the
    logits then differ from llama.cpp's by float32 summation order only (docs/parity.md).
    """
    file = path if isinstance(path, GGUFModelFile) else GGUFModelFile(path)
    if plan is None:
        plan = default_plan(file, n_ctx, gpu_mem, rules, overcommit, numa, cpu_kernels, gpu_device)
    elif {p.name for p in plan.placements} | set(plan.ignored) != set(file.tensors):
        raise HeteroError("the plan was made for a different model (tensor names differ)")
    check_runnable(plan, overcommit)
    with report_placed_bytes(on_gpu_bytes) if on_gpu_bytes else nullcontext():
        return Model(file, plan, gpu_device, threads, numa, cpu_kernels, match_llama_cpp=match_llama_cpp)


__all__ = ["Model", "Step", "load_model"]
