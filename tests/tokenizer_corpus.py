"""A test vocabulary and a corpus for comparing hetero's tokenizer with llama.cpp's.

The vocabulary is learned here from multilingual text, code and whitespace runs (so merges fire
across scripts, digits and spaces, as in a real model's vocabulary), with DeepSeek-V3's control
tokens, user-defined tokens and a few names llama.cpp treats specially. The corpus mixes fixed
hard cases with strings drawn fresh from a random generator on every run.
"""

import string
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

from hetero.synth.presets import make_preset
from hetero.synth.vocab import ASSISTANT, BOS, EOS, PAD, THINK_CLOSE, THINK_OPEN, USER, Vocab, learn_merges
from hetero.synth.writer import put_metadata
from hetero.tokenizer import byte_alphabet
from modelfile.deepseek2_synth import ARCH

TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. It's 3.14159 and 2,718 — don't you think? We'll see.
THE QUICK BROWN FOX! Ünïcödé façade naïve coöperate Straße Ελληνικά Русский текст для проверки.
def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text if c != ' ']  # comment
    for i in range(10):   x += i ** 2;    y = {"key": [1, 2, 3]}
\tindented\twith\ttabs\r\n\r\nwindows lines\n\n\n   three spaces    four spaces
人工智能正在改变世界。我们今天讨论混合专家模型，它的每个词元只使用少数专家。东京は日本の首都です。
ひらがなとカタカナ、カタカナ。한국어 텍스트도 포함합니다. 안녕하세요 세계
emoji 😀😃🎉👍🏽 flags 🇫🇷🇯🇵 math ∑∫√∞ ≤≥ arrows → ← ⇒ currency $€£¥ 100% 50/50
numbers 0 1 12 123 1234 12345 123456 2024-01-01 10:30:45 1e10 0x1F 3.0e-5 ١٢٣ ٤٥٦ ¹²³ ½
URLs https://example.com/path?q=1&r=2#frag email user@example.org <html><body>tags</body></html>
"""

CONTROL_TOKENS = (BOS, EOS, USER, ASSISTANT, PAD, "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>",
                  "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
                  "<｜tool▁calls▁end｜>", "<｜tool▁outputs▁begin｜>", "<|im_end|>", "[EOS]")  # fmt: skip
USER_DEFINED_TOKENS = (THINK_OPEN, THINK_CLOSE, "<|endoftext|>", "<tool>")  # <|endoftext|>: llama.cpp makes it control


FIXED = [
    "", " ", "  ", "\n", "\r\n", "\t", "a", "Hello world", " Hello", "Hello  world   ", "   leading",
    "trailing\n\n", "line1\nline2\r\nline3\rline4", "\n\n\n\t \n", "tabs\t\tand  spaces \t mixed",
    "12345678901234567890", "3.14159", "1,000,000", "v1.2.3-rc4", "0x1F 0b1010 1e-9", "٣٤٥ ۱۲۳ १२३ ¹²³ ½¾",
    "don't can't WON'T I'm we'll they've she'd it's IT'S", "'s 't 're", "rock'n'roll", "''quotes''",
    "人工智能正在改变世界", "東京は日本の首都です。", "カタカナとひらがな", "한국어 텍스트", "中文, English, 日本語!",
    "😀😃🎉", "👍🏽👩‍👩‍👧‍👦", "🇫🇷🇯🇵", "∑∫√∞ ≤ ≥ ≠", "→←⇒", "$€£¥₿", "~tilde~ ~~", "a~b", "^caret^", "`tick`",
    "Ελληνικά κείμενο", "Русский текст", "עברית", "العربية", "ไทย", "हिन्दी", "naïve café", "e\u0301 combining",
    "\u00a0nbsp\u00a0", "\u3000ideographic\u3000space", "zero\u200bwidth", "\u2028line\u2029para", "\u0085nel",
    "\u180emongolian", "x\u1680y", "\x00nul\x01\x1f", "\x1c\x1d\x1e\x1f separators", "\x7fdel",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { c = d[e]; }", "<html><body>x</body></html>",
    "https://example.com/a?b=c&d=e#f", "user@example.org", "C:\\Windows\\path", "{\"json\": [1, 2, {\"k\": null}]}",
    "<｜begin▁of▁sentence｜>Hello", "text<｜User｜>hi<｜Assistant｜>", "<think>reasoning</think>answer",
    "a<think>b<think>c", "<｜end▁of▁sentence｜><｜end▁of▁sentence｜>", "<|im_end|>x<|endoftext|>", "[EOS][EOS]",
    "<｜fim▁begin｜>code<｜fim▁hole｜>more<｜fim▁end｜>", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>",
    "<tool>x</tool>", "<unused_0>", "<｜User", "User｜>", "<think", "think>", "<<think>>",
    "!\ufa6e", " \ufa6e", "a\ufa6e人", "\U0002ebe1!", "😀  ", "∑∫ \t", "e\u0301  ", "\u2028 x \u3000",
    "ALLCAPS WORDS HERE", "CamelCaseIdentifier", "snake_case_name", "kebab-case-name", "MixedCASE123abc",
    " ?!.,;:", "...!!!???", "—–-", "«»„“”‘’", "!!  !!", " !", "  !", "a!b", "a !b", "\n!", "!\n\n", "a\n\nb",
]  # fmt: skip

# Not here: 4-byte forms above U+10FFFF (b"\xf4\x90\x80\x80"), on which llama.cpp aborts the process
# (std::invalid_argument from its encoder); hetero reads each as U+FFFD (tests/test_tokenizer.py).
# Every ASCII punctuation mark beside newlines, spaces, letters and itself: the classes differ
# per mark (llama.cpp counts `~` a symbol, for one), and a wrong one moves a word boundary.
FIXED += [form.format(c=c) for c in string.punctuation for form in ("{c}\n\t \n", "x{c}\n", " {c}{c}a", "{c}'s")]

INVALID_UTF8 = [
    b"\xff", b"\xfe\xff", b"abc\x80def", b"\xc3", b"\xc3(", b"\xe2\x82", b"\xe2\x82(", b"\xf0\x9f\x98",
    b"\xf0\x9f\x98\x80\xf0", b"\xed\xa0\x80", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xf8\x88\x80\x80\x80",
    b"hello \x80\x81\x82 world", b"\x80<think>\x80",
    b"\xe4\xb8\xad\xe6\x96", b"123\xff456", b"  \xa0  ",
]  # fmt: skip

_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " ", "  \t\n\r",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "äöüßéèêçñøåÄÖÜÉ", "αβγδεζηθΑΒΓΔ", "абвгдежзАБВГ",
    "人工智能改变世界我们今天", "ひらがなカタカナ", "한국어텍스트", "😀😃🎉👍🏽🇫", "∑∫√∞≤≥→←", "٠١٢٣٤٥",
    "\u00a0\u3000\u2003",
    "\u0301\u0308\u20dd", "\u200b\u200d\ufeff", "\U0001f9ff\U0001fae8\U00020000\U0002a700", "\x00\x01\x1c\x7f",
    "\ufa6e\ufa6f\U0002b73a\U0002ebe1人",  # unassigned code points inside the Han blocks, beside a Han letter
]  # fmt: skip
_SPECIAL_TEXTS = [BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE, "<|im_end|>", "<tool>", "[EOS]"]


def random_string(rng: np.random.Generator) -> str:
    """Runs drawn from a few alphabets at a time, sometimes with special-token text inside."""
    pools = rng.choice(len(_ALPHABETS), size=rng.integers(1, 4), replace=False)
    out = []
    for _ in range(rng.integers(1, 12)):
        if rng.random() < 0.08:
            out.append(str(rng.choice(_SPECIAL_TEXTS)))
            continue
        alphabet = _ALPHABETS[int(rng.choice(pools))]
        out.append("".join(rng.choice(list(alphabet), size=rng.integers(1, 9))))
    return "".join(out)


def corpus(rng: np.random.Generator, n_random: int = 2000) -> list[str | bytes]:
    """Fixed hard cases, invalid UTF-8, chat-template output, and `n_random` random strings."""
    chats = [
        f"{BOS}You are helpful.{USER}{q}{ASSISTANT}<think>\nLet me think.\n</think>\n\n{a}{EOS}{USER}more?{ASSISTANT}"
        for q, a in (("What is 2+2?", "4."), ("Translate 'hello' to 日本語", "こんにちは"), ("", " "))
    ]
    strings: list[str | bytes] = [*FIXED, *INVALID_UTF8, *chats]
    strings += [random_string(rng) for _ in range(n_random)]
    strings += [random_string(rng).encode()[:-1] for _ in range(50)]  # cut mid-character, often
    return strings


def build_test_vocab(n_merges: int = 1500) -> Vocab:
    """Merges of adjacent bytes across every boundary of the fixed cases first (so a word split
    in the wrong place changes the ids, not only the words), then merges learned within words."""
    alphabet = byte_alphabet()
    rng = np.random.default_rng(7)
    boundary = {}
    for s in [*FIXED, *(random_string(rng) for _ in range(300))]:
        chars = [alphabet[b] for b in s.encode()]
        boundary.update(dict.fromkeys(zip(chars, chars[1:], strict=False)))
    merges = list(boundary) + learn_merges(TRAINING_TEXT * 3, n_merges, alphabet)
    tokens = list(alphabet)
    for merged in dict.fromkeys(a + b for a, b in merges):
        if merged not in tokens:
            tokens.append(merged)
    types = [TokenType.NORMAL] * len(tokens)
    tokens += [*CONTROL_TOKENS, *USER_DEFINED_TOKENS]
    types += [TokenType.CONTROL] * len(CONTROL_TOKENS) + [TokenType.USER_DEFINED] * len(USER_DEFINED_TOKENS)
    tokens += ["<unused_0>", "<unused_1>", "<0x0A>"]  # never produced by merges, never special
    types += [TokenType.UNUSED] * 2 + [TokenType.BYTE]  # a byte token spells its byte
    return Vocab(tokens, [int(t) for t in types], [f"{a} {b}" for a, b in merges], tokens.index(BOS),
                 tokens.index(EOS))  # fmt: skip


def write_vocab_file(path: Path, pre: str, vocab: Vocab | None = None, **flags) -> Path:
    """A GGUF with a deepseek2 header and a vocabulary but no tensors: enough for llama.cpp's
    vocab-only load and for hetero's Tokenizer. `flags`: add_bos / add_eos (None: no key)."""
    vocab = vocab or build_test_vocab()
    w = GGUFWriter(path, ARCH)
    put_metadata(w, make_preset("tiny", n_vocab=len(vocab.tokens)), "tokenizer test", vocab, pre, **flags)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path
