"""Prompts are batch-invariant on the CPU engine: a prompt token's logits, keys and values are the
same bits however the prompt is split into passes, so a prompt cache that reuses the rows of an
earlier request answers exactly as a cold run (docs/ARCHITECTURE.md, "Prompts are
batch-invariant"). Quantized files are the hard case: int8 activation rounding and top-k routing
turn one ulp into another token, which a float file would hide."""

import numpy as np
import pytest
from conftest import random_prompt

import hetero
from hetero.generate import generate_steps
from hetero.sampling import SamplingParams

CASES = [("tiny", "Q8_0", {}), ("tiny", "Q4_K_M", {}), ("tiny", "Q5_1", {}), ("tiny", "BF16", {}),
         ("v3", "UD-IQ1_S", {"n_layer": 3, "quantizer": "hetero"})]  # fmt: skip


def random_cuts(n: int, rng) -> list[int]:
    """0 = c0 < c1 < ... < ck = n, every piece at least two tokens (a prompt pass)."""
    cuts = [0]
    while n - cuts[-1] >= 4:
        cuts.append(int(rng.integers(cuts[-1] + 2, n - 1)))
    return [*cuts, n]


@pytest.mark.parametrize("preset,quant,overrides", CASES, ids=[f"{p}-{q}" for p, q, _ in CASES])
def test_a_prompt_split_anywhere_gives_the_same_logits(synth, preset, quant, overrides):
    model = hetero.load_model(synth(preset, quant, **overrides), n_ctx=128, gpu_mem="0", threads=2)
    rng = np.random.default_rng()
    ids = random_prompt(int(rng.integers(40, 90)), model.tokenizer.bos_id)
    whole = model.logits(ids)
    for _ in range(3):
        cuts = random_cuts(len(ids), rng)
        cache = model.new_cache()
        parts = [model.forward(ids[a:b], cache).numpy() for a, b in zip(cuts, cuts[1:], strict=False)]
        assert np.array_equal(np.concatenate(parts), whole), f"split at {cuts[1:-1]}"
    # a long prompt cut into passes by the model itself, in even shares
    model.net.prefill_chunk = lambda positions: 7
    assert np.array_equal(model.logits(ids), whole)


def tokens(steps) -> list[int]:
    return [s.token for s in steps if s.token >= 0]


def test_a_cached_prefix_answers_as_a_cold_run(synth):
    """What the server does: each turn of a conversation (the earlier prompt, its reply and a
    new question) reuses the earlier prompt's rows from the cache and prefills the rest, and
    must give the tokens a cold run gives. Four conversations of three turns: before prompts
    were batch-invariant, about one such turn in four changed a token here."""
    model = hetero.load_model(synth("tiny", "Q8_0"), n_ctx=256, gpu_mem="0", threads=2)
    rng = np.random.default_rng()
    greedy = SamplingParams(temperature=0)
    for _ in range(4):
        cache, reused = model.new_cache(), 0
        ids = random_prompt(int(rng.integers(10, 40)), model.tokenizer.bos_id)
        for _turn in range(3):
            cold = tokens(generate_steps(model, ids, 16, greedy))
            warm = tokens(generate_steps(model, ids, 16, greedy, cache=cache, cached=reused))
            assert warm == cold, f"turn {_turn + 1}, {reused} of {len(ids)} tokens cached"
            reused = len(ids)  # the prompt's rows; the reply's are the decode step's, not reused
            ids = ids + warm + rng.integers(0, 600, int(rng.integers(2, 12))).tolist()
    with pytest.raises(ValueError, match="at least two"):
        next(generate_steps(model, ids, 4, greedy, cache=cache, cached=len(ids) - 1))
