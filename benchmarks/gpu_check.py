"""The GPU check kit: everything to run in the first minutes of a borrowed GPU machine, in one call.

Usage (on the GPU machine; docs/gpu-check.md has the exact `run` call and the wheels to carry):
    python3 benchmarks/gpu_check.py --out "$OUT" [--budget 480] [--wheels .whl]
Here, with the CPU standing in for the GPU (what CI runs, so the kit cannot rot between loans):
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu-check

Stages, each a child process with its own time limit inside the total budget, so a failure or a
slow stage still leaves the others' results:
    install       carried wheels (gguf) into a private site folder, hetero itself with --no-deps
    models        test models written by hetero's own quantizer (no llama.cpp there)
    tests         the CUDA tests: Triton kernels vs float64, graph replay vs eager, static step vs
                  the plain forward pass, hybrid vs CPU-only
    kernels       each GPU format's GEMV against a device-to-device copy, MLA decode attention
    bench-gpu     `hetero bench`, a V2-Lite-shaped model fully on the GPU
    bench-hybrid  `hetero bench --profile`, a V3-shaped model with its routed experts on the CPU
    bench-roads   the same model's prompt with its CPU experts on the CPU, then streamed to the
                  GPU (`--prefill-road cpu|gpu`), each beside the plan's prediction
Writes results.json, results.md and log.txt under --out and prints the short table last.
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(tempfile.gettempdir()) / "hetero-gpu-check-site"  # carried wheels go here, not into the image


@dataclass
class Result:
    stage: str
    status: str = "not run"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    summary: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Sizes:
    """What the stages run on: real shapes on a GPU, tiny ones with the CPU standing in."""

    gpu_model: list[str]  # hetero synth arguments
    hybrid_model: list[str]
    bench: list[str]
    gpu_mem_full: str
    kernels: list[str]
    tests: list[str]


GPU = Sizes(
    gpu_model=["--preset", "v2-lite", "--layers", "4", "--quant", "Q4_K_M"],
    hybrid_model=["--preset", "v3", "--quant", "Q4_K_M"],
    bench=["--prompt-tokens", "512", "--gen-tokens", "32", "--reps", "3"],
    gpu_mem_full="120GiB",
    kernels=["--reps", "50"],
    tests=[
        "tests/test_gpu_kernels.py",
        "tests/test_static_step.py",
        "tests/test_placement.py",
        "tests/test_expert_stream.py",
    ],  # fmt: skip
)
CPU = Sizes(
    gpu_model=["--preset", "tiny", "--quant", "Q4_K_M"],
    hybrid_model=["--preset", "tiny", "--quant", "Q8_0"],
    bench=["--prompt-tokens", "8", "--gen-tokens", "3", "--reps", "1", "--threads", "1"],
    gpu_mem_full="8GiB",
    kernels=["--reps", "2", "--small"],
    # the whole files run in CI anyway; here a few of each kind, enough to catch a kit that rotted
    tests=[
        "tests/test_gpu_kernels.py::test_triton_gemm_matches_float64",
        "tests/test_static_step.py::test_static_step_equals_the_plain_forward",
        "tests/test_static_step.py::test_cuda_graph_replay_equals_eager",
        "tests/test_expert_stream.py::test_a_layer_asked_for_out_of_order_is_an_error",
    ],  # fmt: skip
)
# Seconds: a stage's own ceiling, and what it keeps back for those after it.
LIMITS = {"install": 60, "models": 120, "tests": 200, "kernels": 90, "bench-gpu": 90, "bench-hybrid": 90,
          "bench-roads": 90}  # fmt: skip
FLOOR = {"install": 10, "models": 20, "tests": 30, "kernels": 20, "bench-gpu": 20, "bench-hybrid": 20,
         "bench-roads": 20}  # fmt: skip


class Kit:
    def __init__(self, args):
        self.cpu = args.cpu
        self.sizes = CPU if args.cpu else GPU
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="hetero-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.wheels = Path(args.wheels)
        self.deadline = time.monotonic() + args.budget
        self.log = (self.out / "log.txt").open("w")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(SITE), str(ROOT)]))
        self.env["XDG_CACHE_HOME"] = str(self.work / "cache")  # its own demo files and kernel cache
        if importlib.util.find_spec("llama_cpp") is None:  # the GPU image has none: skip the comparisons
            self.env["HETERO_WITHOUT_ORACLE"] = "1"
        self.results: list[Result] = []

    # -- running a stage -------------------------------------------------------------------
    def limit(self, stage: str) -> float:
        later = list(LIMITS)[list(LIMITS).index(stage) + 1 :]
        spare = self.deadline - time.monotonic() - sum(FLOOR[s] for s in later)
        return max(0.0, min(LIMITS[stage], spare))

    def sh(self, stage: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run one command of a stage; its output goes to log.txt. Raises TimeoutError."""
        self.log.write(f"\n### {stage}: {' '.join(argv)}\n")
        self.log.flush()
        try:
            run = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.log.write(_text(e.stdout) + _text(e.stderr) + f"\n[timed out after {timeout:.0f} s]\n")
            raise TimeoutError(f"timed out after {timeout:.0f} s") from None
        self.log.write(run.stdout + run.stderr)
        self.log.flush()
        return run

    def stage(self, name: str, body) -> Result:
        result = Result(name)
        budget = self.limit(name)
        t0 = time.monotonic()
        if budget < 5:
            result.status, result.summary = "skipped", "no time left in the budget"
        else:
            try:
                result.summary, result.data = body(lambda: budget - (time.monotonic() - t0))
                result.status = "ok"
            except TimeoutError as e:
                result.status, result.summary = "timeout", str(e)
            except Exception as e:  # a stage's failure is a result, not the end of the kit
                result.status, result.summary = "failed", f"{type(e).__name__}: {e}"[:300]
        result.seconds = round(time.monotonic() - t0, 1)
        self.results.append(result)
        print(f"[{result.stage}] {result.status} in {result.seconds} s: {result.summary}", flush=True)
        return result

    # -- the stages ------------------------------------------------------------------------
    def install(self, left):
        py = sys.executable
        notes = []
        wheels = sorted(self.wheels.glob("*.whl")) if self.wheels.is_dir() else []
        if self.cpu:
            notes.append("pip skipped (--cpu: this environment is installed)")
        else:
            if wheels:
                args = ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                        "--upgrade", "--target", str(SITE), *map(str, wheels)]  # fmt: skip
                _check(self.sh("install", [py, *args], left()), "installing the carried wheels")
                notes.append(f"{len(wheels)} carried wheel(s)")
            run = self.sh("install", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                      "--no-build-isolation", "-e", "."], left())  # fmt: skip
            notes.append("hetero installed -e --no-deps" if run.returncode == 0 else "hetero from PYTHONPATH")
        probe = (
            "import json, torch, numba, gguf, tokenizers, hetero\n"
            "try:\n import triton; tv = triton.__version__\nexcept ImportError: tv = None\n"
            "try:\n import llama_cpp; lv = llama_cpp.__version__\nexcept ImportError: lv = None\n"
            "cuda = torch.cuda.is_available()\n"
            "print(json.dumps({'torch': torch.__version__, 'triton': tv, 'numba': numba.__version__,"
            " 'tokenizers': tokenizers.__version__, 'llama_cpp': lv, 'cuda': cuda,"
            " 'device': torch.cuda.get_device_name(0) if cuda else 'CPU (standing in)',"
            " 'sms': torch.cuda.get_device_properties(0).multi_processor_count if cuda else None}))"
        )
        run = _check(self.sh("install", [py, "-c", probe], left()), "importing hetero and its dependencies")
        versions = json.loads(run.stdout.strip().splitlines()[-1])
        if not self.cpu and not versions["cuda"]:
            raise RuntimeError("torch sees no CUDA device")
        return f"{versions['device']}; torch {versions['torch']}, triton {versions['triton']}; {', '.join(notes)}", {
            "versions": versions
        }

    def models(self, left):
        made = {}
        for key, spec in (("gpu", self.sizes.gpu_model), ("hybrid", self.sizes.hybrid_model)):
            path = self.work / f"{key}.gguf"
            _check(self.sh("models", self.hetero("synth", str(path), *spec), left()), f"writing the {key} model")
            made[key] = path
        sizes = {k: round(p.stat().st_size / 2**20, 1) for k, p in made.items()}
        self.model_paths = made
        return f"{', '.join(f'{k} {v} MiB' for k, v in sizes.items())} (hetero's quantizer)", {"mib": sizes}

    def tests(self, left):
        xml = self.work / "tests.xml"
        argv = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={xml}",
                *self.sizes.tests]  # fmt: skip
        run = self.sh("tests", argv, left())
        counts = _junit_counts(xml)
        if run.returncode not in (0, 1) or not counts:
            raise RuntimeError(f"pytest exited {run.returncode}: {run.stdout[-300:]}")
        summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        if counts.get("failed") or counts.get("errors"):
            raise RuntimeError(f"{summary}; the failing tests are in log.txt")
        return summary, counts

    def kernels(self, left):
        out = self.work / "kernels.json"
        argv = [sys.executable, "benchmarks/gpu_kernels.py", *self.sizes.kernels, "--json", str(out)]
        _check(self.sh("kernels", argv, left()), "benchmarks/gpu_kernels.py")
        data = json.loads(out.read_text())
        return _kernel_summary(data), data

    def bench_gpu(self, left):
        model = self.model_paths["gpu"]
        argv = self.hetero("bench", str(model), "--gpu-mem", self.sizes.gpu_mem_full, *self.sizes.bench, "--json")
        data = json.loads(_check(self.sh("bench-gpu", argv, left()), "hetero bench").stdout)
        return _bench_summary(data), data

    def bench_hybrid(self, left):
        model = self.model_paths["hybrid"]
        argv = self.hetero("bench", str(model), "--gpu-mem", "24GiB", "--override", "exps=cpu", "--profile",
                           *self.sizes.bench, "--json")  # fmt: skip
        data = json.loads(_check(self.sh("bench-hybrid", argv, left()), "hetero bench --profile").stdout)
        prof = data.get("profile") or {}
        return f"{_bench_summary(data)}; step {prof.get('step_ms', 0):.2f} ms, {prof.get('bound', '?')}-bound", data

    def bench_roads(self, left):
        model, data = self.model_paths["hybrid"], {}
        for road in ("cpu", "gpu"):
            argv = self.hetero("bench", str(model), "--gpu-mem", "24GiB", "--override", "exps=cpu", "--prefill-road",
                               road, *self.sizes.bench, "--json")  # fmt: skip
            data[road] = json.loads(_check(self.sh("bench-roads", argv, left()), f"hetero bench ({road} road)").stdout)
        parts = [f"{road} road prefill {d['prefill_tok_s']:.3g} tok/s ({d['measured_over_predicted']['prefill']:.2f}x "
                 "predicted)" for road, d in data.items()]  # fmt: skip
        crossover = data["cpu"]["predicted"]["prefill_crossover_tokens"]
        return "; ".join(parts) + f"; planned crossover {crossover or 'never'}", data

    def hetero(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cli.main", *args]

    # -- the whole run ---------------------------------------------------------------------
    def run(self, only: set[str]) -> int:
        self.model_paths = {}
        bodies = {"install": self.install, "models": self.models, "tests": self.tests, "kernels": self.kernels,
                  "bench-gpu": self.bench_gpu, "bench-hybrid": self.bench_hybrid,
                  "bench-roads": self.bench_roads}  # fmt: skip
        if only & {"bench-gpu", "bench-hybrid", "bench-roads"}:
            only |= {"models"}  # the benchmarks run on the models it writes
        if only:
            only |= {"install"}  # every stage imports what it installs (a fresh machine has no gguf)
        for name, body in bodies.items():
            if only and name not in only:
                continue
            if name.startswith("bench") and not self.model_paths:
                self.results.append(Result(name, "skipped", 0.0, "no models (see the models stage)"))
            else:
                self.stage(name, body)
        report = {
            "mode": "cpu" if self.cpu else "gpu",
            "host": platform.node(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "results": [asdict(r) for r in self.results],
        }
        (self.out / "results.json").write_text(json.dumps(report, indent=1))
        table = _markdown(self.results)
        (self.out / "results.md").write_text(table + "\n")
        self.log.close()
        print("\n" + table)
        return 0 if all(r.status == "ok" for r in self.results) else 1


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _check(run: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if run.returncode != 0:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{what} exited {run.returncode}: {tail[0][:200]}")
    return run


def _junit_counts(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not xml.exists():
        return {}
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    total = int(suite.get("tests", 0))
    counts = {k: int(suite.get(k, 0)) for k in ("failures", "errors", "skipped")}
    return {"passed": total - sum(counts.values()), "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"]}  # fmt: skip


def _kernel_summary(data: dict) -> str:
    """Share of the device copy's bandwidth reached: the GEMVs in GPU formats (median, lowest),
    torch's bf16 GEMV on the same shapes as the peer, the gathered experts, MLA attention."""
    rows = data.get("rows", [])
    ours = [r for r in rows if r["name"].endswith(("Q4_K", "Q6_K", "Q8_0"))]
    peer = sorted(r["of_copy"] for r in rows if r["name"].endswith("bf16 torch"))
    if not ours:
        return "no GEMV rows"
    shares = sorted(r["of_copy"] for r in ours)
    worst = min(ours, key=lambda r: r["of_copy"])
    rest = "; ".join(f"{r['name']} {r['of_copy']:.0%}" for r in rows if r["name"].startswith(("8 experts", "MLA")))
    return (f"copy {data.get('copy_gb_s', 0):.0f} GB/s; GEMV median {shares[len(shares) // 2]:.0%} of it, "
            f"lowest {worst['of_copy']:.0%} ({worst['name']}); torch bf16 median {peer[len(peer) // 2]:.0%}; "
            f"{rest}")  # fmt: skip


def _bench_summary(data: dict) -> str:
    return f"prefill {data.get('prefill_tok_s', 0):.1f} tok/s, decode {data.get('decode_tok_s', 0):.1f} tok/s"


def _markdown(results: list[Result]) -> str:
    lines = ["| stage | result | seconds | figures |", "|---|---|---|---|"]
    lines += [f"| {r.stage} | {r.status} | {r.seconds} | {r.summary.replace('|', '/')} |" for r in results]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes, the CPU standing in for the GPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="results folder")
    ap.add_argument("--work", help="folder for models and caches (default: a new temporary one)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole kit")
    ap.add_argument("--wheels", default=".whl", help="folder of carried wheels (GPU machine)")
    ap.add_argument("--only", default="", help=f"comma-separated stages to run (of {', '.join(LIMITS)})")
    args = ap.parse_args()
    only = {s for s in args.only.split(",") if s}
    if only - set(LIMITS):
        ap.error(f"--only: unknown stage(s) {', '.join(sorted(only - set(LIMITS)))}")
    return Kit(args).run(only)


if __name__ == "__main__":
    sys.exit(main())
