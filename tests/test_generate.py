"""Streaming: never split a UTF-8 character, never show a stop string, stop at EOS."""

import torch

from hetero.generate import generate_steps
from hetero.kv_cache import KVCache


class ScriptedModel:
    """Emits a fixed token sequence; each token is a chunk of bytes."""

    def __init__(self, pieces: list[bytes], eos: int = 99):
        self.pieces = pieces
        self.calls = 0
        outer = self

        class Tok:
            eog_ids = {eos}

            def token_bytes(self, ids):
                return b"".join(outer.pieces[i] for i in ids)

        self.tokenizer = Tok()

    def new_cache(self):
        return KVCache(1, 64, 6, "cpu")

    def forward(self, ids, cache, last_only=False):
        logits = torch.zeros(1, 100)
        nxt = self.calls if self.calls < len(self.pieces) else 99
        logits[0, nxt] = 1.0
        self.calls += 1
        cache.length += len(ids)
        return logits


def run(pieces, **kw):
    return [s.text for s in generate_steps(ScriptedModel(pieces), [1, 2, 3], **kw)]


def test_multibyte_character_is_never_split():
    snow = "☃".encode()  # three bytes, one per token
    texts = run([b"a", snow[:1], snow[1:2], snow[2:], b"b"])
    assert "".join(texts) == "a☃b"
    assert all("\ufffd" not in t for t in texts)


def test_stop_string_is_withheld_and_ends_generation():
    texts = run([b"Hel", b"lo ST", b"OP here", b"never"], stop=("STOP",))
    assert "".join(texts) == "Hello "


def test_eos_and_max_tokens():
    assert "".join(run([b"x", b"y"])) == "xy"
    assert "".join(run([b"x", b"y", b"z"], max_tokens=2)) == "xy"
