"""Split text into the words a byte-level BPE merges within, exactly as llama.cpp splits them.

A GGUF names its pre-tokenizer (`tokenizer.ggml.pre`); llama.cpp turns each name into a list of
regular expressions applied in turn, each one cutting the pieces the previous ones left. Two
details decide whether ids match llama.cpp's, so both are reproduced here rather than borrowed
from a Unicode regex engine:

- Unicode classes (\\p{L}, \\p{N}, ...) are matched on a *collapsed* copy of the text in which
  every code point above 127 stands for its category (Unicode 15.1, hetero/unicode_categories.py)
  and ASCII keeps llama.cpp's fixed lists of punctuation and symbols.
- Invalid UTF-8 becomes U+FFFD one byte at a time; overlong forms and surrogates are decoded, not
  rejected (llama.cpp's decoder); words are re-encoded from those code points.

Kimi-K2's pre-tokenizer is a hand-written scanner in llama.cpp; here it is the same decision
sequence written as one regular expression over a string of per-code-point classes.
"""

import re
from functools import cache

import numpy as np

from hetero.unicode_categories import RANGE_CLASSES, RANGE_STARTS
from modelfile.errors import HeteroError

# Unicode's White_Space property (unchanged since Unicode 6.3): what llama.cpp calls whitespace.
WHITESPACE = (*range(0x9, 0xE), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
              0x205F, 0x3000)  # fmt: skip

# Stand-ins in the collapsed text; none of them is ASCII or whitespace to `re.ASCII`.
_OTHER, _NUMBER, _LETTER, _PUNCT, _MARK, _SYMBOL = "\x80", "\x81", "\x82", "\x83", "\x84", "\x86"
_STAND_IN = {"N": _NUMBER, "L": _LETTER, "P": _PUNCT, "M": _MARK, "S": _SYMBOL}
# Character-class bodies of \p{..} on the collapsed text: the stand-in plus llama.cpp's ASCII members.
N = _NUMBER + "0-9"
L = _LETTER + "A-Za-z"
P = _PUNCT + r"!-#%-*,-/:-;?-@\[-\]_{}"
S = _SYMBOL + r"$+<->^`|~"
M = _MARK


@cache
def _class_table() -> np.ndarray:
    """Category class letter (as a byte) of every code point: 1.1 MB, built once."""
    starts = np.array([*RANGE_STARTS, 0x110000])
    return np.repeat(np.frombuffer(RANGE_CLASSES.encode(), np.uint8), np.diff(starts))


@cache
def _collapse_table() -> np.ndarray:
    """Code point -> collapsed character code (ASCII kept, whitespace -> \\v, else its stand-in)."""
    table = np.full(0x110000, ord(_OTHER), np.uint8)
    classes = _class_table()
    for cls, ch in _STAND_IN.items():
        table[classes == ord(cls)] = ord(ch)
    table[list(WHITESPACE)] = 0x0B
    table[:128] = np.arange(128)
    return table


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


def collapse(text: str) -> str:
    """One character per code point: ASCII as is, other code points by category (see module doc)."""
    return _collapse_table()[code_points(text)].tobytes().decode("latin-1")


_WIDE_SPACE = {cp: "\x0b" for cp in WHITESPACE if cp > 0x7F}


def plain(text: str) -> str:
    """The text for category-free expressions: non-ASCII whitespace as \\v (what `\\s` will match)."""
    return text.translate(_WIDE_SPACE)


