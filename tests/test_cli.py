"""The command line: synth and info end to end, errors as one line with exit code 2."""

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from hetero.models.deepseek2_tensors import expected_tensors
from hetero.synth.presets import make_preset
from hetero.synth.writer import preset_config

runner = CliRunner()


def test_synth_then_info(tmp_path):
    out = tmp_path / "t.gguf"
    r = runner.invoke(app, ["synth", str(out), "--preset", "tiny", "--quant", "Q4_K_M", "--layers", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["architecture"] == "deepseek2" and info["layers"] == 2
    assert "Q4_K" in info["quant_types"] and info["by_kind"]["routed experts"]["tensors"] == 3
    # 1 MoE layer of 8 experts, top-2: a quarter of the routed parameters are active.
    routed = info["by_kind"]["routed experts"]["params"]
    rest = info["total_params"] - routed - info["by_kind"]["embedding"]["params"]
    assert info["active_params_per_token"] == rest + routed // 4 + 256


@pytest.mark.parametrize("args", [["info", "/nonexistent.gguf"], ["demo", "/nonexistent.gguf"]])
def test_errors_are_one_line_exit_2(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no such file" in lines[0] and "Traceback" not in r.output


def test_v2_lite_preset_has_the_published_shapes():
    shapes = expected_tensors(preset_config(make_preset("v2-lite")))
    assert len([n for n in shapes if n.startswith("blk.")]) // 27 >= 10
    assert shapes["token_embd.weight"] == (102400, 2048)
    assert shapes["blk.0.ffn_gate.weight"] == (10944, 2048)
    assert shapes["blk.1.ffn_gate_exps.weight"] == (64, 1408, 2048)
    assert shapes["blk.1.ffn_down_shexp.weight"] == (2048, 2816)
    assert shapes["blk.1.attn_q.weight"] == (16 * 192, 2048)
    assert shapes["blk.1.attn_kv_a_mqa.weight"] == (576, 2048)
    assert shapes["blk.1.attn_k_b.weight"] == (16, 512, 128)
    assert shapes["blk.26.attn_output.weight"] == (2048, 16 * 128)


@pytest.fixture
def keep_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_json_reports_medians_runs_and_prediction(synth, keep_torch_threads):
    path = synth("tiny", "Q4_K_M")
    args = ["bench", str(path), "--device", "cpu", "--threads", "1", "--prompt-tokens", "8", "--gen-tokens", "3"]
    r = runner.invoke(app, [*args, "--reps", "3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out["prefill_tok_s_runs"]) == len(out["decode_tok_s_runs"]) == 3
    assert sorted(out["decode_tok_s_runs"])[1] == out["decode_tok_s"] > 0 and out["prefill_tok_s"] > 0
    assert out["predicted"]["bound"] == "cpu" and out["predicted"]["decode_tok_s"] > 0
    assert out["decode_weight_bytes_per_token"]["gpu"] == 0 and out["threads"] == 1 and out["numa_nodes"] == 1
    r = runner.invoke(app, [*args, "--numa", "sometimes"])
    assert r.exit_code == 2 and "--numa sometimes" in r.output
    r = runner.invoke(app, [*args[:2], "--prompt-tokens", "5000", "--gen-tokens", "1"])
    assert r.exit_code == 2 and "exceed the context" in r.output


def test_bench_profile_shows_each_hand_off_layer(synth, keep_torch_threads, monkeypatch):
    """Dense parts on the CPU standing in for the GPU, experts on the CPU engine: one timeline
    row per MoE layer; a CPU-only plan has no hybrid step to profile."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path = synth("tiny", "Q8_0")
    args = ["bench", str(path), "--threads", "1", "--prompt-tokens", "4", "--gen-tokens", "3", "--reps", "1"]
    r = runner.invoke(app, [*args, "--gpu-mem", "8GiB", "--override", "exps=cpu", "--profile", "--json"])
    assert r.exit_code == 0, r.output
    prof = json.loads(r.stdout)["profile"]
    assert [row["layer"] for row in prof["layers"]] == [1, 2] and prof["steps"] == 8
    assert all(row["gpu_ms"] > 0 and row["cpu_ms"] > 0 and row["wait_ms"] >= 0 for row in prof["layers"])
    assert prof["step_ms"] > 0 and prof["bound"] in ("cpu", "gpu")  # medians of parts need not sum below the step's
    r = runner.invoke(app, [*args, "--gpu-mem", "8GiB", "--override", "exps=cpu", "--profile"])
    shown = " ".join(r.output.split())  # rich wraps at the terminal width
    assert r.exit_code == 0 and "waiting for CPU" in shown and "CPU standing in" in shown
    r = runner.invoke(app, [*args, "--device", "cpu", "--profile"])
    assert r.exit_code == 2 and "puts nothing on the GPU" in r.output


def test_the_run_says_which_paths_it_took(synth, keep_torch_threads):
    import hetero
    from cli.main import engine_name
    from placement.rules import parse_override

    path = synth("tiny", "Q8_0")
    assert engine_name(hetero.load_model(path, threads=1)) == "CPU engine, 1 thread"
    hybrid = hetero.load_model(path, threads=1, gpu_mem="8GiB", rules=[parse_override("exps=cpu")])
    assert engine_name(hybrid) == "CPU engine, 1 thread; the GPU's part on the CPU standing in for a GPU"
