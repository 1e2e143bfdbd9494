"""The plan as one JSON object (schema in docs/plan-schema.md), and back."""

from dataclasses import asdict

from placement.backends import BACKENDS
from placement.hardware import Hardware
from placement.planner import EXECUTORS, Placement, Plan
from placement.predict import Prediction

SCHEMA = "hetero.plan/3"  # 2: a backend per tensor, executor, KV cache dtype; 3: prefill roads, measured figures


def plan_to_json(plan: Plan) -> dict:
    hw = plan.hardware
    return {
        "schema": SCHEMA,
        "model": plan.model,
        "ctx": plan.ctx,
        "hardware": asdict(hw),
        "tensors": [asdict(p) for p in plan.placements],
        "devices": {
            "gpu": {
                "name": hw.gpu_name,
                "used_bytes": plan.used_bytes("gpu"),
                "budget_bytes": hw.gpu_mem,
                "weights_bytes": plan.weights_bytes("gpu"),
            },
            "cpu": {
                "used_bytes": plan.used_bytes("cpu"),
                "budget_bytes": hw.ram,
                "weights_bytes": plan.weights_bytes("cpu"),
                "prefill_bytes": plan.prefill_host_bytes,
                "prompt_cache_bytes": plan.prompt_cache_bytes,
            },
        },
        "kv_cache": {
            "slots": plan.cache_slots,
            "bytes": plan.kv_cache_bytes,
            "device": plan.kv_cache_device,
            "dtype": plan.kv_cache_dtype,
            "tokens": plan.ctx,
        },
        "executor": plan.executor,
        "fused_shared_layers": list(plan.fused_shared_layers),
        "reserved": dict(plan.reserved),
        "fits": plan.fits,
        "problems": list(plan.problems),
        "suggestion": plan.suggestion,
        "prediction": {**asdict(plan.prediction), "assumptions": list(plan.prediction.assumptions)},
        "rules": list(plan.rules),
        "ignored": list(plan.ignored),
        "warnings": list(plan.warnings),
    }


def _check_names(data: dict) -> None:
    """Values that choose code (backend, executor, cache dtype) must be ones hetero knows."""
    known = {
        "executor": (data.get("executor"), EXECUTORS),
        "kv_cache.dtype": (data.get("kv_cache", {}).get("dtype"), ("float32", "bfloat16")),
        **{f"{t.get('name')}.backend": (t.get("backend"), BACKENDS) for t in data.get("tensors", [])},
    }
    for key, (value, allowed) in known.items():
        if value not in allowed:
            raise ValueError(f"plan: {key} is {value!r}, not one of {', '.join(allowed)}")


def plan_from_json(data: dict) -> Plan:
    if data.get("schema") != SCHEMA:
        older = str(data.get("schema", "")).startswith("hetero.plan/")
        raise ValueError(
            f"a plan of schema {data.get('schema')} from an older hetero: run hetero plan again"
            if older
            else f"not a {SCHEMA} document"
        )
    _check_names(data)
    pred = dict(data["prediction"])
    pred["assumptions"] = tuple(pred["assumptions"])
    return Plan(
        model=data["model"],
        hardware=Hardware(**data["hardware"]),
        ctx=data["ctx"],
        placements=tuple(Placement(**t) for t in data["tensors"]),
        kv_cache_bytes=data["kv_cache"]["bytes"],
        kv_cache_device=data["kv_cache"]["device"],
        reserved=tuple(data["reserved"].items()),
        fits=data["fits"],
        problems=tuple(data["problems"]),
        suggestion=data["suggestion"],
        prediction=Prediction(**pred),
        rules=tuple(data["rules"]),
        ignored=tuple(data["ignored"]),
        warnings=tuple(data["warnings"]),
        executor=data["executor"],
        kv_cache_dtype=data["kv_cache"]["dtype"],
        fused_shared_layers=tuple(data["fused_shared_layers"]),
        prefill_host_bytes=data["devices"]["cpu"].get("prefill_bytes", 0),
        cache_slots=data["kv_cache"].get("slots", 1),
        prompt_cache_bytes=data["devices"]["cpu"].get("prompt_cache_bytes", 0),
    )
