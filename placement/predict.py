"""Tokens per second to expect from a placement: a roofline over bytes (decode) and FLOPs (prefill)."""

from dataclasses import dataclass

from gpu_ops.staging import DEQUANTIZE_CHUNK_VALUES
from placement.backends import CPU_ENGINE_EFFICIENCY, GPU_TRITON_EFFICIENCY, gpu_read_seconds, read_rate
from placement.cost import TensorCost
from placement.hardware import Hardware

FLOPS_EFFICIENCY = 0.5  # share of peak FLOP/s reached by prefill matmuls, both sides
ROAD_FP32_SHARE = 1 / 15  # float32 FLOP/s against the table's tensor-core figure (H100: 67 of 989; consumer cards 1/2)
DEQUANTIZE_TRAFFIC = 64  # device bytes per value the reference dequantizers move (26-37 allocated for K-quants)
LAUNCH_S = 5e-6  # host time to launch one device op
DEQUANTIZE_LAUNCHES = 16  # ops per reference dequantization call (K-quants; legacy types fewer)
EXPERT_LAUNCHES = 8  # ops per used expert besides dequantizing: gathers, three products, weighting, the add
SYNC_S = 50e-6  # per layer that hands work between GPU and CPU: copy, event, wake-up
PREFILL_TOKENS = 512
FFN_KINDS = ("routed experts", "shared experts", "dense FFN", "router")
ASSUMPTIONS = (
    "decode reads every weight once per token at its backend's speed: cpu-engine "
    f"{CPU_ENGINE_EFFICIENCY:.0%} of CPU bandwidth, gpu-triton {GPU_TRITON_EFFICIENCY:.0%} of GPU bandwidth, "
    "float16 through torch a fifth of that (widened per call), reference far less (placement/backends.py)",
    "routed experts read A/E of their bytes per token",
    "attention reads the whole latent KV cache (a full context) each token",
    "per layer: attention, then shared experts on the GPU overlapped with routed experts on the CPU,"
    f" plus {SYNC_S * 1e6:.0f} µs of hand-off where both sides work",
    f"prefill of {PREFILL_TOKENS} tokens: the slower of FLOPs at {FLOPS_EFFICIENCY:.0%} of peak (the CPU "
    "engine's at its measured multiply-adds) and bytes read",
    "a prompt chunk's CPU experts streamed to the GPU copy every layer's whole stacks at the staging bandwidth,"
    f" dequantize on the device ({DEQUANTIZE_TRAFFIC} bytes of device traffic per value) and multiply in"
    f" float32 ({ROAD_FP32_SHARE:.3g} of the tensor-core FLOP/s), overlapped",
)


@dataclass(frozen=True)
class Prediction:
    decode_tok_s: float
    prefill_tok_s: float
    bound: str  # "gpu" | "cpu": the side that is busy longer per decode step
    decode_gpu_ms: float  # busy time per token on each side
    decode_cpu_ms: float
    assumptions: tuple[str, ...] = ASSUMPTIONS
    disk_bytes_per_token: float = 0.0  # page-cache misses when the CPU's weights exceed RAM
    prefill_crossover_tokens: int = 0  # chunks of this many tokens or more stream CPU experts to the GPU (0: never)
    prefill_cpu_road_tok_s: float = 0.0  # prefill of PREFILL_TOKENS with the CPU experts on the CPU
    prefill_gpu_road_tok_s: float = 0.0  # ... streamed to the GPU (0: no such road)


def evicted_shares(costs: list[TensorCost], devices: dict[str, str], overflow: int) -> dict[str, float]:
    """When the CPU's weights exceed RAM by `overflow` bytes, the share of each CPU tensor that
    lives on disk rather than in the page cache: the least-read bytes first (routed experts,
    read A/E per token), as the kernel's LRU keeps the pages touched every token."""
    shares = {}
    for c in sorted((c for c in costs if devices[c.name] == "cpu"), key=lambda c: (c.read_fraction_decode, c.name)):
        if overflow <= 0:
            break
        shares[c.name] = min(1.0, overflow / c.gguf_bytes)
        overflow -= c.gguf_bytes
    return shares


