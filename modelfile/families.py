"""The model families hetero reads, by GGUF `general.architecture`: what the header-level code
(the planner, `info`, validation) needs to know of one, in one entry.

An entry holds the family's config parser and tensor inventory, the planner's cost hooks (the
values one layer caches per token, attention FLOPs per token over a context, the activations a
prefill token holds on the GPU, how a prompt is chunked and what a chunk holds in RAM, which
tensors run together as one expert op, and which are only dequantized), and its description:
the model as a list of blocks (modelfile/blocks.py), from which the runtime derives the eager
forward, the hybrid step and the native step, and whose cache is `cached_values_per_token`
wide; and its synthetic-model recipe (`synth`).
Nothing outside an entry names a family's tensors, except llama.cpp's own cross-architecture
rule tables (tensor kinds for `info`, the quantization type mixes), which name what llama.cpp
names.
"""

from collections.abc import Callable
from dataclasses import dataclass

from modelfile import deepseek2_synth as ds2_synth
from modelfile import deepseek2_tensors as ds2
from modelfile.blocks import Description
from modelfile.config import ModelConfig
from modelfile.config import config_from_metadata as deepseek2_config
from modelfile.errors import HeteroError


@dataclass(frozen=True)
class Synth:
    """How `hetero synth` and the tests make files of a family: its presets (dataclasses of the
    family's own fields; overrides replace fields), which are header-only, and per preset the
    config, tensor shapes (file order) and GGUF keys; per tensor, plausible random values."""

    presets: dict[str, object]
    header_only: set[str]
    config: Callable[[object], object]  # preset -> config
    shapes: Callable[[object], dict]  # preset -> name -> shape
    metadata: Callable[[object, str], dict]  # (preset, model name) -> GGUF keys (not the tokenizer's)
    tensor: Callable[[object, str, tuple, int], object]  # (config, name, shape, seed) -> float32 ndarray


@dataclass(frozen=True)
class Family:
    architecture: str  # general.architecture
    config_type: type
    config: Callable[[dict], object]  # metadata -> config (checked)
    expected_tensors: Callable[[object, bool], dict]  # (config, tied output) -> name -> shape
    optional_tensors: Callable[[object], dict]
    cached_values_per_token: Callable[[object], int]  # one layer's KV cache
    attention_flops: Callable[[object, int], float]  # per token and layer over a ctx-long cache
    prefill_values_per_token: Callable[[object], int]  # activations a prefill token holds at once
    prefill_chunk: Callable[[object, int], int]  # (config, positions) -> tokens per prefill pass
    # (config, positions, blocks on the GPU) -> host RAM a prefill pass ending there holds at its peak
    prefill_host_bytes: Callable[[object, int, bool, int], int]  # (config, positions, on_gpu, token workers)
    expert_trios: Callable[[object], list[tuple[str, str, str]]]  # names -> (gate, up, down) per layer
    shared_trio: Callable[[str], tuple[str, str, str]]  # a routed gate's name -> the layer's shared experts
    # (config, name, type) -> (type, shape) of the stacks the loader derives from it and runs instead
    derived_at_load: Callable[[object, str, object], tuple]
    native_step: Callable[[object], bool]  # whether the native CPU decode step runs this config
    # (config, tensor names) -> the model as blocks; None: planned and summarized, not yet run
    describe: Callable[[object, object], Description] | None = None
    synth: Synth | None = None  # None: no synthetic files of this family


DEEPSEEK2 = Family(
    architecture="deepseek2",
    config_type=ModelConfig,
    config=deepseek2_config,
    expected_tensors=ds2.expected_tensors,
    optional_tensors=ds2.optional_tensors,
    cached_values_per_token=ds2.cached_values_per_token,
    attention_flops=ds2.attention_flops,
    prefill_values_per_token=ds2.prefill_values_per_token,
    prefill_chunk=ds2.prefill_chunk,
    prefill_host_bytes=ds2.prefill_host_bytes,
    expert_trios=ds2.expert_trios,
    shared_trio=ds2.shared_trio,
    derived_at_load=ds2.derived_at_load,
    native_step=lambda cfg: True,  # split k_b / v_b heads: the file's, or derived from a joint kv_b
    describe=ds2.describe,
    synth=Synth(
        presets=ds2_synth.PRESETS,
        header_only=ds2_synth.HEADER_ONLY,
        config=ds2_synth.preset_config,
        shapes=ds2_synth.tensor_shapes,
        metadata=ds2_synth.metadata,
        tensor=ds2_synth.random_tensor,
    ),
)
FAMILIES = {f.architecture: f for f in (DEEPSEEK2,)}


def family_of(metadata: dict) -> Family:
    arch = metadata.get("general.architecture")
    if arch not in FAMILIES:
        raise HeteroError(f"unsupported architecture {arch!r} (hetero runs: {', '.join(FAMILIES)})")
    return FAMILIES[arch]


def family_of_config(cfg) -> Family:
    """The family a parsed config belongs to."""
    for family in FAMILIES.values():
        if isinstance(cfg, family.config_type):
            return family
    raise TypeError(f"no model family parses into {type(cfg).__name__}")


def validate_tensors(family: Family, cfg, present: dict[str, tuple[int, ...]]) -> bool:
    """Check a file's names and shapes against the family's inventory; returns whether the
    output head is tied to the embedding (no output.weight)."""
    tied = "output.weight" not in present
    for name, shape in family.expected_tensors(cfg, tied).items():
        if name not in present:
            raise HeteroError(f"missing tensor {name} (expected shape {shape})")
        if tuple(present[name]) != shape:
            raise HeteroError(f"tensor {name} has shape {tuple(present[name])}, config implies {shape}")
    for name, shape in family.optional_tensors(cfg).items():
        if name in present and tuple(present[name]) != shape:
            raise HeteroError(f"tensor {name} has shape {tuple(present[name])}, config implies {shape}")
    return tied
