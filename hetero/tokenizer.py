"""Byte-level BPE tokenization from the GGUF's own vocabulary, with llama.cpp's exact results.

llama.cpp is the reference our logits are checked against, so its token ids are the contract:
the same special-token cuts, the same pre-tokenizer words (hetero/pretokenize.py), the same
merges. The merging itself runs in Hugging Face `tokenizers` (a prebuilt Rust wheel): given the
words, byte-level BPE has one answer (lowest merge rank first, leftmost among equals), and a
compiled engine keeps a 100 KB prompt well under a second where a Python loop would not on long
CJK runs. Nothing of llama.cpp is needed at run time.
"""

from pathlib import Path

from tokenizers import Tokenizer as _BPEEngine
from tokenizers import models

from hetero.chat_template import ChatTemplate
from hetero.pretokenize import check_pre_tokenizer, decode_utf8, encode_utf8, split_words
from modelfile.errors import HeteroError

# GGUF token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts llama.cpp treats as control tokens whatever the file says (end of turn, fill-in-
# the-middle markers), and those among them that end generation.
_END_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")  # fmt: skip
_FIM_END_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
                  "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>")  # fmt: skip
_FIM_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
              "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>",
              "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>", "<fim-middle>", "<fim_middle>",
              "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>", "<|middle|>", "<end_of_utterance>")  # fmt: skip
_END_OF_GENERATION = frozenset(_END_TEXTS + _FIM_END_TEXTS)
_CONTROL_BY_NAME = _END_OF_GENERATION | frozenset(_FIM_TEXTS)


