"""The GPU check kit runs here with the CPU standing in, so it cannot rot between GPU loans."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_kit_runs_every_stage_with_the_cpu_standing_in(tmp_path):
    from cpu_ops.kernel_cache import cache_dir as _cache_dir

    env = {**os.environ, "NUMBA_CACHE_DIR": str(_cache_dir())}  # the suite's compiled kernels
    env.pop("TRITON_INTERPRET", None)  # as run by hand: conftest sets it for this process only
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    stages = {r["stage"]: r for r in report["results"]}
    assert list(stages) == ["install", "models", "tests", "kernels", "bench-gpu", "bench-hybrid", "bench-roads"]
    assert all(r["status"] == "ok" for r in stages.values()), run.stdout[-3000:]
    assert run.returncode == 0
    assert stages["tests"]["data"]["passed"] >= 3 and stages["kernels"]["data"]["rows"]
    assert stages["bench-hybrid"]["data"]["profile"]["layers"]  # the hybrid timeline came back
    roads = stages["bench-roads"]["data"]
    assert [roads[r]["prefill_road"] for r in ("cpu", "gpu")] == ["cpu", "gpu"] and roads["gpu"]["prefill_tok_s"] > 0
    table = (out / "results.md").read_text()
    assert table.startswith("| stage |") and run.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])
    assert (out / "log.txt").stat().st_size > 0


def test_a_stage_that_fails_leaves_the_others_results(tmp_path):
    """A broken stage is a row of the table, not the end of the kit: here the models cannot be
    written (a folder stands where the file goes), so the benchmark that needs them is skipped."""
    (tmp_path / "work" / "gpu.gguf").mkdir(parents=True)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(out), "--work", str(tmp_path / "work"),
         "--only", "install,bench-gpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    stages = {r["stage"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert [stages[s]["status"] for s in ("install", "models", "bench-gpu")] == ["ok", "failed", "skipped"]
    assert run.returncode == 1 and "| models | failed |" in (out / "results.md").read_text()
