"""Render a decode profile (hetero.bench.DecodeProfile): per layer, who was busy and who waited."""

from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from hetero.bench import DecodeProfile


def profile_json(p: DecodeProfile) -> dict:
    return {
        "steps": p.steps,
        "step_ms": p.step_ms,
        "tail_gpu_ms": p.tail_gpu_ms,
        "gpu_ms": p.gpu_ms,
        "cpu_ms": p.cpu_ms,
        "wait_ms": p.wait_ms,
        "bound": p.bound,
        "layers": [asdict(t) for t in p.layers],
    }


def print_profile(console: Console, p: DecodeProfile, gpu_device) -> None:
    stand_in = gpu_device.type != "cuda"
    table = Table(title=f"decode timeline, medians of {p.steps} steps (ms)" + (" - CPU standing in for the GPU"
                                                                               if stand_in else ""))  # fmt: skip
    table.add_column("layer", justify="right")
    table.add_column("GPU busy", justify="right")
    table.add_column("CPU experts", justify="right")
    table.add_column("waiting for CPU", justify="right")
    for t in p.layers:
        table.add_row(str(t.layer), f"{t.gpu_ms:.3f}", f"{t.cpu_ms:.3f}", f"{t.wait_ms:.3f}")
    table.add_row("head", f"{p.tail_gpu_ms:.3f}", "", "")
    table.add_row("total", f"{p.gpu_ms:.2f}", f"{p.cpu_ms:.2f}", f"{p.wait_ms:.2f}", style="bold")
    console.print(table)
    console.print(
        "GPU busy: the segment from the previous hand-off to this layer's (attention, dense layers, router) "
        "plus its shared experts; CPU experts: the routed experts, submit to finish"
    )
    other = p.step_ms - p.gpu_ms - p.wait_ms
    console.print(
        f"step {p.step_ms:.2f} ms: GPU segments {p.gpu_ms:.2f}, waiting for the CPU experts {p.wait_ms:.2f}, "
        f"host and hand-offs {max(other, 0):.2f}; {p.bound.upper()}-bound"
        + (' (with the CPU standing in, the "GPU" work runs on the host between hand-offs)' if stand_in else "")
    )
