"""Tokens per second to expect from a placement: a roofline over bytes (decode) and FLOPs (prefill)."""

from dataclasses import dataclass

from placement.backends import CPU_ENGINE_EFFICIENCY, GPU_TRITON_EFFICIENCY, gpu_read_seconds, read_rate
from placement.cost import TensorCost
from placement.hardware import Hardware

FLOPS_EFFICIENCY = 0.5  # share of peak FLOP/s reached by prefill matmuls, both sides
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
    f"prefill of {PREFILL_TOKENS} tokens: the slower of FLOPs at {FLOPS_EFFICIENCY:.0%} of peak and bytes read",
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
):
    """costs of every tensor, devices[name] in {"gpu", "cpu"}, backends[name] (placement.backends),
    the KV cache size and where it lives; overflow: bytes of the CPU's share beyond RAM, read
    from disk as they are used."""
    gpu_bw = hw.gpu_bw * GPU_TRITON_EFFICIENCY
    cpu_bw = hw.cpu_bw * CPU_ENGINE_EFFICIENCY
    on_disk = evicted_shares(costs, devices, overflow)
    disk_per_token = 0.0
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
        pre = f"pre_{'gpu' if on_gpu else 'cpu'}"
        flops = c.flops_per_token * PREFILL_TOKENS / ((hw.gpu_flops if on_gpu else hw.cpu_flops) * FLOPS_EFFICIENCY)
        share = min(1.0, c.read_fraction_decode * PREFILL_TOKENS)  # of the weights a prefill touches
        from_disk = prefill_bytes * share * evicted / hw.disk_bw
        slot[pre] = slot.get(pre, 0.0) + max(flops, prefill_s * share) + from_disk
    kv_per_layer = kv_bytes / max(1, len([k for k in layers if k >= 0]))
    decode = prefill = gpu_busy = cpu_busy = 0.0
    for layer, s in layers.items():
        if layer >= 0:
            s[f"{kv_device}_rest"] = s.get(f"{kv_device}_rest", 0.0) + kv_per_layer / (
                gpu_bw if kv_device == "gpu" else cpu_bw
            )
        g_rest, g_ffn = s.get("gpu_rest", 0.0), s.get("gpu_ffn", 0.0)
        c_rest, c_ffn = s.get("cpu_rest", 0.0), s.get("cpu_ffn", 0.0)
        mixed = (g_rest + g_ffn) > 0 and (c_rest + c_ffn) > 0
        decode += g_rest + c_rest + max(g_ffn, c_ffn) + (SYNC_S if mixed else 0.0)
        prefill += max(s.get("pre_gpu", 0.0), s.get("pre_cpu", 0.0)) + (SYNC_S if mixed else 0.0)
        gpu_busy += g_rest + g_ffn
        cpu_busy += c_rest + c_ffn
    disk = (
        (f"{overflow / 2**30:.1f} GiB of the CPU's weights do not fit in RAM: read from disk at "
         f"{hw.disk_bw / 1e9:.1f} GB/s as they are used, least-read bytes first (the page cache keeps the rest)",)
        if overflow > 0 else ()
    )  # fmt: skip
    return Prediction(
        decode_tok_s=1.0 / decode if decode else 0.0,
        prefill_tok_s=PREFILL_TOKENS / prefill if prefill else 0.0,
        bound="cpu" if cpu_busy >= gpu_busy else "gpu",
        decode_gpu_ms=gpu_busy * 1e3,
        decode_cpu_ms=cpu_busy * 1e3,
        assumptions=ASSUMPTIONS + disk,
        disk_bytes_per_token=disk_per_token,
    )