def decode_utf8(raw: bytes) -> str:
    """llama.cpp's reading of bytes: each invalid byte is one U+FFFD; overlong forms and
    surrogates decode to what their bits say; a 4-byte form above U+10FFFF (no Python
    character can hold it) is also U+FFFD."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out, i, n = [], 0, len(raw)
    while i < n:
        b = raw[i]
        width = 1 if b < 0x80 else 0 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4 if b < 0xF8 else 0
        if width == 1:
            out.append(chr(b))
            i += 1
            continue
        tail = raw[i + 1 : i + width]
        if width == 0 or len(tail) < width - 1 or any(c & 0xC0 != 0x80 for c in tail):
            out.append("\ufffd")
            i += 1
            continue
        cp = b & (0x7F >> width)
        for c in tail:
            cp = (cp << 6) | (c & 0x3F)
        out.append(chr(cp) if cp <= 0x10FFFF else "\ufffd")
        i += width
    return "".join(out)


def encode_utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class _Rule:
    """One expression of a pre-tokenizer: where it matches, and on which view of the text."""

    def __init__(self, pattern: str, collapsed: bool):
        self.regex = re.compile(pattern, re.ASCII | re.DOTALL)
        self.collapsed = collapsed

    def cut(self, view: str, cuts: list[int]) -> list[int]:
        """Refine the pieces ending at `cuts`: each match, and each gap between matches, is a
        piece. The expression sees one piece at a time (its end is the end of the subject)."""
        out = []
        start = 0
        for end in cuts:
            pos = start
            for m in self.regex.finditer(view, start, end):
                if m.start() > pos:
                    out.append(m.start())
                out.append(m.end())
                pos = m.end()
            if pos < end:
                out.append(end)
            start = end
        return out


class _TrailingSpace(_Rule):
    """`\\s+$` cut by a scan: each piece's final run of whitespace becomes a piece of its own.
    The same cuts as the expression, which a backtracking engine finds in quadratic time (it
    tries the run from each of its positions)."""

    def __init__(self):
        self.collapsed = False

    def cut(self, view: str, cuts: list[int]) -> list[int]:
        out = []
        start = 0
        for end in cuts:
            run = end
            while run > start and view[run - 1] in " \t\n\v\f\r":
                run -= 1
            if start < run < end:
                out.append(run)
            out.append(end)
            start = end
        return out


def _ranges(pairs) -> str:
    return "".join(f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}" for a, b in pairs)


# DeepSeek-LLM (V2, V2-Lite, V2.5): letters of the scripts with case, ASCII and full-width
# punctuation, whitespace at the end, CJK/Hangul runs, digit runs.
_DEEPSEEK_LLM_LETTERS = _ranges((
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F),
    (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481),
    (0x48A, 0x52F), (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA),
    (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D),
    (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D),
    (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC),
    (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102),
    (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126),
    (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149),
    (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3),
    (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
    (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
    (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF),
    (0x1E900, 0x1E943),
))  # fmt: skip
_DEEPSEEK_LLM_PUNCT = _ranges(((0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F),
                               (0x3000, 0x3002)))  # fmt: skip
_DEEPSEEK_LLM_CJK = _ranges(((0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF)))

# DeepSeek-V3/R1: digits in threes, Han/kana runs, then the word/punctuation/space expression.
_V3_ASCII_PUNCT = r"!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~"

PRE_TOKENIZERS = {
    "deepseek-llm": (
        _Rule(r"[\r\n]", False),
        _Rule(rf"\s?[{_DEEPSEEK_LLM_LETTERS}]+", False),
        _Rule(rf"\s?[{_DEEPSEEK_LLM_PUNCT}]+", False),
        _TrailingSpace(),
        _Rule(rf"[{_DEEPSEEK_LLM_CJK}]+", False),
        _Rule(rf"[{N}]+", True),
    ),
    "deepseek-v3": (
        _Rule(rf"[{N}]{{1,3}}", True),
        _Rule(r"[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+", False),
        _Rule(
            rf"[{_V3_ASCII_PUNCT}][A-Za-z]+|[^\r\n{L}{P}{S}]?[{L}{M}]+| ?[{P}{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            True,
        ),
    ),
}

# Kimi-K2's scanner, as classes: H Han letter, # a code point of the Han ranges that is not a
# letter (unassigned: Han to the first rule, but "other" to the punctuation rule), letters (the
# contraction letters s t m d r e v l as themselves in lower case, any other letter as 'a'),
# 0 number, \n for CR and LF, ' ' space, \t other whitespace, ' apostrophe, ! anything else.
_KIMI_RULE = re.compile(
    r"[H#]+"
    r"|[ \t!']?[a-z]+(?:'[stmd]|'(?:re|ve|ll))?"
    r"|0{1,3}"
    r"| ?[!'#]+\n*"
    r"|[ \t\n]*\n+"
    r"|[ \t\n]+(?![^ \t\n])"
    r"|[ \t\n]+"
    r"|.",
    re.DOTALL,
)
_HAN = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # fmt: skip


@cache
def _kimi_table() -> np.ndarray:
    classes = _class_table()
    table = np.full(0x110000, ord("!"), np.uint8)
    table[classes == ord("L")] = ord("a")
    table[classes == ord("N")] = ord("0")
    table[list(WHITESPACE)] = ord("\t")
    for a, b in _HAN:
        table[a : b + 1] = np.where(classes[a : b + 1] == ord("L"), ord("H"), ord("#"))
    for ch in "stmdrevl":
        table[ord(ch)] = table[ord(ch.upper())] = ord(ch)
    table[[0x0A, 0x0D]] = ord("\n")
    table[0x20] = ord(" ")
    table[ord("'")] = ord("'")
    return table


KNOWN = (*PRE_TOKENIZERS, "kimi-k2")


def check_pre_tokenizer(name: str) -> None:
    if name not in KNOWN:
        shown = repr(name) if name else "none"
        raise HeteroError(f"the file's pre-tokenizer (tokenizer.ggml.pre) is {shown}; hetero knows {', '.join(KNOWN)}")


def split_words(text: str, pre: str) -> list[str]:
    """Words of `text` (already decoded as llama.cpp decodes) under pre-tokenizer `pre`."""
    if not text:
        return []
    if pre == "kimi-k2":
        classes = _kimi_table()[code_points(text)].tobytes().decode("latin-1")
        cuts = [m.end() for m in _KIMI_RULE.finditer(classes)]
    else:
        cuts = [len(text)]
        views = {}
        for rule in PRE_TOKENIZERS[pre]:
            if rule.collapsed not in views:
                views[rule.collapsed] = collapse(text) if rule.collapsed else plain(text)
            cuts = rule.cut(views[rule.collapsed], cuts)
    words, start = [], 0
    for end in cuts:
        words.append(text[start:end])
        start = end
    return words
