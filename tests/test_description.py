"""One description, three executors: the eager forward, the hybrid step and the native step are
derived from the family's block list (modelfile/blocks.py). Alter the list, by dropping a block
or swapping two, and all three change together: they still agree with each other, and no
longer with the unaltered model."""

import dataclasses

import numpy as np
import pytest

from cpu_ops.decode import COLUMNS, KINDS
from hetero.model import Model, default_plan
from hetero.models.hybrid import HybridDecode
from hetero.models.native import NativeDecode
from modelfile.families import family_of
from modelfile.gguf_file import GGUFModelFile
from placement.rules import parse_override
from tests.conftest import random_prompt


def _dropped(d):
    """Without layer 1's MoE block."""
    return dataclasses.replace(d, blocks=tuple(b for b in d.blocks if (b.layer, b.kind) != (1, "moe")))


def _swapped(d):
    """Layer 0 runs its MLP before its attention."""
    blocks = list(d.blocks)
    blocks[0], blocks[1] = blocks[1], blocks[0]
    return dataclasses.replace(d, blocks=tuple(blocks))


def _decode(model, ids, step) -> np.ndarray:
    """Logits of ids[3:] decoded one at a time by `step` (None: the eager forward) after a
    prefill of ids[:3]."""
    model.net.decode_step = step
    cache = model.new_cache(len(ids))
    model.forward(ids[:3], cache)
    return np.concatenate([model.forward([t], cache).numpy() for t in ids[3:]])


def _three_ways(path, description, ids) -> dict[str, np.ndarray]:
    """Decoded logits through each executor, every one built from `description`."""
    file = GGUFModelFile(path)
    native = Model(file, default_plan(file), description=description)
    assert isinstance(native.net.decode_step, NativeDecode)
    program = native.net.decode_step.program
    assert [KINDS[k] for k in program[:, COLUMNS["kind"]]] == [b.kind for b in description.blocks]
    hybrid_plan = default_plan(file, gpu_mem="8GiB", rules=[parse_override("exps=cpu")])
    hybrid = Model(file, hybrid_plan, description=description)
    assert isinstance(hybrid.net.decode_step, HybridDecode)
    out = {"native": _decode(native, ids, native.net.decode_step), "eager": _decode(native, ids, None)}
    out["hybrid"] = _decode(hybrid, ids, hybrid.net.decode_step)
    hand_offs = sum(b.kind == "moe" for b in description.blocks)
    assert len(hybrid.net.decode_step.step.stages) == hand_offs + 1  # segments cut at each MoE block
    return out


@pytest.mark.parametrize("alter", [_dropped, _swapped])
def test_an_altered_description_changes_all_three_executors(synth, alter):
    """F32 weights take activations as they are (F16 rounds them to float16 on the CPU engine
    only) and every expert is used: no rounding step or near-tied expert choice separates the
    executors, only summation order."""
    path = synth("tiny", "F32", n_expert_used=8)
    file = GGUFModelFile(path)
    family = family_of(file.metadata)
    original = family.describe(family.config(file.metadata), file.tensors)
    altered = alter(original)
    assert altered != original
    ids = random_prompt(8, 1)
    before, after = _three_ways(path, original, ids), _three_ways(path, altered, ids)
    for runs in (before, after):
        ref = runs["eager"]
        for name in ("native", "hybrid"):
            np.testing.assert_allclose(runs[name], ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=name)
    for name in before:  # each executor follows the alteration, by far more than rounding
        change = np.abs(after[name] - before[name]).max() / np.abs(before[name]).max()
        assert change > 1e-2, (name, change)
