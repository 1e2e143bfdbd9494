"""The planner: every tensor -> (device, format), within the GPU budget, from the header alone.

Order of play:
1. rules first (the user's word is final; a GPU rule that cannot fit is an error naming it);
2. reserve the latent KV cache for `ctx`, activation buffers, CUDA graphs and the CUDA context,
   and keep 15% of the budget unplanned (fragmentation, transient peaks);
3. the dense, every-token parts by priority (attention, norms, router, shared experts, dense
   FFN, output head, embedding), most FLOPs per byte first within a kind;
4. staging for streaming a prompt's CPU experts to the GPU (gpu_ops.staging), if it fits
   beside the dense part; kept only if the plan then has a crossover, a chunk size from which
   that road is faster (placement.predict), else the plan is made again without it;
5. spare VRAM goes to whole layers of routed experts, smallest first (KTransformers' static
   rules leave it idle), when at least 5% of the MoE layers fit: below that the CPU traffic
   saved is within the prediction's error and the VRAM is worth more as headroom;
6. everything else stays in CPU RAM, quantized as in the file. When that is more than the
   machine's RAM, the plan still runs (as llama.cpp does) with pages read from disk as they
   are used: a warning, and a prediction that counts those reads; overcommit=False refuses.
"""

import math
from dataclasses import dataclass, field, replace

from cpu_ops.capabilities import experts_run_on_engine
from gpu_ops.staging import staging_bytes
from modelfile.config import ModelConfig
from modelfile.errors import HeteroError
from modelfile.families import Family, family_of, family_of_config
from placement.backends import backend, expert_trio_backend
from placement.cost import GPU_PRIORITY, TensorCost, kv_cache_bytes, tensor_costs
from placement.hardware import GiB, Hardware
from placement.predict import PREFILL_TOKENS, Prediction, predict
from placement.rules import Rule, first_match

DEFAULT_CTX = 4096  # tokens, when the user names none (capped by the model's own context)
CUDA_CONTEXT = 512 * 2**20
CUDA_GRAPHS = 256 * 2**20
PREFILL_CHUNK = 4096  # tokens per prefill step; long prompts need big chunks to keep the GPU busy
HEADROOM = 0.15  # of the budget, never planned: allocator fragmentation and transient peaks
MIN_EXPERT_SHARE = 0.05  # move routed experts only if >= 5% of the MoE layers fit (a visible gain)
STAGING_DECODE_LOSS = 0.02  # decode speed a plan may give up to stream prompts' experts to the GPU


@dataclass(frozen=True)
class Placement:
    name: str
    kind: str
    layer: int
    device: str  # "gpu" | "cpu"
    format: str  # GPU: int4 | int8 | f16 | bf16 | f32, or the GGUF type (reference); CPU: the GGUF type
    backend: str  # the kernel family that runs it (placement.backends)
    bytes: int  # on that device
    decode_read_bytes: int  # of those, read per decode token (A/E of a routed expert stack)
    flops_per_token: float
    intensity_decode: float  # FLOPs per byte read at batch 1
    intensity_prefill: float  # ... at a prefill batch of PREFILL_TOKENS


@dataclass(frozen=True)
class Plan:
    model: str
    hardware: Hardware
    ctx: int
    placements: tuple[Placement, ...]
    kv_cache_bytes: int
    kv_cache_device: str
    reserved: tuple[tuple[str, int], ...]  # GPU memory set aside besides weights and KV cache
    fits: bool
    problems: tuple[str, ...]
    suggestion: str
    prediction: Prediction
    rules: tuple[str, ...] = field(default=())
    ignored: tuple[str, ...] = field(default=())  # tensors in the file that the model does not use
    warnings: tuple[str, ...] = field(default=())  # it runs, but not as well as it could
    executor: str = "eager"  # the decode step: native (one call on the CPU engine), hybrid, eager
    kv_cache_dtype: str = "float32"  # bfloat16 on the GPU, float32 on the CPU
    fused_shared_layers: tuple[int, ...] = ()  # shared experts run in the routed experts' CPU hand-off
    prefill_host_bytes: int = 0  # host RAM a prefill pass holds at its peak (a prompt filling ctx)
    cache_slots: int = 1  # conversations a server keeps cached: the KV cache, and host copies of the rest
    prompt_cache_bytes: int = 0  # host RAM of those copies: (cache_slots - 1) KV caches of ctx tokens

    def weights_bytes(self, device: str) -> int:
        return sum(p.bytes for p in self.placements if p.device == device)

    def decode_read_bytes(self, device: str) -> int:
        """Weight bytes one decode token reads on that device."""
        return sum(p.decode_read_bytes for p in self.placements if p.device == device)

    def used_bytes(self, device: str) -> int:
        used = self.weights_bytes(device)
        if device == self.kv_cache_device:
            used += self.kv_cache_bytes
        if device == "gpu" and self.hardware.gpu_mem:
            used += sum(b for _, b in self.reserved)
        if device == "cpu":
            used += self.prefill_host_bytes + self.prompt_cache_bytes
        return used