def predict(
    costs: list[TensorCost],
    devices: dict[str, str],
    backends: dict[str, str],
    hw: Hardware,
    kv_bytes: int,
    kv_device: str,
    overflow: int = 0,
    longest_chunk: int = 0,
    experts: tuple[int, int] = (0, 0),
):
    """costs of every tensor, devices[name] in {"gpu", "cpu"}, backends[name] (placement.backends),
    the KV cache size and where it lives; overflow: bytes of the CPU's share beyond RAM, read
    from disk as they are used; longest_chunk: the most tokens a prompt pass takes at once
    (a crossover beyond it is never reached; 0: the GPU road is never taken, though its speed
    is still predicted); experts: (E, A), routed experts
    per layer and per token, for the GPU road's per-expert costs."""
    gpu_bw = hw.gpu_bw * GPU_TRITON_EFFICIENCY
    cpu_bw = hw.cpu_bw * CPU_ENGINE_EFFICIENCY
    on_disk = evicted_shares(costs, devices, overflow)
    disk_per_token = 0.0
    terms: list[_PrefillTerm] = []
    layers: dict[int, dict[str, float]] = {}
    for c in costs:
        on_gpu = devices[c.name] == "gpu"
        part = "ffn" if c.kind in FFN_KINDS else "rest"
        # Seconds to read every weight once, for a decode step and for a prefill (bytes: the CPU
        # side's, for the disk share; on_disk holds CPU tensors only). A tensor the CPU engine
        # decodes through derived stacks reads those, and a prompt the file's own blocks.
        if on_gpu:
            decode_s = prefill_s = gpu_read_seconds(c, backends[c.name], hw)
            decode_bytes = prefill_bytes = 0
        else:
            rate = read_rate(c, "cpu", backends[c.name], hw)
            prefill_bytes = c.gguf_bytes
            decode_bytes = c.derived_bytes if c.derived and backends[c.name] == "cpu-engine" else prefill_bytes
            decode_s, prefill_s = decode_bytes / rate, prefill_bytes / rate
        evicted = on_disk.get(c.name, 0.0)
        missed = decode_bytes * c.read_fraction_decode * evicted
        disk_per_token += missed
        slot = layers.setdefault(c.layer, {})
        key = f"{'gpu' if on_gpu else 'cpu'}_{part}"
        slot[key] = slot.get(key, 0.0) + decode_s * c.read_fraction_decode + missed / hw.disk_bw
        if on_gpu:
            per_token = c.flops_per_token / (hw.gpu_flops * FLOPS_EFFICIENCY)
        elif backends[c.name] == "cpu-engine" and hw.cpu_macs:
            per_token = c.flops_per_token / 2 / hw.cpu_macs  # the engine's measured multiply-adds
        else:
            per_token = c.flops_per_token / (hw.cpu_flops * FLOPS_EFFICIENCY)
        streamed = not on_gpu and c.kind == "routed experts" and hw.pcie_bw > 0 and hw.gpu_mem > 0
        terms.append(_PrefillTerm(c.layer, on_gpu, per_token, prefill_s, c.read_fraction_decode,
                                  prefill_bytes * evicted / hw.disk_bw, streamed, c))  # fmt: skip
    kv_per_layer = kv_bytes / max(1, len([k for k in layers if k >= 0]))
    decode = gpu_busy = cpu_busy = 0.0
    for layer, s in layers.items():
        if layer >= 0:
            s[f"{kv_device}_rest"] = s.get(f"{kv_device}_rest", 0.0) + kv_per_layer / (
                gpu_bw if kv_device == "gpu" else cpu_bw
            )
        g_rest, g_ffn = s.get("gpu_rest", 0.0), s.get("gpu_ffn", 0.0)
        c_rest, c_ffn = s.get("cpu_rest", 0.0), s.get("cpu_ffn", 0.0)
        mixed = (g_rest + g_ffn) > 0 and (c_rest + c_ffn) > 0
        decode += g_rest + c_rest + max(g_ffn, c_ffn) + (SYNC_S if mixed else 0.0)
        gpu_busy += g_rest + g_ffn
        cpu_busy += c_rest + c_ffn
    disk = (
        (f"{overflow / 2**30:.1f} GiB of the CPU's weights do not fit in RAM: read from disk at "
         f"{hw.disk_bw / 1e9:.1f} GB/s as they are used, least-read bytes first (the page cache keeps the rest)",)
        if overflow > 0 else ()
    )  # fmt: skip
    cpu_road = prefill_seconds(terms, PREFILL_TOKENS, hw, experts, stream=False)
    road = any(t.streamed for t in terms)
    gpu_road = prefill_seconds(terms, PREFILL_TOKENS, hw, experts, stream=True) if road else 0.0
    crossing = crossover(terms, hw, experts, longest_chunk) if road and longest_chunk else 0
    prefill = gpu_road if 0 < crossing <= PREFILL_TOKENS else cpu_road  # the road a chunk of that size takes
    return Prediction(
        decode_tok_s=1.0 / decode if decode else 0.0,
        prefill_tok_s=PREFILL_TOKENS / prefill if prefill else 0.0,
        bound="cpu" if cpu_busy >= gpu_busy else "gpu",
        decode_gpu_ms=gpu_busy * 1e3,
        decode_cpu_ms=cpu_busy * 1e3,
        assumptions=ASSUMPTIONS + disk,
        disk_bytes_per_token=disk_per_token,
        prefill_crossover_tokens=crossing,
        prefill_cpu_road_tok_s=PREFILL_TOKENS / cpu_road if cpu_road else 0.0,
        prefill_gpu_road_tok_s=PREFILL_TOKENS / gpu_road if gpu_road else 0.0,
    )


