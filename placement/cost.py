"""Cost model per tensor: bytes (in the file and on each device), FLOPs per token, intensity.

Intensity = FLOPs per byte of weight read. A dense weight at batch B does 2 FLOPs per parameter
per token and is read once per step, so its intensity grows with B. A routed expert stack is
touched only by the tokens routed to it: per token it does 2 * params * A/E FLOPs, and a batch
of B tokens reads the fraction 1 - (1 - A/E)^B of it, so at decode its intensity is the same as
a dense weight's but its bytes per FLOP is E/A times worse: it belongs where bytes are cheap.
"""

import math
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from gpu_ops.capabilities import gpu_bytes
from modelfile.config import ModelConfig
from modelfile.families import family_of_config
from modelfile.summary import tensor_kind

# The order in which kinds earn GPU memory (the planner's primary key).
GPU_PRIORITY = (
    "attention",
    "norms",
    "router",
    "shared experts",
    "dense FFN",
    "output head",
    "embedding",
    "routed experts",
)


def gpu_format(qtype: T, shape: tuple[int, ...], gguf_bytes: int) -> tuple[str, int]:
    """(format, bytes on the GPU) of a tensor of this GGUF type and (numpy) shape: its GPU
    format where gpu_ops has one (gpu_ops.capabilities), else its GGUF type kept as it is (the
    reference path dequantizes it on every call)."""
    made = gpu_bytes(qtype, shape)
    return made if made is not None else (qtype.name, gguf_bytes)


@dataclass(frozen=True)
class TensorCost:
    name: str
    kind: str
    layer: int  # -1 outside the layer stack
    qtype: T
    n_values: int
    gguf_bytes: int
    gpu_format: str
    gpu_bytes: int
    flops_per_token: float  # average over tokens
    read_fraction_decode: float  # share of the bytes one decode step reads
    row: int = 0  # values per row (the matmul's K); 0 for a vector (norm, bias)
    derived: tuple = ()  # (type, shape) of the stacks the loader derives and decodes with (family.derived_at_load)

    @property
    def derived_bytes(self) -> int:
        """The derived stacks' size in their own (GGUF) types: what the CPU holds beside the file."""
        return sum(_gguf_bytes(q, shape) for q, shape in self.derived)

    def intensity(self, batch: int) -> float:
        """FLOPs per byte read for a step of `batch` tokens."""
        if self.kind == "routed experts":
            read = self.gguf_bytes * (1 - (1 - self.read_fraction_decode) ** batch)
        elif self.kind == "embedding":
            read = self.gguf_bytes * min(1.0, batch * self.read_fraction_decode)
        else:
            read = self.gguf_bytes
        return self.flops_per_token * batch / read if read else 0.0


def tensor_costs(cfg: ModelConfig, tensors: dict, ctx: int) -> list[TensorCost]:
    """Costs of every tensor; `tensors` maps name -> TensorInfo (only headers are used)."""
    used = cfg.n_expert_used / cfg.n_expert
    # Attention scores and the weighted sum over a `ctx`-token latent cache, absorbed form.
    family = family_of_config(cfg)
    attn_flops = family.attention_flops(cfg, ctx)
    per_layer_attn_values: dict[int, int] = {}
    for name, t in tensors.items():
        if tensor_kind(name) == "attention":
            layer = _layer(name)
            per_layer_attn_values[layer] = per_layer_attn_values.get(layer, 0) + t.n_values
    costs = []
    for name, t in tensors.items():
        kind, layer = tensor_kind(name), _layer(name)
        gguf_bytes = _gguf_bytes(t.qtype, t.shape)
        fmt, gpu_bytes = gpu_format(t.qtype, t.shape, gguf_bytes)
        derived = family.derived_at_load(cfg, name, t.qtype)
        if derived and fmt != t.qtype.name:  # on the GPU only the derived stacks are made
            made = [gpu_format(q, shape, _gguf_bytes(q, shape)) for q, shape in derived]
            fmt, gpu_bytes = "+".join(f for f, _ in made), sum(b for _, b in made)
        flops, fraction = 2.0 * t.n_values, 1.0
        if kind == "routed experts":
            flops, fraction = flops * used, used
        elif kind == "embedding":
            flops, fraction = 0.0, 1.0 / t.shape[0]
        elif kind in ("norms", "router"):
            flops = 2.0 * t.n_values
        if kind == "attention":  # share the per-layer score FLOPs by weight size
            flops += attn_flops * t.n_values / per_layer_attn_values[layer]
        row = t.shape[-1] if len(t.shape) >= 2 else 0
        costs.append(TensorCost(name, kind, layer, t.qtype, t.n_values, gguf_bytes, fmt, gpu_bytes, flops, fraction,
                                row, derived))  # fmt: skip
    return costs


def _gguf_bytes(qtype: T, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def kv_cache_bytes(cfg: ModelConfig, ctx: int, bytes_per_value: int = 2) -> int:
    """The KV cache of ctx tokens over every layer (the family says what a layer caches)."""
    return cfg.n_layer * ctx * family_of_config(cfg).cached_values_per_token(cfg) * bytes_per_value


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1
