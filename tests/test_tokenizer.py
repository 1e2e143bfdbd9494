"""Tokenizer and chat template from the GGUF."""

import pytest

import hetero
from hetero.errors import HeteroError
from hetero.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(synth):
    return hetero.load_model(synth("tiny", "Q8_0"))


def test_round_trip_of_mixed_text(model):
    text = "Hello, wörld! 3.14 ☃ — 東京 <think>x</think>"
    ids = model.tokenize(text, add_bos=False)
    assert model.detokenize(ids) == text
    assert len(ids) < len(text.encode())  # merges do something


def test_bos_added_by_default(model):
    assert model.tokenize("hi")[0] == model.tokenizer.bos_id


def test_chat_template_uses_special_tokens(model):
    ids = model.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    text = model.tokenizer.token_bytes(ids, special=True).decode()
    assert ids[0] == model.tokenizer.bos_id and ids.count(model.tokenizer.bos_id) == 1
    assert text.endswith("Be brief.<｜User｜>Hi<｜Assistant｜>")
    user_id = model.tokenize("<｜User｜>", add_bos=False)
    assert len(user_id) == 1 and user_id[0] in ids


def test_template_sandbox_blocks_python_internals(model):
    metadata = dict(model.file.metadata)
    metadata["tokenizer.chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tok = Tokenizer(model.file.paths[0], metadata)
    with pytest.raises(HeteroError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_generate_streams_text(model):
    pieces = list(model.generate("Hello", max_tokens=8, temperature=0.8, seed=3))
    again = list(model.generate("Hello", max_tokens=8, temperature=0.8, seed=3))
    assert pieces == again and "".join(pieces)