def byte_alphabet() -> list[str]:
    """The printable stand-in character of each byte, as byte-level (gpt2-style) vocabularies
    store them: printable Latin-1 as itself, the other 68 bytes as U+0100 onwards."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


_BYTE_TO_CHAR = {b: ch for b, ch in enumerate(byte_alphabet())}  # str.translate table on Latin-1 text
_CHAR_TO_BYTE = {ch: b for b, ch in enumerate(byte_alphabet())}


class Tokenizer:
    def __init__(self, path: Path, metadata: dict):
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise HeteroError(f"{path}: tokenizer model {model!r} is not supported (hetero reads byte-level BPE: gpt2)")
        self.pre = str(metadata.get("tokenizer.ggml.pre") or "")
        check_pre_tokenizer(self.pre)
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(metadata.get("tokenizer.ggml.tokens") or [])]
        if not tokens:
            raise HeteroError(f"{path}: the file has no vocabulary (tokenizer.ggml.tokens)")
        self.ids = {}
        for i, t in enumerate(tokens):
            if self.ids.setdefault(t, i) != i:
                raise HeteroError(f"{path}: the vocabulary spells tokens {self.ids[t]} and {i} the same ({t!r})")
        missing = [f"0x{b:02X}" for b, ch in enumerate(byte_alphabet()) if ch not in self.ids]
        if missing:  # BPE would join pieces across the byte llama.cpp keeps apart (and then drops)
            raise HeteroError(f"{path}: the vocabulary lacks the byte token(s) {', '.join(missing[:8])}")
        self.tokens = tokens
        types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        if len(types) < len(tokens):
            raise HeteroError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
        self.types = [CONTROL if t in _CONTROL_BY_NAME else types[i] for i, t in enumerate(tokens)]
        self._engine = _BPEEngine(models.BPE(vocab=self.ids, merges=self._merges(path, metadata)))

        def special_id(key: str) -> int:
            i = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return int(i) if isinstance(i, int) and 0 <= i < len(tokens) else -1

        self.bos_id, self.eos_id = special_id("bos"), special_id("eos")
        # llama.cpp's defaults for byte-level BPE files when the keys are absent: neither
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.bos_text = tokens[self.bos_id] if self.bos_id >= 0 else ""
        self.eos_text = tokens[self.eos_id] if self.eos_id >= 0 else ""
        named = {special_id(k) for k in ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")}
        self.eog_ids = {i for i in named if i >= 0} | {i for i, t in enumerate(tokens) if t in _END_OF_GENERATION}
        # Cut out before BPE, longest first; control (and unknown) ones only when asked to.
        specials = [i for i, t in enumerate(self.types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        specials.sort(key=lambda i: -len(encode_utf8(tokens[i])))
        self._specials = [(encode_utf8(tokens[i]), i, self.types[i] != USER_DEFINED) for i in specials]
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.chat = ChatTemplate(metadata.get("tokenizer.chat_template"), self.bos_text, self.eos_text, str(path))

    def _merges(self, path: Path, metadata: dict) -> list[tuple[str, str]]:
        """Merge rules in rank order: 'left right', split at the first space after the first
        character (a left part may itself be a space); a repeated rule keeps its first rank."""
        merges, seen = [], set()
        for rule in metadata.get("tokenizer.ggml.merges") or []:
            cut = rule.find(" ", 1)
            if cut < 0:
                continue
            pair = (rule[:cut], rule[cut + 1 :])
            if pair in seen:
                continue
            seen.add(pair)
            for part in (*pair, pair[0] + pair[1]):
                if part not in self.ids:
                    raise HeteroError(f"{path}: BPE merge {rule!r} needs {part!r}, which is not in the vocabulary")
            merges.append(pair)
        return merges

    # -- text -> ids ---------------------------------------------------------------------------
    def tokenize(
        self, text: str | bytes, add_bos: bool | None = None, special: bool = True, literal: list[tuple[int, int]] = ()
    ) -> list[int]:
        """Text (or raw bytes) -> token ids. With `special`, text that spells a control token
        (the chat markers) becomes that token, except inside the `literal` spans (character
        offsets: message contents, which are data); user-defined tokens (like <think>) always
        do. `add_bos` None follows the file (BOS and EOS as its add_*_token keys say, as
        llama.cpp does); True or False adds BOS or not, and never EOS."""
        raw = text if isinstance(text, bytes) else encode_utf8(text)
        if literal and not isinstance(text, bytes):
            literal = [(len(encode_utf8(text[:a])), len(encode_utf8(text[:b]))) for a, b in literal]
        bos = self.add_bos if add_bos is None else add_bos
        out = [self.bos_id] if bos and self.bos_id >= 0 else []
        out += self._encode(raw, special, literal)
        if add_bos is None and self.add_eos and self.eos_id >= 0:
            out.append(self.eos_id)
        return out

    def _encode(self, raw: bytes, special: bool, literal) -> list[int]:
        out = []
        for piece in self._cut_specials(raw, special, literal):
            if isinstance(piece, int):
                out.append(piece)
                continue
            text = decode_utf8(raw[piece[0] : piece[1]])
            words = [encode_utf8(w).decode("latin-1").translate(_BYTE_TO_CHAR) for w in split_words(text, self.pre)]
            if words:
                out += self._engine.encode(words, is_pretokenized=True, add_special_tokens=False).ids
        return out

    def _cut_specials(self, raw: bytes, special: bool, literal) -> list[tuple[int, int] | int]:
        """`raw` as byte ranges of text and ids of the special tokens cut out of it: one token at
        a time, longest first, each cutting what earlier ones left, leftmost occurrence first
        (llama.cpp's order). Control tokens only with `special`, and none inside `literal`."""
        pieces: list[tuple[int, int] | int] = [(0, len(raw))] if raw else []
        for text, tid, control in self._specials:
            if (control and not special) or text not in raw:
                continue
            cut = []
            for p in pieces:
                if isinstance(p, int):
                    cut.append(p)
                    continue
                start, end = p
                at = raw.find(text, start, end)
                while at >= 0:
                    stop = at + len(text)
                    if control and any(a < stop and at < b for a, b in literal):
                        at = raw.find(text, at + 1, end)  # data, not a marker: look further
                        continue
                    if at > start:
                        cut.append((start, at))
                    cut.append(tid)
                    start = stop
                    at = raw.find(text, start, end)
                if start < end:
                    cut.append((start, end))
            pieces = cut
        return pieces

    # -- ids -> text ---------------------------------------------------------------------------
    def token_bytes(self, ids: list[int], special: bool = False) -> bytes:
        """Raw bytes of tokens (control tokens only if `special`); a character may span tokens."""
        return b"".join(self._piece(int(i), special) for i in ids)

    def _piece(self, tid: int, special: bool) -> bytes:
        key = (tid, special)
        if key not in self._pieces:
            self._pieces[key] = self._spell(tid, special)
        return self._pieces[key]

    def _spell(self, tid: int, special: bool) -> bytes:
        if not 0 <= tid < len(self.tokens):
            return b""
        kind, text = self.types[tid], self.tokens[tid]
        if kind in (CONTROL, UNKNOWN):
            return encode_utf8(text) if special else b""
        if kind == USER_DEFINED:
            return encode_utf8(text)
        if kind == BYTE:  # spelled <0xXX>
            return bytes([_leading_hex(text[3:5])])
        if kind != NORMAL:
            return b""
        out = bytearray()
        for ch in text:
            b = _CHAR_TO_BYTE.get(ch)
            if b is None:  # not a byte stand-in: llama.cpp writes a marker naming it
                out += b"[UNK_BYTE_0x" + encode_utf8(ch).hex().encode() + encode_utf8(text) + b"]"
            else:
                out.append(b)
        return bytes(out)

    def detokenize(self, ids: list[int]) -> str:
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.chat.render(messages, add_generation_prompt)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation: the template's markers are special tokens, the messages'
        own text never is (a user who types <｜end▁of▁sentence｜> gets those characters)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        has_bos = bool(self.bos_text) and text.startswith(self.bos_text)
        return self.tokenize(text, add_bos=not has_bos and self.add_bos, literal=_content_spans(text, messages))


def _leading_hex(digits: str) -> int:
    """The value of the leading hex digits (0 if none), as one byte: what strtol reads there."""
    n = 0
    for ch in digits:
        if ch not in "0123456789abcdefABCDEF":
            break
        n = n * 16 + int(ch, 16)
    return n & 0xFF


def _content_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Where each message's content appears in the rendered text, in order. A template may show
    only part of a content (R1's drops the reasoning before </think>): then that part."""
    spans, pos = [], 0
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or not content:
            continue
        for shown in (content, content.split("</think>")[-1].strip(), content.strip()):
            at = text.find(shown, pos) if shown else -1
            if at >= 0:
                spans.append((at, at + len(shown)))
                pos = at + len(shown)
                break
    return spans