@dataclass(frozen=True)
class _PrefillTerm:
    """One tensor's share of a prefill chunk: seconds per token of FLOPs, seconds to read all
    its bytes (of which a chunk of T tokens reads min(1, read_fraction * T)), seconds of disk
    reads for all its bytes, and whether its experts may be streamed to the GPU."""

    layer: int
    on_gpu: bool
    flops_s: float
    read_s: float
    read_fraction: float
    disk_s: float
    streamed: bool
    cost: TensorCost


def prefill_seconds(terms: list[_PrefillTerm], tokens: int, hw: Hardware, experts: tuple[int, int],
                    stream: bool) -> float:  # fmt: skip
    """A chunk of `tokens` through every layer: per layer the slower of the GPU's and the CPU's
    work (their hand-off between), the CPU's routed experts on the GPU when `stream`: their
    copy at the staging bandwidth plus the host's launches (one thread does both), against the
    device's dequantizing and multiplying, and a host sync per layer (the experts' token counts)."""
    n_expert, n_used = experts
    used = n_expert * (1 - (1 - n_used / n_expert) ** tokens) if n_expert else 0.0  # experts a chunk touches
    sides: dict[int, list[float]] = {}
    for t in terms:
        share = min(1.0, t.read_fraction * tokens)
        side = sides.setdefault(t.layer, [0.0, 0.0])
        if stream and t.streamed:
            per_expert = t.cost.n_values // max(1, n_expert)  # values of one expert's matrix
            calls = -(-per_expert // DEQUANTIZE_CHUNK_VALUES)
            host = (
                t.cost.gguf_bytes / hw.pcie_bw + used * (calls * DEQUANTIZE_LAUNCHES + EXPERT_LAUNCHES / 3) * LAUNCH_S
            )
            fp32 = hw.gpu_flops * (1.0 if hw.gpu_is_stand_in else ROAD_FP32_SHARE)  # the stand-in's are float32
            multiply = t.cost.flops_per_token * tokens / (fp32 * FLOPS_EFFICIENCY)
            dequantized = t.cost.n_values * (used / n_expert if n_expert else 1.0)  # the used experts only
            device = dequantized * DEQUANTIZE_TRAFFIC / hw.gpu_bw + multiply
            side[0] += max(host, device) + SYNC_S / 3 + t.disk_s  # every page of the stacks, every pass
        else:
            side[0 if t.on_gpu else 1] += max(t.flops_s * tokens, t.read_s * share) + t.disk_s * share
    return sum(max(g, c) + (SYNC_S if g > 0 and c > 0 else 0.0) for g, c in sides.values())


def crossover(terms: list[_PrefillTerm], hw: Hardware, experts: tuple[int, int], longest: int) -> int:
    """The smallest chunk (tokens) whose prefill is faster with the CPU's experts streamed to
    the GPU, or 0 if no chunk up to `longest` is. Per token, the GPU road's copy shrinks as
    1/T while the CPU's compute does not, so there is one crossing: found by bisection."""

    def faster(tokens: int) -> bool:
        return prefill_seconds(terms, tokens, hw, experts, True) < prefill_seconds(terms, tokens, hw, experts, False)

    if longest < 2 or not faster(longest):
        return 0
    low, high = 1, longest  # faster(high); a one-token pass never streams (net.py)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if faster(mid) else (mid, high)
    return high
