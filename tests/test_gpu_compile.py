"""The Triton kernels compiled for an H100 (sm_90) ahead of time, here, without a GPU.

The interpreter checks what the kernels compute; this checks what a GPU would run: that
they compile at all (the interpreter accepts code the compiler rejects), that every decode
kernel reads its weights in 16-byte vector loads (the tiled formats' point: anything
narrower caps a GEMV far below HBM bandwidth), and that prefill's GEMM runs on tensor cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ptx_counts() -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_ptx.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _loads16(counts: dict[str, int]) -> int:
    return sum(n for ins, n in counts.items() if ins.startswith("ld.global") and ".v4." in ins)


def test_decode_kernels_load_weights_16_bytes_at_a_time(ptx_counts):
    decode = {k: v for k, v in ptx_counts.items() if k.endswith(("gemv", "gathered"))}
    # int4, int8 (Q8_0, Q6_K, grid, with min, per 32) x gemv, 8-token gemv, gathered; float16 and
    # bfloat16 stacks (W_UK derived from a joint kv_b)
    assert len(decode) == 20
    for name, counts in decode.items():
        assert _loads16(counts) >= 1, (name, counts)
        assert not any("mma" in ins for ins in counts), (name, counts)  # GEMV: no tensor cores to wait for


def test_prefill_gemm_runs_on_tensor_cores(ptx_counts):
    gemm = {k: v for k, v in ptx_counts.items() if k.endswith("gemm")}
    assert len(gemm) == 6
    for name, counts in gemm.items():
        assert any("mma" in ins for ins in counts), (name, counts)
        assert any(ins.startswith("cp.async") for ins in counts), (name, counts)  # tiles staged asynchronously


def test_mla_decode_attention_compiles_with_a_device_side_length(ptx_counts):
    for name in ("mla decode", "mla decode bf16 cache"):
        counts = ptx_counts[name]
        assert _loads16(counts) + sum(n for ins, n in counts.items() if ins.startswith("cp.async")) > 0, name


def test_no_kernel_spills_registers(ptx_counts):
    """A spill goes to local memory, i.e. to HBM traffic the bandwidth figures never see."""
    assert {name: c["spill stack bytes"] for name, c in ptx_counts.items() if c["spill stack bytes"]} == {}
