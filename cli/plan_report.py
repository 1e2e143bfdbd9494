"""Render a Plan for people: tensors grouped by kind and layer range, totals, verdict, prediction."""

from itertools import groupby

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.units import gib
from placement.planner import Plan
from placement.predict import PREFILL_TOKENS

EXECUTORS = {
    "native": "native (one compiled call per token on the CPU engine's workers)",
    "hybrid": "hybrid (GPU segments between the CPU-expert hand-offs; CUDA graphs where a segment is all GPU)",
    "eager": "eager (the forward pass op by op)",
}


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'; -1 (outside the layer stack: embedding, head) -> 'top'."""
    out = []
    stack = sorted(v for v in layers if v >= 0)
    for _, run in groupby(enumerate(stack), key=lambda iv: iv[1] - iv[0]):
        run = [v for _, v in run]
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    if len(out) > 3:  # scattered layers (e.g. Q4_K_M's "more bits" ones): summarise
        out = [f"{len(stack)} of {stack[0]}-{stack[-1]}"]
    if -1 in layers:
        out.append("top")
    return ", ".join(out)


def prefill_road(plan: Plan) -> str:
    """Where a prompt's CPU-resident experts run, by chunk size, and both roads' predicted speed
    at the prediction's chunk ("" when there is no choice: no GPU, or no experts on the CPU)."""
    pred = plan.prediction
    if not pred.prefill_gpu_road_tok_s:
        return ""
    both = (f"at {PREFILL_TOKENS} tokens: CPU road {pred.prefill_cpu_road_tok_s:.0f} tok/s, "
            f"GPU road {pred.prefill_gpu_road_tok_s:.0f} tok/s")  # fmt: skip
    n = pred.prefill_crossover_tokens
    if not n:
        return (
            "prefill: the CPU's experts stay on the CPU (streaming them to the GPU pays for no chunk this context "
            f"runs, or its staging would cost VRAM, RAM or decode speed; {both})"
        )
    return f"prefill: the CPU's experts run on the CPU below {n} tokens a chunk, streamed to the GPU from {n} ({both})"


def render_plan(plan: Plan, console: Console) -> None:
    hw = plan.hardware
    groups: dict[tuple, dict] = {}
    for p in plan.placements:
        g = groups.setdefault((p.kind, p.device, p.format, p.backend), {"layers": set(), "count": 0, "bytes": 0})
        g["layers"].add(p.layer)
        g["count"] += 1
        g["bytes"] += p.bytes
    columns = ("tensor kind", "layers", "device", "format", "backend", "tensors", "bytes")
    table = Table(*columns, title=f"placement of {escape(plan.model)}")
    for (kind, device, fmt, backend), g in sorted(groups.items(), key=lambda kv: (kv[0][1] != "gpu", -kv[1]["bytes"])):
        style = "green" if device == "gpu" else "cyan"
        shown = f"[bold red]{backend}[/]" if backend == "reference" else backend
        layers = layer_ranges(sorted(g["layers"]))
        table.add_row(kind, layers, f"[{style}]{device}[/]", fmt, shown, str(g["count"]), gib(g["bytes"]))
    console.print(table)
    console.print(
        f"decode step: {EXECUTORS[plan.executor]}; KV cache {plan.kv_cache_dtype} on the {plan.kv_cache_device.upper()}"
    )
    reserved = ", ".join(f"{label} {gib(b)}" for label, b in plan.reserved)
    if hw.gpu_mem:
        console.print(
            f"GPU {hw.gpu_name}: {gib(plan.used_bytes('gpu'))} of {gib(hw.gpu_mem)} "
            f"(weights {gib(plan.weights_bytes('gpu'))}, KV cache {gib(plan.kv_cache_bytes)} for {plan.ctx} tokens, "
            f"{reserved})"
        )
    else:
        console.print("GPU: none (CPU-only plan)")
    ram = f" of {gib(hw.ram)}" if hw.ram else ""
    kv = f"KV cache {gib(plan.kv_cache_bytes)}, " if plan.kv_cache_device == "cpu" else ""
    if plan.prompt_cache_bytes:
        kv += f"{plan.cache_slots - 1} more cached conversations {gib(plan.prompt_cache_bytes)}, "
    console.print(
        f"CPU RAM: {gib(plan.used_bytes('cpu'))}{ram} (weights {gib(plan.weights_bytes('cpu'))}, {kv}"
        f"prefill activations {gib(plan.prefill_host_bytes)}; {hw.cpu_cores} cores, {hw.numa_nodes} NUMA node(s))"
    )
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if plan.fits:
        console.print("[bold green]fits[/]")
    else:
        for problem in plan.problems:
            console.print(f"[bold red]does not fit:[/] {problem}")
        console.print(plan.suggestion)
    pred = plan.prediction
    console.print(
        f"expected: decode [bold]{pred.decode_tok_s:.1f} tok/s[/] ({pred.bound}-bound: "
        f"GPU busy {pred.decode_gpu_ms:.1f} ms, CPU busy {pred.decode_cpu_ms:.1f} ms per token), "
        f"prefill {pred.prefill_tok_s:.0f} tok/s"
        + (f", reading {gib(pred.disk_bytes_per_token)} a token from disk" if pred.disk_bytes_per_token else "")
    )
    road = prefill_road(plan)
    if road:
        console.print(road)
    gpu = f"GPU {hw.gpu_bw / 1e9:.0f} GB/s, staging {hw.pcie_bw / 1e9:.1f} GB/s, " if hw.gpu_mem else ""
    console.print(
        f"[dim]hardware: {escape(hw.source)}; {gpu}CPU {hw.cpu_bw / 1e9:.0f} GB/s, {hw.cpu_flops / 1e12:.1f} TFLOP/s[/]"
    )
    for a in pred.assumptions:
        console.print(f"[dim]  assumes {a}[/]")
    if plan.ignored:
        names = ", ".join(plan.ignored[:5]) + (f" and {len(plan.ignored) - 5} more" if len(plan.ignored) > 5 else "")
        console.print(f"[dim]ignored {len(plan.ignored)} tensor(s) the model does not use: {escape(names)}[/]")
