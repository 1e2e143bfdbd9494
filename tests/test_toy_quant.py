"""Adding a quant type touches only its declaration (tests/toy_quant.py declares ggml's Q8_1
layout, which hetero does not run, and nothing else): read, planned, multiplied by the CPU
engine, the native step and the reference path, each checked against its oracle."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_toy_quant_type_runs_from_its_declaration_alone(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "kernels")}  # the toy's own compiled kernels
    run = subprocess.run([sys.executable, "-m", "tests.toy_quant", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["engine_code"] >= 10  # after the ten built-in engine types
    assert r["matmul_error_over_bound"] <= 2e-6  # the bound test_cpu_kernels holds every type to
    assert r["cpu_backends"] == ["cpu-engine"] and r["built"] == ["cpu-engine"]
    assert r["planned_bytes_match"] and r["executor"] == "native"
    # The native step runs the toy's kernel bit for bit. (Whole-model native against eager is
    # no oracle for an int8-activation type: float-order differences flip roundings, 1e-3..1e-2.)
    assert r["native_dispatch_exact"] and r["native_decode_finite"]
    assert r["reference_backends"] == ["reference"]
    # The toy's dequantize with float activations against the engine's int8 activations: 1.6%
    # measured (activation rounding through three layers); a wrong scale or offset is O(1).
    assert r["engine_vs_reference"] < 5e-2
    assert r["gpu_backends"] == ["reference"] and r["gpu_warns"]  # no GPU format declared: said so
