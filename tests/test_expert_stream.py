"""The GPU road of a prompt's CPU-resident experts (gpu_ops/staging.py), on the CPU standing in
for the GPU, and the planner's choice between the two roads (placement/predict.py)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import logits_in_chunks, random_prompt
from typer.testing import CliRunner

import gpu_ops.staging as staging
import hetero
from cli.main import app
from hetero.model import default_plan
from modelfile.families import family_of
from modelfile.gguf_file import GGUFModelFile
from placement import predict
from placement.hardware import detect, with_overrides
from placement.planner import STAGING_DECODE_LOSS, longest_chunk, make_plan, plan_model
from placement.rules import parse_override


def plan_config(file):
    return family_of(file.metadata).config(file.metadata)


def _crossing_at(plan, tokens: int):
    return dataclasses.replace(plan, prediction=dataclasses.replace(plan.prediction, prefill_crossover_tokens=tokens))


def _streamed_layers(model, monkeypatch) -> list[int]:
    """Records which layer banks the stream runs, pass after pass."""
    seen = []
    run = staging.ExpertStream.run
    monkeypatch.setattr(staging.ExpertStream, "run", lambda self, bank, *a: seen.append(bank) or run(self, bank, *a))
    return seen


@pytest.mark.parametrize("slot", ["one expert", "whole layer"])
@pytest.mark.parametrize("engine", [False, True], ids=["reference experts", "engine experts"])
def test_the_gpu_road_equals_the_cpu_road(synth, monkeypatch, slot, engine):
    """Q4_K_M experts (Q4_K gate/up, Q6_K and Q4_K downs) in CPU RAM, the dense part on the
    stand-in GPU: a prompt whose experts are streamed to the device equals the CPU road that
    multiplies the same dequantized weights in float32 (the reference path), to 1e-5 of the
    largest logit, whichever backend the plan built the banks for (the road reads the file's
    bytes), with one expert per copy (many copies a layer, the next layer's first one issued
    while this layer's last one runs) or a layer per copy."""
    if slot == "one expert":
        monkeypatch.setattr(staging, "SLOT_BYTES", 1)
    file = GGUFModelFile(synth("tiny", "Q4_K_M"))
    rules = [parse_override("exps=cpu")]
    plan = default_plan(file, gpu_mem="8GiB", rules=rules, cpu_kernels=engine)
    road = hetero.load_model(file, plan=_crossing_at(plan, 1), cpu_kernels=engine)
    reference = default_plan(file, gpu_mem="8GiB", rules=rules, cpu_kernels=False)
    cpu = hetero.load_model(file, plan=_crossing_at(reference, 0), cpu_kernels=False)
    assert cpu.net.expert_stream is None and road.net.expert_stream is not None
    units = road.net.expert_stream.units
    assert len(units) == (16 if slot == "one expert" else 2)  # tiny: 2 MoE layers of 8 experts
    seen = _streamed_layers(road, monkeypatch)
    for _ in range(2):
        ids = random_prompt(24, road.tokenizer.bos_id)
        ref = cpu.logits(ids)
        np.testing.assert_allclose(road.logits(ids), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert seen == [0, 1, 0, 1]


def test_fused_shared_experts_ride_beside_the_road(synth, monkeypatch):
    """Where the plan fuses the shared experts into the CPU hand-off, the road runs the routed
    ones on the device while the CPU workers run the shared ones: F32 weights on the engine
    (exact but for summation order), so the road equals the CPU road to 1e-5."""
    file = GGUFModelFile(synth("tiny", "F32", n_expert_used=8))
    rules = [parse_override("exps=cpu"), parse_override("shexp=cpu")]
    plan = default_plan(file, gpu_mem="8GiB", rules=rules)
    assert plan.fused_shared_layers
    road = hetero.load_model(file, plan=_crossing_at(plan, 1))
    cpu = hetero.load_model(file, plan=_crossing_at(plan, 0))
    seen = _streamed_layers(road, monkeypatch)
    ids = random_prompt(20, road.tokenizer.bos_id)
    ref = cpu.logits(ids)
    np.testing.assert_allclose(road.logits(ids), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert seen == [0, 1]


def test_chunks_on_both_sides_of_the_crossover_equal_one_pass(synth, monkeypatch):
    """With the crossover at 5 tokens, a prompt in chunks of 1-9 tokens takes the CPU road for
    the short ones and the GPU road for the long ones; the logits equal one pass (F32 weights,
    a float32 cache: only summation order differs)."""
    file = GGUFModelFile(synth("tiny", "F32", n_expert_used=8))
    plan = default_plan(file, gpu_mem="8GiB", rules=[parse_override("exps=cpu")])
    model = hetero.load_model(file, plan=_crossing_at(plan, 5))
    model.net.cache_dtype = torch.float32
    seen = _streamed_layers(model, monkeypatch)
    rng = np.random.default_rng()
    ids = random_prompt(60, model.tokenizer.bos_id)
    whole = model.logits(ids)
    chunked = logits_in_chunks(model, ids, rng)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    assert 2 < len(seen) and seen.count(0) == seen.count(1)


def test_a_layer_asked_for_out_of_order_is_an_error(synth):
    """The copies run ahead in layer order; a pass that skipped or repeated a layer would
    compute with another layer's experts (or none), so the stream refuses instead."""
    file = GGUFModelFile(synth("tiny", "Q8_0"))
    plan = default_plan(file, gpu_mem="8GiB", rules=[parse_override("exps=cpu")])
    stream = hetero.load_model(file, plan=_crossing_at(plan, 1)).net.expert_stream
    width = stream.banks[0][0][2]  # the model's width, gate's row
    x, ids, weights = torch.randn(3, width), torch.randint(0, 8, (3, 2)), torch.rand(3, 2)
    stream.begin()
    with pytest.raises(RuntimeError, match="layer bank 1 asked for, 0 expected"):
        stream.run(1, x, ids, weights)
    stream.begin()
    stream.run(0, x, ids, weights)
    with pytest.raises(RuntimeError, match="layer bank 0 asked for, 1 expected"):
        stream.run(0, x, ids, weights)


@pytest.fixture
def r1_hardware():
    """A server for R1's header: an H100 on PCIe 4.0, 512 GiB of DDR5 on 8 channels, 32 cores
    at a fixed engine rate of 5 GMAC/s each (not this machine's measurement, so the numbers
    below are stable; slow enough that streaming wins from a few hundred tokens)."""
    hw = with_overrides(detect(measure_prefill=False), gpu="h100", cpu_bw="ddr5-4800x8", ram="512GiB")
    return dataclasses.replace(hw, cpu_cores=32, cpu_macs=160e9)


def test_the_crossover_is_where_the_gpu_road_becomes_faster(r1_header, r1_hardware, monkeypatch):
    """R1 with its experts in RAM: the plan's crossover is the smallest chunk whose prefill is
    faster streamed (checked on both sides of it), a faster link moves it down, a GPU that
    holds every expert or no GPU has no road, and the staging is reserved on both sides."""
    terms = []
    seconds = predict.prefill_seconds
    monkeypatch.setattr(predict, "prefill_seconds", lambda t, *a, **k: terms.append(t) or seconds(t, *a, **k))
    file = GGUFModelFile(r1_header[0])
    plan = plan_model(file, r1_hardware)
    n = plan.prediction.prefill_crossover_tokens
    assert 16 < n <= longest_chunk(family_of(file.metadata), plan_config(file), plan.ctx)
    hw = plan.hardware
    experts = (plan_config(file).n_expert, plan_config(file).n_expert_used)
    at = {t: (seconds(terms[-1], t, hw, experts, True), seconds(terms[-1], t, hw, experts, False)) for t in (n - 1, n)}
    assert at[n][0] < at[n][1] and at[n - 1][0] >= at[n - 1][1]
    cfg = plan_config(file)
    matrix = cfg.n_ff_expert * cfg.n_embd  # values of one expert's gate: R1's matrices are all this size
    staged = 2 * staging.SLOT_BYTES + 3 * matrix * 4 + staging.DEQUANTIZE_CHUNK_VALUES * staging.DEQUANTIZE_BYTES
    staged += longest_chunk(family_of(file.metadata), cfg, plan.ctx) * (5 * cfg.n_embd + 3 * cfg.n_ff_expert) * 4
    assert dict(plan.reserved)["prefill staging"] == staged and plan.prefill_host_bytes > 2 * staging.SLOT_BYTES
    link = plan_model(file, dataclasses.replace(r1_hardware, pcie_bw=4 * r1_hardware.pcie_bw)).prediction
    assert 0 < link.prefill_crossover_tokens < n
    fast_cpu = plan_model(file, dataclasses.replace(r1_hardware, cpu_macs=640e9))
    assert fast_cpu.prediction.prefill_crossover_tokens == 0 < fast_cpu.prediction.prefill_gpu_road_tok_s
    assert "prefill staging" not in dict(fast_cpu.reserved)  # a road never taken reserves nothing
    roomy = plan_model(file, with_overrides(r1_hardware, gpu_mem="1000GiB"))
    cpu_only = plan_model(file, with_overrides(r1_hardware, gpu_mem="0"))
    for other in (roomy, cpu_only):
        assert other.prediction.prefill_crossover_tokens == 0 and "prefill staging" not in dict(other.reserved)
        assert other.prediction.prefill_gpu_road_tok_s == 0


def test_staging_never_costs_a_plan_its_fit(r1_header, r1_hardware):
    """Budgets around where R1's dense part stops fitting, and with room for expert layers,
    and RAM just short of the staging's pinned slots: a plan with the staging fits and reads
    from disk as the plan made without it does, and decodes at most STAGING_DECODE_LOSS
    slower. A plan made again without it keeps the file's unused tensors listed; rules that
    send every weight to the CPU get no staging."""
    file = GGUFModelFile(r1_header[0])
    cfg = plan_config(file)
    tensors = {**file.tensors, "junk.thing": next(iter(file.tensors.values()))}
    streamed = 0
    for gib in (*np.arange(14.0, 17.0, 0.25), 40, 80):
        hw = with_overrides(r1_hardware, gpu_mem=f"{gib}GiB")
        with_staging = make_plan(cfg, tensors, hw, 4096)
        without = make_plan(cfg, tensors, hw, 4096, streaming=False)
        assert with_staging.fits == without.fits and with_staging.ignored == ("junk.thing",), gib
        ours, theirs = with_staging.prediction, without.prediction
        assert ours.disk_bytes_per_token <= theirs.disk_bytes_per_token, gib
        assert ours.decode_tok_s >= theirs.decode_tok_s * (1 - STAGING_DECODE_LOSS), gib
        streamed += bool(with_staging.prediction.prefill_crossover_tokens)
    assert streamed  # some of them stream
    without = make_plan(cfg, tensors, r1_hardware, 4096, streaming=False)
    short = dataclasses.replace(r1_hardware, ram=without.used_bytes("cpu") + (32 << 20))
    tight = make_plan(cfg, tensors, short, 4096, overcommit=False)
    assert tight.fits and not tight.prediction.prefill_crossover_tokens and tight.ignored == ("junk.thing",)
    all_cpu = make_plan(cfg, tensors, r1_hardware, 4096, rules=[parse_override(".*=cpu")])
    assert not all_cpu.prediction.prefill_crossover_tokens  # the rules left the GPU nothing: it streams nothing


def test_plan_prints_both_roads(r1_header, monkeypatch, tmp_path):
    """`hetero plan` says from which chunk size the experts are streamed and both roads'
    predicted prefill speed, from this machine's cached figures (written here: 10 GMAC/s a
    core); --json carries the same numbers, and a slow link moves the road out of reach."""
    from placement.measured import cached_cpu_bandwidth, cached_prefill_macs

    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = detect(measure_cpu=False, measure_prefill=False)
    cached_cpu_bandwidth(here.ram, here.numa_nodes, lambda: (20e9, "written by the test"))
    cached_prefill_macs(here.ram, here.numa_nodes, lambda: (here.cpu_cores * 10e9, "written by the test"))
    args = ["plan", str(r1_header[0]), "--gpu", "h100", "--ram", "512GiB", "--cpu-bw", "ddr5-4800x8",
            "--cpu-cores", "8"]  # fmt: skip
    text = CliRunner().invoke(app, args).output
    data = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)["prediction"]
    n = data["prefill_crossover_tokens"]
    assert n > 0 and f"streamed to the GPU from {n}" in text, text
    assert f"GPU road {data['prefill_gpu_road_tok_s']:.0f} tok/s" in text and data["prefill_cpu_road_tok_s"] > 0
    slow = CliRunner().invoke(app, [*args, "--pcie-bw", "0.01GB/s", "--json"]).stdout
    assert json.loads(slow)["prediction"]["prefill_crossover_tokens"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "{tiny}", "--gpu", "h100", "--pcie-bw", "fast"], "cannot read bandwidth 'fast'"),
        (["plan", "{tiny}", "--pcie-bw", "25GB/s", "--gpu-mem", "0"], "--pcie-bw needs a GPU in the plan"),
        (["bench", "{tiny}", "--prefill-road", "sideways"], "--prefill-road sideways: choose plan, cpu or gpu"),
        (["bench", "{tiny}", "--device", "cpu", "--prefill-road", "gpu"], "--prefill-road gpu needs a GPU"),
    ],
    ids=["unreadable rate", "rate without a GPU", "unknown road", "GPU road without a GPU"],
)
def test_the_road_options_refuse_bad_input_in_one_line(synth, args, message):
    tiny = str(synth("tiny", "Q8_0"))
    r = CliRunner().invoke(app, [a.format(tiny=tiny) for a in args])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output and lines[-1].startswith("error:"), r.output
