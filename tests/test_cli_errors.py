"""Every kind of broken input, fed to info, plan and chat: one line, exit code 2, no traceback,
bounded time and memory (each run is a real process)."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

PROBE = (
    "import resource, subprocess, sys, json;"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=120);"
    "print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr,"
    " 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))"
)


def gguf_with(path, arch: str, tensor_type=GGMLQuantizationType.F32):
    w = GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", 1)
    shape = (8, 256)
    if tensor_type == GGMLQuantizationType.F32:
        w.add_tensor("blk.0.attn_norm.weight", np.ones(shape, dtype=np.float32))
    else:  # declare a type hetero does not read, with its block size in bytes
        size = GGML_QUANT_SIZES[tensor_type][1]
        w.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((8, size), dtype=np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def broken(tmp_path_factory, synth):
    d = tmp_path_factory.mktemp("broken")
    good = synth("tiny", "Q4_K_M").read_bytes()
    files = {
        "missing": (d / "absent.gguf", "no such file"),
        "directory": (d, "is not a file"),
        "not gguf": (d / "notes.gguf", "not a GGUF file"),
        "truncated data": (d / "cut.gguf", "truncated"),
        "truncated header": (d / "head.gguf", "corrupt or truncated GGUF header"),
        "hostile counts": (d / "hostile.gguf", "absurd counts"),
        "hostile string": (d / "string.gguf", "runs past the end"),
        "overflowing dims": (d / "dims.gguf", "has dimensions (549755813888, 549755813888)"),
        "architecture": (gguf_with(d / "llama.gguf", "llama"), "unsupported architecture 'llama'"),
        "quant type": (
            gguf_with(d / "tq1.gguf", "deepseek2", GGMLQuantizationType.TQ1_0),
            "unsupported quant type TQ1_0 in tensor blk.0.ffn_up_exps.weight",
        ),
    }
    (d / "notes.gguf").write_text("just some text, not a model\n" * 10)
    (d / "cut.gguf").write_bytes(good[: len(good) // 2])
    (d / "head.gguf").write_bytes(good[:5000])
    (d / "hostile.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62) + b"\0" * 64)
    (d / "string.gguf").write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**63) + b"\0" * 64)
    name = b"blk.0.attn_norm.weight"  # 2**39 x 2**39 values: each dimension plausible, the product not
    tensor = struct.pack("<Q", len(name)) + name + struct.pack("<IQQIQ", 2, 2**39, 2**39, 0, 0)
    (d / "dims.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + tensor + b"\0" * 64)
    return files


CASES = ["missing", "directory", "not gguf", "truncated data", "truncated header", "hostile counts",
         "hostile string", "overflowing dims", "architecture", "quant type"]  # fmt: skip


@pytest.mark.parametrize("command", ["info", "plan", "chat"])
@pytest.mark.parametrize("case", CASES)
def test_broken_input_is_one_line_and_exit_2(broken, command, case):
    path, message = broken[case]
    args = [sys.executable, "-m", "cli.main", command, str(path)]
    if command == "chat":
        args += ["--prompt", "hi"]
    r = json.loads(subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True).stdout)
    output = (r["out"] + r["err"]).strip()
    assert r["rc"] == 2, output
    assert message in output and "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert r["rss"] < 1.5 * 2**30


def test_plan_that_does_not_fit_is_exit_2(synth):
    args = [
        sys.executable,
        "-m",
        "cli.main",
        "chat",
        str(synth("tiny", "Q4_K_M")),
        "--gpu-mem",
        "1MiB",
        "--prompt",
        "x",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "the plan does not fit" in r.stderr and "Traceback" not in r.stderr