def make_plan(
    cfg: ModelConfig,
    tensors: dict,
    hw: Hardware,
    ctx: int,
    rules: list[Rule] = (),
    model: str = "",
    overcommit: bool = True,
    streaming: bool = True,
    cache_slots: int = 1,
) -> Plan:
    """Place every tensor of a model (name -> TensorInfo; only shapes and types are read).
    Tensors the architecture does not use (rope_freqs, anything unknown) are left in the file
    and listed as ignored. overcommit: a CPU share over RAM runs from the page cache (warned)
    rather than being refused. streaming=False plans no staging for a prompt's CPU experts
    (what a plan whose GPU road would never be taken is made again with). cache_slots: how
    many conversations a server keeps (hetero.server.worker): one in the KV cache, the others as
    host copies of their rows, budgeted in CPU RAM as KV caches of ctx tokens each."""
    if cache_slots < 1:
        raise HeteroError(f"--cache-slots {cache_slots}: must be at least 1")
    if ctx <= 0 or ctx > cfg.n_ctx_train:
        raise HeteroError(f"--ctx {ctx} must be between 1 and the model's {cfg.n_ctx_train}")
    tied = "output.weight" not in tensors
    family = family_of_config(cfg)
    used = set(family.expected_tensors(cfg, tied)) | set(family.optional_tensors(cfg))
    ignored = tuple(sorted(n for n in tensors if n not in used))
    every_tensor, tensors = tensors, {n: t for n, t in tensors.items() if n in used}
    costs = tensor_costs(cfg, tensors, ctx)
    by_name = {c.name: c for c in costs}
    has_gpu = hw.gpu_mem > 0
    kv_device = "gpu" if has_gpu else "cpu"
    kv_dtype = "bfloat16" if has_gpu and not hw.gpu_is_stand_in else "float32"  # the stand-in keeps float32
    kv = kv_cache_bytes(cfg, ctx, 2 if kv_dtype == "bfloat16" else 4)
    reserved = _reserved(family, cfg, has_gpu)
    free = hw.gpu_mem - kv - sum(b for _, b in reserved) - int(HEADROOM * hw.gpu_mem) if has_gpu else 0
    devices: dict[str, str] = {}

    # 1. rules
    for c in costs:
        rule = first_match(list(rules), c.name)
        if rule is None:
            continue
        if rule.device == "gpu" and not has_gpu:
            raise HeteroError(f"rule {rule.source!r} puts tensors on the GPU, but the plan has no GPU (--gpu-mem 0)")
        devices[c.name] = rule.device
        own = c.gpu_format.rsplit("+", 1)[-1]  # the tensor's own blocks (beside a derived float stack)
        if rule.format and rule.format != own:  # the loader converts nothing: say so now
            raise HeteroError(
                f"rule {rule.source!r} asks for {rule.format}, but {c.name} ({c.qtype.name}) goes to the GPU as "
                f"{own}; leave the format out or match it"
            )
    for trio in family.expert_trios(by_name):
        sides = {devices.get(n) for n in trio}
        if len(sides) > 1:  # gate, up and down run as one op, on one device
            raise HeteroError(
                f"the rules split {trio[0].rsplit('.', 2)[0]}'s routed experts between devices; gate, up and "
                "down run as one op: match all three (e.g. 'ffn_.*_exps')"
            )
    forced_gpu = sum(c.gpu_bytes for c in costs if devices.get(c.name) == "gpu")
    if forced_gpu > max(free, 0):
        culprits = {first_match(list(rules), c.name).source for c in costs if devices.get(c.name) == "gpu"}
        raise HeteroError(
            f"rule {' / '.join(sorted(culprits))!r} puts {_gib(forced_gpu)} on the GPU, "
            f"but only {_gib(max(free, 0))} is left after the KV cache and buffers"
        )
    free -= forced_gpu

    # 2-3. the dense part, by priority
    problems = []
    dense = [c for c in costs if c.name not in devices and c.kind != "routed experts"]
    dense.sort(key=lambda c: (GPU_PRIORITY.index(c.kind), -c.intensity(1), c.layer, c.name))
    left_out = 0
    for c in dense:
        if has_gpu and c.gpu_bytes <= free:
            devices[c.name], free = "gpu", free - c.gpu_bytes
        else:
            devices[c.name] = "cpu"
            left_out += c.gpu_bytes if has_gpu else 0
    buffers = sum(b for _, b in reserved)
    dense_need = forced_gpu + sum(c.gpu_bytes for c in dense) + kv + buffers
    if has_gpu and left_out:
        problems.append(
            f"GPU: the dense part needs {_gib(dense_need)} (weights {_gib(dense_need - kv - buffers)}"
            f", KV cache {_gib(kv)} for ctx {ctx}, buffers {_gib(buffers)}) plus "
            f"{HEADROOM:.0%} headroom, over the {_gib(hw.gpu_mem)} budget"
        )

    # 4. the staging that streams a prompt's CPU experts to the GPU, if it fits beside the dense
    # part (kept only where the plan then has a crossover: otherwise planned again without it)
    gpu_holds_weights = any(d == "gpu" for d in devices.values())  # not when the rules sent everything to the CPU
    stream = streaming and has_gpu and hw.pcie_bw and gpu_holds_weights and not problems
    staging = _staging(family, cfg, by_name, longest_chunk(family, cfg, ctx)) if stream else (0, 0)
    if staging[0] > free:
        staging = (0, 0)
    free -= staging[0]

    # 5. spare VRAM -> whole layers of routed experts (6: the rest stays on the CPU)
    experts_by_layer: dict[int, list[TensorCost]] = {}
    for c in costs:
        if c.kind == "routed experts" and c.name not in devices:
            experts_by_layer.setdefault(c.layer, []).append(c)
    chosen = []
    for layer in sorted(experts_by_layer, key=lambda i: sum(c.gpu_bytes for c in experts_by_layer[i])):
        size = sum(c.gpu_bytes for c in experts_by_layer[layer])
        if has_gpu and not problems and size <= free:
            chosen.append(layer)
            free -= size
    if len(chosen) < math.ceil(MIN_EXPERT_SHARE * len(experts_by_layer)):
        chosen = []  # too little CPU traffic saved to be worth the headroom
    for layer, stack in experts_by_layer.items():
        for c in stack:
            devices[c.name] = "gpu" if layer in chosen else "cpu"

    backends = {c.name: backend(c, devices[c.name], hw) for c in costs}
    if tied:  # the embedding is also the output head: it takes a matmul backend
        backends["token_embd.weight"] = backend(replace(by_name["token_embd.weight"], kind="output head"),
                                                devices["token_embd.weight"], hw)  # fmt: skip
    for trio in family.expert_trios(by_name):
        shared = expert_trio_backend(tuple(by_name[n] for n in trio), devices[trio[0]], hw)
        backends.update(dict.fromkeys(trio, shared))
    fused = tuple(_fused_shared_layers(family, by_name, backends))
    placements = tuple(_placement(c, devices[c.name], backends[c.name]) for c in costs)
    if has_gpu and not any(p.device == "gpu" for p in placements):  # rules sent everything to the CPU
        kv_device, kv_dtype, kv = "cpu", "float32", kv_cache_bytes(cfg, ctx, 4)
    # a prompt filling the context: its last chunk's scores span every position
    on_gpu = any(p.device == "gpu" for p in placements)
    engine = not on_gpu and any(p.backend == "cpu-engine" for p in placements)  # prompts' attention token by token
    prefill = family.prefill_host_bytes(cfg, ctx, on_gpu, hw.cpu_cores if engine else 0)
    prompt_cache = (cache_slots - 1) * kv
    cpu_need = sum(p.bytes for p in placements if p.device == "cpu") + (kv if kv_device == "cpu" else 0) + prefill
    cpu_need += prompt_cache
    overflow = max(0, cpu_need - hw.ram) if hw.ram else 0
    longest, experts = longest_chunk(family, cfg, ctx), (cfg.n_expert, cfg.n_expert_used)
    if staging[0]:
        reserved += (("prefill staging", staging[0]),)
        prefill += staging[1]
        cpu_need += staging[1]
        overflow = max(0, cpu_need - hw.ram) if hw.ram else 0
    else:
        longest = 0  # the GPU road is never taken (its speed is still shown)
    warnings = []
    held = f", {cache_slots - 1} more cached conversations" if cache_slots > 1 else ""
    if overflow and overcommit:
        warnings.append(
            f"CPU RAM: the plan needs {_gib(cpu_need)} (weights, KV cache, prefill activations{held}) but the machine "
            f"has {_gib(hw.ram)}; {_gib(overflow)} of weights will be read from disk as they are used (slower; "
            "--no-overcommit refuses instead)"
        )
    elif overflow:
        problems.append(f"CPU RAM: the plan needs {_gib(cpu_need)} but the machine has {_gib(hw.ram)}")
    slow = [p for p in placements if p.backend == "reference"]
    if slow:
        types = sorted({f"{p.format} on the {p.device.upper()}" for p in slow})
        warnings.append(
            f"{len(slow)} tensors ({_gib(sum(p.bytes for p in slow))}: {', '.join(types)}) have no fast kernel where "
            "they are placed and run on the reference path, dequantized on every call (counted in the speed above)"
        )
    prediction = predict(costs, devices, backends, hw, kv, kv_device, overflow, longest, experts)
    plan = Plan(
        model=model,
        hardware=hw,
        ctx=ctx,
        placements=placements,
        kv_cache_bytes=kv,
        kv_cache_device=kv_device,
        reserved=reserved,
        fits=not problems,
        problems=tuple(problems),
        suggestion=_suggestion(problems, hw, dense_need, kv, cfg, ctx, cpu_need),
        prediction=prediction,
        rules=tuple(r.source for r in rules),
        ignored=ignored,
        warnings=tuple(warnings),
        executor=_executor(cfg, placements, hw),
        kv_cache_dtype=kv_dtype,
        fused_shared_layers=fused,
        prefill_host_bytes=prefill,
        cache_slots=cache_slots,
        prompt_cache_bytes=prompt_cache,
    )
    if staging[0]:  # kept only where it pays and costs nothing else
        without = make_plan(
            cfg, every_tensor, hw, ctx, rules, model, overcommit, streaming=False, cache_slots=cache_slots
        )
        if not prediction.prefill_crossover_tokens or _worth(without) > _worth(plan):
            return without
    return plan


