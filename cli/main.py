"""`hetero`: synth, info and demo. Errors in the user's input print one red line and exit 2."""

import functools
import json
import os
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.units import gib
from cli.visible import visible
from modelfile.errors import HeteroError
from modelfile.paths import cache_home
from placement.hardware import CPU_MEMORY, GPUS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run giant MoE GGUF models on one GPU plus CPU RAM.")
console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}

DEMO_PRESET, DEMO_QUANT = "v3", "Q4_K_M"
NO_OVERCOMMIT_HELP = "Refuse a plan whose CPU share exceeds RAM, instead of reading the rest from disk as used."
GPU_MEM_HELP = "GPU budget, e.g. 24GiB; 0 for CPU-only."
GPU_MEM_DEFAULT = "the detected GPU's memory; none without CUDA"
CTX_DEFAULT = "4096, or the model's own if smaller"
THREADS_DEFAULT = "the CPUs this process may use"
OVERRIDE_HELP = "PATTERN=DEVICE[:FORMAT], e.g. 'exps=cpu' (llama.cpp's -ot); repeat for more; before --rules."
QUANT_HELP = (
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS "
    "(the mix of per-tensor types llama.cpp would choose); or an expert mix, routed experts (and their down "
    "projections) in low-bit types over a dense mix: Q4_K_M+IQ2_XS, Q4_K_M+IQ1_S/IQ2_XXS, or a release's "
    "UD-IQ1_S, UD-IQ1_M, UD-IQ2_XXS, UD-Q2_K_XL."
)


def _version(value: bool):
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"hetero {version('hetero')}")
        except PackageNotFoundError:
            print("hetero (not installed: running from the source tree)")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    STATE["debug"] = debug


def check_threads(threads: int | None) -> None:
    """--threads checked before loading, by the rule the executor applies (the CPUs we may use)."""
    from cpu_ops.executor import check_threads as check
    from cpu_ops.topology import detect_topology

    check(threads, detect_topology().n_cpus)


def check_generation_options(max_tokens: int, temperature: float, top_p: float = 1.0) -> None:
    """Refuse bad generation options before anything is loaded (one line each)."""
    from hetero.sampling import sampling_problem

    if max_tokens < 1:
        raise HeteroError(f"--max-tokens {max_tokens}: must be at least 1")
    problem = sampling_problem(temperature, top_p)
    if problem:
        raise HeteroError(problem)


def warn_if_gpu_stands_in(gpu_mem: str | None) -> None:
    """A GPU budget on a machine without CUDA makes the CPU play the GPU: right for tests, slow
    for use. Say so once rather than run ~10x slower in silence."""
    import torch

    from placement.hardware import parse_size

    if gpu_mem is not None and parse_size(gpu_mem) > 0 and not torch.cuda.is_available():
        err_console.print(
            f"[yellow]warning:[/] no CUDA GPU detected: with --gpu-mem {gpu_mem} the CPU stands in for the GPU "
            "(for testing; much slower than leaving --gpu-mem out)",
            highlight=False,
            soft_wrap=True,
        )


