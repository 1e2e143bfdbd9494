"""Tokenizer and chat template from the GGUF; hetero's tokenizer against llama.cpp's."""

import codecs
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import oracle
from tokenizer_corpus import build_test_vocab, corpus, random_string, write_vocab_file

import hetero
from hetero.synth.llama_cpp import quiet_stderr
from hetero.synth.vocab import Vocab
from hetero.tokenizer import Tokenizer
from modelfile.errors import HeteroError
from modelfile.gguf_header import read_header


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
    with pytest.raises(HeteroError, match="chat template of .* failed: access to attribute .__class__"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_generate_streams_text(model):
    pieces = list(model.generate("Hello", max_tokens=8, temperature=0.8, seed=3))
    again = list(model.generate("Hello", max_tokens=8, temperature=0.8, seed=3))
    assert pieces == again and "".join(pieces)


# -- hetero's own tokenizer against llama.cpp's ------------------------------------------------

PRE_TOKENIZERS = ("deepseek-v3", "deepseek-llm", "kimi-k2")


@pytest.fixture(scope="module", params=PRE_TOKENIZERS)
def both(request, tmp_path_factory):
    """(hetero's Tokenizer, llama.cpp's vocab-only model) on one vocabulary file."""
    llama_cpp = oracle()
    path = write_vocab_file(tmp_path_factory.mktemp("vocab") / f"{request.param}.gguf", request.param)
    with quiet_stderr():
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    yield Tokenizer(path, read_header(path).metadata), llm
    llm.close()


def test_ids_match_llama_cpp_on_the_corpus(both):
    tok, llm = both
    seed = int(np.random.default_rng().integers(2**31))
    strings = corpus(np.random.default_rng(seed))
    assert len(strings) >= 2000
    wrong = []
    for s in strings:
        raw = s if isinstance(s, bytes) else s.encode()
        for special in (True, False):
            if tok.tokenize(raw, add_bos=False, special=special) != llm.tokenize(raw, add_bos=False, special=special):
                wrong.append((special, raw))
    assert not wrong, f"{len(wrong)} of {2 * len(strings)} differ (corpus seed {seed}), first: {wrong[:3]}"
    assert tok.tokenize("Hi") == llm.tokenize(b"Hi", add_bos=True, special=True)  # BOS from the file


def test_pieces_and_end_of_generation_match_llama_cpp(both):
    import llama_cpp

    tok, llm = both
    buf = (llama_cpp.ctypes.c_char * 256)()
    for i in range(len(tok.tokens)):
        for special in (False, True):
            n = llama_cpp.llama_token_to_piece(llm._model.vocab, i, buf, len(buf), 0, special)
            assert tok.token_bytes([i], special=special) == bytes(buf[:n]), (i, tok.tokens[i], special)
    eog = {i for i in range(len(tok.tokens)) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)}
    assert tok.eog_ids == eog and len(eog) >= 3


def test_100kb_of_text_matches_llama_cpp(both):
    tok, llm = both
    text = "".join(s for s in corpus(np.random.default_rng()) if isinstance(s, str))
    text = (text * (100_000 // len(text.encode()) + 1)).encode()[:100_000]
    assert tok.tokenize(text) == llm.tokenize(text, add_bos=True, special=True)


@pytest.fixture(scope="module")
def v3_tokenizer(tmp_path_factory):
    path = write_vocab_file(tmp_path_factory.mktemp("vocab") / "v3.gguf", "deepseek-v3")
    return Tokenizer(path, read_header(path).metadata)


def test_code_points_above_unicode_read_as_replacement_characters(v3_tokenizer):
    # llama.cpp aborts the process on these (its encoder throws); hetero reads each as U+FFFD.
    tok = v3_tokenizer
    assert tok.tokenize(b"a\xf4\x90\x80\x80b", add_bos=False) == tok.tokenize("a\ufffdb", add_bos=False)
    assert tok.tokenize(b"\xf5\x80\x80\x80", add_bos=False) == tok.tokenize("\ufffd", add_bos=False)


def test_streamed_pieces_never_split_a_character(v3_tokenizer):
    tok = v3_tokenizer
    text = "混合专家 😀👍🏽 naïve Ελληνικά " + random_string(np.random.default_rng())
    ids = tok.tokenize(text, add_bos=False, special=False)  # control-token text stays text
    assert any(not tok.token_bytes([i]).decode("utf-8", "ignore") for i in ids)  # some tokens hold part of a character
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    pieces = [decoder.decode(tok.token_bytes([i])) for i in ids] + [decoder.decode(b"", final=True)]
    assert "".join(pieces) == text and tok.detokenize(ids) == text


def _metadata(v3_tokenizer, **changes) -> dict:
    path = write_vocab_file(Path(tempfile.mkdtemp()) / "v.gguf", "deepseek-v3")
    meta = dict(read_header(path).metadata)
    meta.update(changes)
    return meta


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tokenizer.ggml.pre": "qwen2"}, "pre-tokenizer .* is 'qwen2'; hetero knows deepseek-llm"),
        ({"tokenizer.ggml.pre": ""}, "pre-tokenizer .* is none"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama' is not supported"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a"]}, "spells tokens 0 and 2 the same"),
        ({"tokenizer.ggml.merges": ["Ġ t", "q zz"]}, "merge 'q zz' needs 'zz'"),
    ],
)
def test_unusable_vocabularies_are_one_clear_error(v3_tokenizer, changes, message):
    meta = _metadata(v3_tokenizer, **changes)
    if "tokenizer.ggml.tokens" in changes:
        meta["tokenizer.ggml.token_type"] = [1, 1, 1]
        meta["tokenizer.ggml.merges"] = []
    with pytest.raises(HeteroError, match=message):
        Tokenizer(Path("v.gguf"), meta)


@pytest.mark.parametrize("add_bos, add_eos", [(None, None), (True, True), (False, True)])
def test_the_files_bos_and_eos_keys_as_llama_cpp_reads_them(tmp_path, add_bos, add_eos):
    """Absent keys mean no BOS and no EOS; tokenize(add_bos=None) follows the file both ways."""
    llama_cpp = oracle()
    path = write_vocab_file(tmp_path / "flags.gguf", "deepseek-v3", add_bos=add_bos, add_eos=add_eos)
    tok = Tokenizer(path, read_header(path).metadata)
    with quiet_stderr():
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in (b"Hello world", b"", "<think>混合</think>".encode()):
        assert tok.tokenize(text) == llm.tokenize(text, add_bos=True, special=True)
        assert tok.tokenize(text, add_bos=False) == llm.tokenize(text, add_bos=False, special=True)
    llm.close()


def test_a_vocabulary_without_every_byte_is_refused(v3_tokenizer, tmp_path):
    vocab = build_test_vocab()
    tokens = ["<dropped>" if t == "!" else t for t in vocab.tokens]
    path = write_vocab_file(tmp_path / "no-bang.gguf", "deepseek-v3", Vocab(tokens, *list(vars(vocab).values())[1:]))
    with pytest.raises(HeteroError, match=r"lacks the byte token\(s\) 0x21"):
        Tokenizer(path, read_header(path).metadata)
