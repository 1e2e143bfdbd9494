"""The command line: synth and info end to end, errors as one line with exit code 2."""

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from hetero.synth.presets import make_preset
from hetero.synth.writer import preset_config
from modelfile.deepseek2_tensors import expected_tensors

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


@pytest.mark.parametrize("header_only", [True, False])
def test_synth_writes_the_joint_kv_b_layout_on_request(tmp_path, header_only):
    """--joint-kv-b: the layout of files converted before llama.cpp split attn_kv_b (the first
    R1 releases); the file reads as that layout, header-only or with weights."""
    from modelfile.config import config_from_metadata
    from modelfile.gguf_file import GGUFModelFile

    out = tmp_path / "joint.gguf"
    size = ["--preset", "r1", "--header-only", "--layers", "4"] if header_only else ["--preset", "tiny"]
    r = runner.invoke(app, ["synth", str(out), *size, "--quant", "Q4_K_M", "--joint-kv-b"])
    assert r.exit_code == 0, r.output
    f = GGUFModelFile(out)
    assert not config_from_metadata(f.metadata).split_kv_b
    assert "blk.0.attn_kv_b.weight" in f.tensors and "blk.0.attn_k_b.weight" not in f.tensors


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


def test_plan_over_ram_warns_and_no_overcommit_refuses(synth):
    path = str(synth("v2-lite", "Q4_K_M", n_layer=2))
    r = runner.invoke(app, ["plan", path, "--ram", "64MiB", "--cpu-bw", "20GB/s"])
    assert r.exit_code == 0 and "warning:" in r.output and "from disk" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["plan", path, "--ram", "64MiB", "--cpu-bw", "20GB/s", "--no-overcommit"])
    assert r.exit_code == 2 and "does not fit" in r.output and "CPU RAM" in r.output


def test_plan_says_no_gpu_was_detected(synth):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = runner.invoke(app, ["plan", str(synth("tiny", "Q8_0")), "--gpu-mem", "24GiB", "--cpu-bw", "20GB/s"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "no GPU detected" in text and "assumed RTX 4090-class" in text, text


def test_plan_demo_and_bench_use_one_cached_cpu_bandwidth(synth, tmp_path, keep_torch_threads, monkeypatch):
    """One figure for the machine, whichever command predicts: the cached one, shown with its method."""
    from placement.hardware import detect
    from placement.measured import cached_cpu_bandwidth

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = detect(measure_cpu=False)
    cached_cpu_bandwidth(here.ram, here.numa_nodes, lambda: (12.345e9, "a probe written by the test"))
    path = str(synth("tiny", "Q8_0"))
    plan = runner.invoke(app, ["plan", path, "--json"])
    assert json.loads(plan.stdout)["hardware"]["cpu_bw"] == 12.345e9
    bench = runner.invoke(app, ["bench", path, "--device", "cpu", "--reps", "1", "--gen-tokens", "2", "--json"])
    assert json.loads(bench.stdout)["cpu_read_bandwidth_gb_s"] == 12.345
    demo = runner.invoke(app, ["demo", path, "--max-tokens", "2"])
    text = " ".join(demo.output.split())
    assert demo.exit_code == 0 and "CPU 12 GB/s" in text and "a probe written by the test" in text, text


def test_help_shows_every_default_and_the_rules_format():
    """An option without a value of its own says what it falls back to; flags are plain flags;
    synth lists every preset and type it writes; plan documents the rules file."""
    import typer

    from hetero.synth.presets import PRESETS
    from hetero.synth.writer import QUANTS

    group = typer.main.get_command(app)
    unclear = []
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name != "option" or param.name == "help":
                continue
            if param.is_flag and (param.default is not False or param.secondary_opts):
                unclear.append((name, param.name))
            elif not param.is_flag and param.default is None and not isinstance(param.show_default, str):
                unclear.append((name, param.name))
    assert not unclear
    synth_help = " ".join(runner.invoke(app, ["synth", "--help"], env={"COLUMNS": "200"}).output.split())
    assert all(p in synth_help for p in PRESETS) and all(q in synth_help for q in QUANTS)
    plan_help = runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "200"}).output
    assert "[[rule]]" in plan_help and "match = " in plan_help and "device = " in plan_help