def friendly_errors(fn):
    """Turn HeteroError (bad file, bad option) into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:  # `hetero info x | head`: the reader has what it wanted
            _quiet_stdout()
            raise typer.Exit(0) from None
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except (HeteroError, ValueError, OSError) as e:
            if STATE["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(_one_line(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as e:  # a bug, or an input hetero does not yet check: still one line
            if STATE["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(_one_line(e))} (an unexpected {type(e).__name__}: "
                              "rerun with --debug for the traceback)", highlight=False, soft_wrap=True)  # fmt: skip
            raise typer.Exit(2) from None

    return wrapper


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so Python's final flush does not complain."""
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def load_with_progress(path, warn: bool = True, **options):
    """load_model (with a bar by bytes for the weights it puts on the GPU), then read the
    CPU's weights into RAM with a bar by bytes. warn: print the plan's warnings (callers that
    render the whole plan leave them to it)."""
    import hetero
    from hetero.model import default_plan
    from hetero.prefetch import prefetch
    from modelfile.gguf_file import GGUFModelFile

    with err_console.status("opening the model"):
        file = path if isinstance(path, GGUFModelFile) else GGUFModelFile(path)
        if options.get("plan") is None:
            plan_options = {k: options.pop(k) for k in ("n_ctx", "gpu_mem", "rules", "overcommit") if k in options}
            run_options = {k: options[k] for k in ("numa", "cpu_kernels", "gpu_device") if k in options}
            options["plan"] = default_plan(file, **plan_options, **run_options)
    if warn:
        print_plan_warnings(options["plan"])
    gpu_bytes = options["plan"].weights_bytes("gpu")
    if not gpu_bytes:
        with err_console.status("opening the model"):
            model = hetero.load_model(file, **options)
    else:
        columns = (TextColumn("[bold]placing weights on the GPU"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=True) as bar:
            task = bar.add_task("gpu", total=gpu_bytes)
            model = hetero.load_model(file, on_gpu_bytes=lambda n: bar.advance(task, n), **options)
    columns = (TextColumn("[bold]reading weights"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("read", total=None)
        if not prefetch(model.file, lambda done, total: bar.update(task, completed=done, total=total)):
            err_console.print("[dim]weights exceed free RAM: pages will be read from disk as they are used[/]")
    if model.executor is not None or model.plan.weights_bytes("gpu"):
        with err_console.status("preparing the kernels (compiled on first use, then cached)", spinner="dots"):
            model.warm_up()
    return model


def print_plan_warnings(plan) -> None:
    for warning in plan.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


def engine_name(model) -> str:
    """Which paths ran: the numba engine (threads) or the reference torch ops on the CPU, and the
    hybrid decode step when the plan uses the GPU."""
    n = model.executor.n_threads if model.executor else 0
    cpu = "reference torch ops on the CPU" if model.executor is None else f"CPU engine, {n} thread{'s' * (n != 1)}"
    if not model.plan.weights_bytes("gpu"):
        return cpu
    gpu = "CUDA" if model.device.type == "cuda" else "the CPU standing in for a GPU"
    return f"{cpu}; the GPU's part on {gpu}"


def write_with_progress(out: Path, preset: str, quant: str, **kwargs) -> list[Path]:
    from hetero.synth.writer import write_synthetic

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(f"writing {preset} weights", total=None)

        def report(done, total):
            bar.update(task, completed=done * 4, total=total * 4)  # shown as float32 bytes

        files = write_synthetic(out, preset, quant, progress=report, **kwargs)
    return files


def ensure_demo_model() -> Path:
    """The built-in demo model in the cache, written once. One process writes it while others
    wait (a lock file); it appears under its name only when complete (hetero.synth.writer);
    a file there that does not open (an interrupted write by an older hetero, a full disk) is
    moved aside with a warning and written again."""
    import fcntl

    from modelfile.gguf_file import GGUFModelFile

    path = cache_home() / f"demo-{DEMO_PRESET}-{DEMO_QUANT}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with err_console.status("another hetero is writing the demo model; waiting for it"):
                fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                GGUFModelFile(path)
                return path
            except (HeteroError, OSError) as e:
                aside = path.with_name(path.name + ".broken")
                os.replace(path, aside)
                warning = f"the cached demo model does not open ({e}); moved it to {aside} and writing it again"
                err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        console.print(f"writing the demo model to {path} (once)")
        write_with_progress(path, DEMO_PRESET, DEMO_QUANT)
    return path


@app.command()
@friendly_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Output .gguf path.")],
    preset: Annotated[
        str,
        typer.Option(help="tiny, v2-lite (DeepSeek-V2-Lite), v3 (V3-shaped, small) or r1 (DeepSeek-R1, full size)."),
    ] = "tiny",
    quant: Annotated[str, typer.Option(help=QUANT_HELP)] = "Q4_K_M",
    layers: Annotated[int | None, typer.Option(help="Number of layers.", show_default="the preset's")] = None,
    ctx: Annotated[
        int | None,
        typer.Option(help="Training context the file declares (long-prompt tests).", show_default="the preset's"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
    splits: Annotated[int, typer.Option(help="Write a split set of this many files.")] = 1,
    header_only: Annotated[
        bool, typer.Option("--header-only", help="Declare every tensor, write no weights (a sparse file).")
    ] = False,
    quantizer: Annotated[
        str, typer.Option(help="hetero (numpy, built in) or llama.cpp (its own quantizer; needs the dev extra).")
    ] = "hetero",
    joint_kv_b: Annotated[
        bool,
        typer.Option(
            "--joint-kv-b",
            help="The legacy MLA layout: one attn_kv_b per layer, as files converted "
            "before April 2025 have it (the first R1 releases among them), not attn_k_b + attn_v_b.",
        ),
    ] = False,
):
    """Write a synthetic deepseek2 GGUF: real architecture and tokenizer, random weights.

    Example: hetero synth v2lite.gguf --preset v2-lite --layers 4 --quant Q4_K_M
    Example: hetero synth r1.gguf --preset r1 --header-only --splits 9   (for hetero plan / info)
    Example: hetero synth r1-ud.gguf --preset r1 --header-only --quant UD-IQ1_S --joint-kv-b   (as released)
    Example: hetero synth tiny-16k.gguf --preset tiny --ctx 16400   (hetero bench --prompt-tokens 16384)
    """
    t0 = time.perf_counter()
    for name, value in (("--layers", layers), ("--ctx", ctx)):
        if value is not None and value < 1:
            raise HeteroError(f"{name} {value}: must be at least 1")
    layout = {"n_layer": layers, "split_kv_b": False if joint_kv_b else None, "n_ctx": ctx}  # None: the preset's
    if header_only:
        from hetero.synth.header_only import write_header_only
        from hetero.synth.presets import make_preset

        files = write_header_only(out, make_preset(preset, **layout), splits, quant)
    else:
        files = write_with_progress(out, preset, quant, seed=seed, splits=splits, quantizer=quantizer, **layout)
    size = sum(f.stat().st_size for f in files)
    console.print(f"wrote {', '.join(map(str, files))} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")


@app.command()
@friendly_errors
def info(
    model: Annotated[Path, typer.Argument(help="GGUF file (first file of a split set).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Architecture, parameters (total and active per token), quant types, bytes by tensor kind.

    Example: hetero info DeepSeek-R1-Q4_K_M-00001-of-00009.gguf
    """
    from modelfile.gguf_file import GGUFModelFile
    from modelfile.summary import summarize

    summary = summarize(GGUFModelFile(model))
    if as_json:
        print(json.dumps(summary))
        return
    print_summary(summary)


def print_summary(s: dict) -> None:
    console.print(
        f"[bold]{s['name'] or s['path']}[/]  ({s['architecture']}, {s['files']} file(s), {gib(s['file_bytes'])})"
    )
    console.print(
        f"{s['layers']} layers, hidden {s['hidden']}, experts {s['experts']}, "
        f"vocab {s['vocab']}, context {s['context']}"
    )
    console.print(
        f"parameters: {s['total_params'] / 1e9:.2f} B total, "
        f"{s['active_params_per_token'] / 1e9:.2f} B active per token"
    )
    console.print("quant types: " + ", ".join(f"{k} ×{v}" for k, v in s["quant_types"].items()))
    table = Table("tensor kind", "tensors", "params", "bytes", "share")
    total = sum(e["bytes"] for e in s["by_kind"].values())
    for kind, e in sorted(s["by_kind"].items(), key=lambda kv: -kv[1]["bytes"]):
        table.add_row(
            kind, str(e["tensors"]), f"{e['params'] / 1e6:,.1f} M", gib(e["bytes"]), f"{e['bytes'] / total:.1%}"
        )
    console.print(table)


@app.command()
@friendly_errors
def plan(
    model: Annotated[Path, typer.Argument(help="GGUF file (any file of a split set).")],
    gpu_mem: Annotated[str | None, typer.Option(help=GPU_MEM_HELP, show_default=GPU_MEM_DEFAULT)] = None,
    ctx: Annotated[int | None, typer.Option(help="Context length for the KV cache.", show_default=CTX_DEFAULT)] = None,
    gpu: Annotated[
        str | None, typer.Option(help=f"Plan for a named GPU: {', '.join(GPUS)}, or none.", show_default="detected")
    ] = None,
    cpu_bw: Annotated[
        str | None,
        typer.Option(
            help=f"CPU memory bandwidth: 300GB/s, or {', '.join(CPU_MEMORY)}.",
            show_default="measured once for this machine, cached",
        ),
    ] = None,
    cpu_cores: Annotated[int | None, typer.Option(help="CPU cores (prefill FLOPs).", show_default="detected")] = None,
    ram: Annotated[str | None, typer.Option(help="CPU RAM, e.g. 512GiB.", show_default="detected")] = None,
    rules: Annotated[Path | None, typer.Option(help="TOML rules file (format above).", show_default="none")] = None,
    override: Annotated[list[str] | None, typer.Option(help=OVERRIDE_HELP, show_default="none")] = None,
    disk_bw: Annotated[
        str | None, typer.Option(help="Read speed of the model's disk, for plans over RAM.", show_default="2GB/s")
    ] = None,
    no_overcommit: Annotated[bool, typer.Option("--no-overcommit", help=NO_OVERCOMMIT_HELP)] = False,
    pcie_bw: Annotated[
        str | None,
        typer.Option(
            help="Host-to-GPU copy rate for streaming a prompt's experts, e.g. 25GB/s.",
            show_default="measured once for this GPU, cached; 25GB/s (PCIe 4.0 x16) for a named one",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (docs/plan-schema.md).")] = False,
):
    r"""Decide what goes on the GPU and what stays in CPU RAM, from the header alone, and predict speed.

    Example: hetero plan DeepSeek-R1-Q4_K_M-00001-of-00009.gguf --gpu rtx4090 --ctx 8192 --cpu-bw ddr5-4800x8
    Exit code 2 when the plan does not fit.

    Rules file (--rules FILE), TOML; the first rule whose regex is found in a tensor's name wins,
    and --override rules come first:

    \[\[rule]]
    match = 'blk\.(3|4)\.ffn_.*_exps'   # a regular expression, searched in the tensor name
    device = "gpu"                        # gpu or cpu
    format = "int4"                       # optional, GPU only: must be the format the type takes
    """
    from cli.plan_report import render_plan
    from modelfile.gguf_file import GGUFModelFile
    from placement.hardware import detect, with_overrides
    from placement.planner import plan_model
    from placement.report import plan_to_json
    from placement.rules import load_rules, parse_override

    file = GGUFModelFile(model)
    all_rules = [parse_override(o) for o in override or []] + (load_rules(rules) if rules else [])
    with err_console.status("measuring memory bandwidth and prompt speed (once for this machine)", spinner="dots"):
        hw = detect(measure_cpu=cpu_bw is None)
    hw = with_overrides(hw, gpu=gpu, gpu_mem=gpu_mem, cpu_bw=cpu_bw, ram=ram, cpu_cores=cpu_cores, disk_bw=disk_bw,
                        pcie_bw=pcie_bw)  # fmt: skip
    result = plan_model(file, hw, ctx, all_rules, overcommit=not no_overcommit)
    if as_json:
        print(json.dumps(plan_to_json(result)))
    else:
        render_plan(result, console)
    if not result.fits:
        raise HeteroError("the plan does not fit: " + "; ".join(result.problems))


def road_plan(plan, road: str):
    """The plan with its prefill crossover set for --prefill-road: as planned, never (cpu) or
    from two tokens (gpu: needs a GPU in the plan and routed experts in CPU RAM; a measurement,
    its staging not budgeted where the plan has no crossover of its own)."""
    from dataclasses import replace

    if road == "plan":
        return plan
    if road == "gpu" and not plan.prediction.prefill_gpu_road_tok_s:
        raise HeteroError("--prefill-road gpu needs a GPU in the plan (--gpu-mem) and routed experts in CPU RAM")
    crossover = 2 if road == "gpu" else 0
    return replace(plan, prediction=replace(plan.prediction, prefill_crossover_tokens=crossover))


@app.command()
@friendly_errors
def bench(
    model: Annotated[Path, typer.Argument(help="GGUF file (any file of a split set).")],
    device: Annotated[str, typer.Option(help="cpu (CPU-only plan) or auto (the detected GPU, if any).")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads.", show_default=THREADS_DEFAULT)] = None,
    numa: Annotated[str, typer.Option(help="auto (experts split over NUMA nodes) or off.")] = "auto",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for prefill.")] = 64,
    gen_tokens: Annotated[int, typer.Option(help="Tokens to decode.")] = 16,
    reps: Annotated[int, typer.Option(help="Repetitions; medians are reported.")] = 3,
    gpu_mem: Annotated[str | None, typer.Option(help=GPU_MEM_HELP, show_default=GPU_MEM_DEFAULT)] = None,
    ctx: Annotated[int | None, typer.Option(help="Context length for the plan.", show_default=CTX_DEFAULT)] = None,
    override: Annotated[list[str] | None, typer.Option(help=OVERRIDE_HELP, show_default="none")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    profile: Annotated[
        bool, typer.Option("--profile", help="Per-layer decode timeline: GPU busy, CPU experts, waiting.")
    ] = False,
    no_overcommit: Annotated[bool, typer.Option("--no-overcommit", help=NO_OVERCOMMIT_HELP)] = False,
    prefill_road: Annotated[
        str,
        typer.Option(
            help="plan (the plan's crossover), cpu or gpu: where a prompt's CPU experts run (predicted at 512)."
        ),
    ] = "plan",
):
    """Measure prefill and decode tokens/s (medians over repetitions) beside the planner's prediction.

    Example: hetero bench v2lite.gguf --device cpu --threads 2 --prompt-tokens 64 --gen-tokens 16 --json
    Hybrid timeline: hetero bench v3.gguf --gpu-mem 24GiB --override exps=cpu --profile
    """
    import statistics

    import torch

    from cli.profile_report import print_profile, profile_json
    from hetero.bench import profile_decode, run_bench
    from hetero.model import run_hardware
    from modelfile.gguf_file import GGUFModelFile
    from placement.planner import plan_model
    from placement.rules import parse_override

    if device not in ("cpu", "auto"):
        raise HeteroError(f"--device {device}: choose cpu or auto")
    if prefill_road not in ("plan", "cpu", "gpu"):
        raise HeteroError(f"--prefill-road {prefill_road}: choose plan, cpu or gpu")
    check_threads(threads)
    if numa not in ("auto", "off"):
        raise HeteroError(f"--numa {numa}: choose auto or off")
    file = GGUFModelFile(model)
    with err_console.status("measuring memory bandwidth and prompt speed (once for this machine)", spinner="dots"):
        hw = run_hardware("0" if device == "cpu" else gpu_mem, numa)
    rules = [parse_override(o) for o in override or []]
    if device != "cpu":
        warn_if_gpu_stands_in(gpu_mem)
    planned = plan_model(file, hw, ctx, rules, overcommit=not no_overcommit)
    plan = road_plan(planned, prefill_road)
    if profile and not plan.weights_bytes("gpu"):
        raise HeteroError(
            "--profile times the hybrid decode step, and this plan puts nothing on the GPU; give --gpu-mem "
            "(without CUDA the CPU stands in for the GPU)"
        )
    loaded = load_with_progress(file, plan=plan, threads=threads, numa=numa)
    with Progress(*Progress.get_default_columns(), console=err_console, transient=True) as bar:
        task = bar.add_task(f"bench ({reps} repetitions)", total=reps)
        result = run_bench(loaded, prompt_tokens, gen_tokens, reps, on_rep=lambda _: bar.advance(task))
    timeline = None
    if profile:
        with err_console.status("profiling decode steps", spinner="dots"):
            timeline = profile_decode(loaded, prompt_tokens, max(gen_tokens, 8))
    pred = plan.prediction
    road_speed = {"cpu": pred.prefill_cpu_road_tok_s, "gpu": pred.prefill_gpu_road_tok_s}.get(prefill_road)
    predicted_prefill = road_speed or pred.prefill_tok_s
    cpu_bytes, gpu_bytes = plan.decode_read_bytes("cpu"), plan.decode_read_bytes("gpu")
    report = {
        "model": str(file.paths[0]),
        "device": device,
        "threads": loaded.executor.n_threads if loaded.executor else torch.get_num_threads(),
        "numa_nodes": loaded.executor.n_nodes if loaded.executor else 1,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "reps": reps,
        "prefill_tok_s": result.prefill_median,
        "decode_tok_s": result.decode_median,
        "prefill_tok_s_runs": list(result.prefill_tok_s),
        "decode_tok_s_runs": list(result.decode_tok_s),
        "time_to_first_token_s": result.first_token_median,
        "prefill_rss_growth_bytes": result.prefill_rss_growth,
        "planned_prefill_bytes": plan.prefill_host_bytes,
        "planned_cpu_bytes": plan.used_bytes("cpu"),
        "prefill_road": prefill_road,
        "predicted": {
            "prefill_tok_s": predicted_prefill,
            "decode_tok_s": pred.decode_tok_s,
            "bound": pred.bound,
            "prefill_crossover_tokens": planned.prediction.prefill_crossover_tokens,
            "prefill_cpu_road_tok_s": pred.prefill_cpu_road_tok_s,
            "prefill_gpu_road_tok_s": pred.prefill_gpu_road_tok_s,
        },
        "measured_over_predicted": {
            "prefill": result.prefill_median / predicted_prefill if predicted_prefill else None,
            "decode": result.decode_median / pred.decode_tok_s if pred.decode_tok_s else None,
        },
        "decode_weight_bytes_per_token": {"cpu": cpu_bytes, "gpu": gpu_bytes},
        "achieved_cpu_gb_s": cpu_bytes * result.decode_median / 1e9,
        "cpu_read_bandwidth_gb_s": hw.cpu_bw / 1e9,
        "hardware_source": hw.source,
    }
    if timeline is not None:
        report["profile"] = profile_json(timeline)
    if as_json:
        print(json.dumps(report))
        return
    spread = lambda runs: f"{min(runs):.3g}-{max(runs):.3g}"  # noqa: E731
    console.print(
        f"prefill {result.prefill_median:.3g} tok/s (runs {spread(result.prefill_tok_s)}), "
        f"decode {result.decode_median:.3g} tok/s (runs {spread(result.decode_tok_s)}), "
        f"{report['threads']} threads, median of {reps}"
    )
    console.print(f"time to first token {result.first_token_median:.3g} s for {prompt_tokens} prompt tokens")
    if result.prefill_rss_growth is not None:
        console.print(
            f"RSS rose at most {gib(result.prefill_rss_growth)} during a prefill (with the weights' pages it "
            f"touched first); the plan's CPU RAM: {gib(plan.used_bytes('cpu'))} (weights, KV cache, prefill "
            f"activations {gib(plan.prefill_host_bytes)})"
        )
    console.print(
        f"predicted by the plan: prefill {predicted_prefill:.1f}, decode {pred.decode_tok_s:.1f} tok/s "
        f"({pred.bound}-bound); measured/predicted decode {report['measured_over_predicted']['decode']:.2f}"
    )
    console.print(
        f"decode reads {cpu_bytes / 2**20:.1f} MiB of weights per token on the CPU: "
        f"{report['achieved_cpu_gb_s']:.2f} GB/s achieved of {hw.cpu_bw / 1e9:.1f} GB/s "
        f"({statistics.median(result.decode_tok_s) * cpu_bytes / hw.cpu_bw:.1%})"
    )
    console.print(f"[dim]{escape(hw.source)}[/]")
    if timeline is not None:
        print_profile(console, timeline, loaded.device)


@app.command()
@friendly_errors
def chat(
    model: Annotated[Path, typer.Argument(help="A deepseek2 GGUF (any file of a split set).")],
    prompt: Annotated[
        str | None, typer.Option(help="Answer this one message and exit.", show_default="an interactive chat")
    ] = None,
    system: Annotated[str, typer.Option(help="System prompt.")] = "",
    max_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.6,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.", show_default="random")] = None,
    hide_thinking: Annotated[
        bool, typer.Option("--hide-thinking", help="Fold DeepSeek-R1's <think> reasoning away.")
    ] = False,
    gpu_mem: Annotated[str | None, typer.Option(help=GPU_MEM_HELP, show_default=GPU_MEM_DEFAULT)] = None,
    ctx: Annotated[int | None, typer.Option(help="Context length.", show_default=CTX_DEFAULT)] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.", show_default=THREADS_DEFAULT)] = None,
    no_overcommit: Annotated[bool, typer.Option("--no-overcommit", help=NO_OVERCOMMIT_HELP)] = False,
):
    """Chat in the terminal with the model's own chat template; replies stream as they are made.

    Example: hetero chat DeepSeek-R1-Q4_K_M-00001-of-00009.gguf --gpu-mem 24GiB --ctx 8192
    In the chat: /reset, /system TEXT, /temp X, /stats, /exit; Ctrl-C stops the current reply, Ctrl-D leaves.
    Alt-Enter starts a new line (or end a line with \\, or wrap a message in three double quotes);
    Up, Down and Ctrl-R search the history ($XDG_STATE_HOME/hetero/chat_history).
    """
    from cli.chat import ChatOptions, run_chat

    check_generation_options(max_tokens, temperature, top_p)
    check_threads(threads)
    warn_if_gpu_stands_in(gpu_mem)
    loaded = load_with_progress(model, n_ctx=ctx, gpu_mem=gpu_mem, threads=threads, overcommit=not no_overcommit)
    opts = ChatOptions(max_tokens, temperature, top_p, seed, hide_thinking)
    run_chat(loaded, console, opts, system, prompt)


@app.command()
@friendly_errors
def demo(
    model: Annotated[Path | None, typer.Argument(help="A deepseek2 GGUF; default: the built-in demo model.")] = None,
    prompt: Annotated[str, typer.Option(help="The user message.")] = "Hello! What can you do?",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 24,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.7,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
):
    """Load a model (by default a synthetic DeepSeek-V3-shaped one), summarise it and stream a reply.

    Example: hetero demo            (no download: writes the demo model once, ~106 MiB)
    """
    from cli.chat import ChatUI
    from cli.plan_report import render_plan
    from modelfile.summary import summarize

    check_generation_options(max_tokens, temperature)
    builtin = model is None
    if builtin:
        model = ensure_demo_model()
    loaded = load_with_progress(model, warn=False)  # render_plan below prints the warnings
    print_summary(summarize(loaded.file))
    render_plan(loaded.plan, console)
    console.print(f"\n[bold]user:[/] {escape(visible(prompt))}\n[bold]assistant:[/] ", end="")
    last, tokens = None, 0
    messages = [{"role": "user", "content": prompt}]
    ui = ChatUI(console)  # how model text reaches the screen: escaped on a terminal, raw into a pipe
    for step in loaded.generate_steps(messages, max_tokens, temperature=temperature, seed=seed):
        ui.piece("answer", step.text)
        last, tokens = step, tokens + (step.token >= 0)
    console.print()
    if last is not None:
        decode = f"{(tokens - 1) / last.decode_s:.1f} tok/s" if tokens > 1 and last.decode_s > 0 else "n/a"
        console.print(
            f"[dim]prefill {last.prompt_tokens} tokens at {last.prompt_tokens / last.prefill_s:.1f} tok/s, "
            f"decode {tokens} tokens at {decode} ({engine_name(loaded)})[/]"
        )
    if builtin:
        console.print(
            "[yellow]The demo model has random weights, so its text is noise.[/] "
            "Run a real model with: hetero demo path/to/DeepSeek-V3-Q4_K_M-00001-of-00009.gguf"
        )


@app.command()
@friendly_errors
def serve(
    model: Annotated[Path, typer.Argument(help="A deepseek2 GGUF (any file of a split set).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require 'Authorization: Bearer KEY'.", envvar="HETERO_API_KEY", show_default="none"),
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="The model's name in the API.", show_default="the file's name")
    ] = None,
    reasoning_format: Annotated[
        str, typer.Option(help="deepseek: R1's <think> text as reasoning_content; none: left in the content.")
    ] = "deepseek",
    chat_template_file: Annotated[
        Path | None, typer.Option(help="A Jinja chat template to use instead of the file's.", show_default="the file's")
    ] = None,
    temperature: Annotated[float, typer.Option(help="Default when a request gives none; 0 for greedy.")] = 0.6,
    top_p: Annotated[float, typer.Option(help="Default nucleus mass when a request gives none.")] = 0.95,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the model; more get 429.")] = 8,
    cache_slots: Annotated[
        int | None,
        typer.Option(
            help="Conversations the prompt cache keeps (each more: a KV cache's size of RAM).",
            show_default="up to 4, as RAM allows",
        ),
    ] = None,  # fmt: skip
    gpu_mem: Annotated[str | None, typer.Option(help=GPU_MEM_HELP, show_default=GPU_MEM_DEFAULT)] = None,
    ctx: Annotated[int | None, typer.Option(help="Context length.", show_default=CTX_DEFAULT)] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.", show_default=THREADS_DEFAULT)] = None,
    no_overcommit: Annotated[bool, typer.Option("--no-overcommit", help=NO_OVERCOMMIT_HELP)] = False,
):
    """Serve the model over the OpenAI API (chat and text completions, streaming, a prompt cache).

    Example: hetero serve DeepSeek-R1-Q4_K_M-00001-of-00009.gguf --gpu-mem 24GiB --ctx 16384
    Then: curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json'
      -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    One request runs at a time, the rest wait in order (up to --max-queue); a conversation's earlier
    turns are not prefilled again (the prompt cache). GET /health says loading or ready.
    """
    from cli.serve import run_server

    if not 0 < port < 65536:
        raise HeteroError(f"--port {port}: must be from 1 to 65535")
    if reasoning_format not in ("deepseek", "none"):
        raise HeteroError(f"--reasoning-format {reasoning_format}: choose deepseek or none")
    if max_queue < 1:
        raise HeteroError(f"--max-queue {max_queue}: must be at least 1")
    if cache_slots is not None and cache_slots < 1:
        raise HeteroError(f"--cache-slots {cache_slots}: must be at least 1")
    check_generation_options(1, temperature, top_p)
    check_threads(threads)
    warn_if_gpu_stands_in(gpu_mem)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err_console.print(f"[yellow]warning:[/] listening on {escape(host)} without --api-key: anyone who can reach "
                          "this machine can use the model", highlight=False)  # fmt: skip
    run_server(
        model, host, port, api_key, alias, reasoning_format == "deepseek", temperature, top_p, max_queue,
        chat_template_file,
        dict(n_ctx=ctx, gpu_mem=gpu_mem, threads=threads, overcommit=not no_overcommit, cache_slots=cache_slots),
    )  # fmt: skip


def main():
    app()


if __name__ == "__main__":
    main()