def _worth(plan: Plan) -> tuple:
    """What a plan must not lose to make room for the staging: its fit, its reads from disk,
    and decode speed beyond STAGING_DECODE_LOSS (within the roofline's error; the staging
    displaces at most an expert layer or two, while the prompts it serves prefill faster)."""
    decode = plan.prediction.decode_tok_s
    return (
        plan.fits,
        -plan.prediction.disk_bytes_per_token,
        decode * (1 + STAGING_DECODE_LOSS if "prefill staging" in dict(plan.reserved) else 1),
    )


def plan_model(file, hw: Hardware, ctx: int | None = None, rules: list[Rule] = (), overcommit: bool = True,
               cache_slots: int = 1) -> Plan:  # fmt: skip
    """make_plan for an opened GGUFModelFile, with the default context where none is given."""
    cfg = family_of(file.metadata).config(file.metadata)
    ctx = min(DEFAULT_CTX, cfg.n_ctx_train) if ctx is None else ctx
    return make_plan(cfg, file.tensors, hw, ctx, list(rules), model=str(file.paths[0]), overcommit=overcommit,
                     cache_slots=cache_slots)  # fmt: skip


MAX_CACHE_SLOTS = 4  # conversations `hetero serve` keeps by default, where RAM allows


def roomy_cache_slots(plan: Plan) -> int:
    """How many conversations a server can keep cached with this plan's spare CPU RAM (at least
    one: the KV cache itself; at most MAX_CACHE_SLOTS): each more is a host copy of a KV cache."""
    spare = int(0.9 * plan.hardware.ram) - plan.used_bytes("cpu") if plan.hardware.ram else 0  # 10% for the OS
    return max(1, min(MAX_CACHE_SLOTS, 1 + spare // max(plan.kv_cache_bytes, 1)))


def _placement(c: TensorCost, device: str, backend: str) -> Placement:
    """On the CPU, and on the reference path anywhere, a tensor keeps its GGUF blocks (plus the
    stacks the loader derives from them for the CPU engine); on the GPU it takes its GPU format
    (or, where the loader derives stacks, only theirs)."""
    kept = device == "cpu" or backend == "reference"
    derived = c.derived_bytes if backend == "cpu-engine" else 0
    fmt, size = (c.qtype.name, c.gguf_bytes + derived) if kept else (c.gpu_format, c.gpu_bytes)
    read = int((derived or size) * c.read_fraction_decode)  # a decoded token reads derived stacks alone
    return Placement(
        c.name, c.kind, c.layer, device, fmt, backend, size, read, c.flops_per_token, c.intensity(1),
        c.intensity(PREFILL_TOKENS),
    )  # fmt: skip


def _fused_shared_layers(family: Family, costs: dict[str, TensorCost], backends: dict[str, str]):
    """Layers whose shared experts ride in the routed experts' CPU hand-off: both on the CPU
    engine, the shared ones a trio the fused kernel takes (one hand-off instead of two)."""
    for gate, _, _ in family.expert_trios(costs):
        shared = family.shared_trio(gate)  # () for a family without shared experts
        if shared and backends[gate] == "cpu-engine" and all(backends.get(n) == "cpu-engine" for n in shared):
            if experts_run_on_engine(*((costs[n].qtype, costs[n].row) for n in shared)):
                yield costs[gate].layer


EXECUTORS = ("native", "hybrid", "eager")


def _executor(cfg: ModelConfig, placements: tuple[Placement, ...], hw: Hardware) -> str:
    """native: every weight on the CPU engine, one NUMA node (the step reads the file map, not
    per-node copies) and a family whose step runs the config; hybrid: the GPU holds weights (CUDA graph
    segments between the CPU-expert hand-offs); eager: the forward pass, op by op."""
    if any(p.device == "gpu" for p in placements):
        return "hybrid"
    if (
        hw.numa_nodes == 1
        and family_of_config(cfg).native_step(cfg)
        and all(p.backend != "reference" for p in placements)
    ):
        return "native"
    return "eager"


def _reserved(family: Family, cfg: ModelConfig, has_gpu: bool) -> tuple[tuple[str, int], ...]:
    if not has_gpu:
        return ()
    # A prefill chunk's bf16 activations (the family says how many per token), plus float32
    # logits of one token.
    width = family.prefill_values_per_token(cfg)
    return (
        ("activations", PREFILL_CHUNK * width * 2 + cfg.n_vocab * 4),
        ("CUDA graphs", CUDA_GRAPHS),
        ("CUDA context", CUDA_CONTEXT),
    )


def longest_chunk(family: Family, cfg: ModelConfig, ctx: int) -> int:
    """The most tokens one prompt pass takes within ctx: the family's chunk shrinks as the
    pass ends further in (its attention scores are bounded), so the longest pass ends where
    the chunk still covers every position up to it, or just after."""
    low, high = 1, ctx  # the largest p <= ctx with p <= chunk(p), by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if mid <= family.prefill_chunk(cfg, mid) else (low, mid - 1)
    return max(low, min(ctx, family.prefill_chunk(cfg, min(ctx, low + 1))))


def _staging(family: Family, cfg: ModelConfig, costs: dict[str, TensorCost], tokens: int) -> tuple[int, int]:
    """(GPU bytes, pinned host bytes) of the staging that streams a prompt's CPU experts to the
    GPU (gpu_ops.staging), sized for the model's largest experts and a pass of `tokens`; (0, 0)
    without routed experts."""
    trios = [tuple(costs[n] for n in trio) for trio in family.expert_trios(costs)]
    if not trios:
        return 0, 0
    n = cfg.n_expert
    per_expert = max(sum(c.gguf_bytes for c in trio) // n for trio in trios)
    values = max(c.n_values // n for trio in trios for c in trio)
    device, host = staging_bytes(per_expert, n, values)
    # the road's float32 activations: the input, its copy and the output [T, D], one expert's
    # tokens (up to all T) with their gate, up and hidden [T, F], down's product and its weighting [T, D]
    gate = trios[0][0]  # [E, F, D]: rows of D values
    width, hidden = gate.row, gate.n_values // n // gate.row
    return device + tokens * (5 * width + 3 * hidden) * 4, host


def _suggestion(problems, hw: Hardware, dense_need: int, kv: int, cfg: ModelConfig, ctx: int, cpu_need: int) -> str:
    if not problems:
        return ""
    tips = []
    usable = int(hw.gpu_mem * (1 - HEADROOM))
    if hw.gpu_mem and dense_need > usable:
        tips.append(f"--gpu-mem {math.ceil(dense_need / (1 - HEADROOM) / GiB)}GiB")
        per_token = kv // ctx
        shorter = ctx - math.ceil((dense_need - usable) / per_token)
        if shorter >= 1:
            tips.append(f"--ctx {shorter}")
        tips.append("--gpu-mem 0 (CPU only)")
    if hw.ram and cpu_need > hw.ram:
        tips.append(f"a machine with {math.ceil(cpu_need / GiB)} GiB of RAM")
    return "smallest change that fits: " + " or ".join(tips)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"
