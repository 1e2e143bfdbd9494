"""A small byte-level BPE vocabulary with DeepSeek-V3's chat special tokens, made from scratch.

Byte-level means every byte has a token, so any text round-trips; the merges are learned here
from a built-in paragraph so common English pieces become single tokens. The result is stored
in the GGUF exactly like a real gpt2-style tokenizer, and llama.cpp tokenizes with it.
"""

import re
from collections import Counter
from dataclasses import dataclass

from gguf import TokenType

from hetero.tokenizer import byte_alphabet

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PAD = "<｜▁pad▁｜>"
CONTROL_TOKENS = (BOS, EOS, USER, ASSISTANT, PAD)
TEXT_SPECIALS = (THINK_OPEN, THINK_CLOSE)

CORPUS = """
Mixture-of-experts models route every token to a few experts out of many. The dense parts of
each layer, the attention and the shared experts, are small and busy; the routed experts are
large and mostly idle. A workstation with one graphics card and a lot of memory can therefore
keep the dense parts on the card and the experts in main memory, where the processor streams
them. Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is
the capital of France. Let me think about this step by step. The answer is 42. def main():
    return print("hello world") # numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000
"""

# DeepSeek-V3-style chat format: system text first, then alternating turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages if message['role'] == 'system' %}{{ message['content'] }}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}<｜Assistant｜>{{ message['content'] }}<｜end▁of▁sentence｜>"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int


def learn_merges(text: str, n_merges: int, alphabet: list[str]) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair inside words."""
    words = Counter(re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", text))
    seqs = {w: [alphabet[b] for b in w.encode()] for w in words}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:], strict=False):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def pseudo_words(space: str, n: int) -> list[str]:
    """n distinct pronounceable filler tokens (" kamo", " rinesu", ...) so random models print words."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70, all two letters wide
    words = []
    for k in range(len(syllables), len(syllables) + n):  # two or more base-70 digits: unique spellings
        digits = []
        while k:
            k, d = divmod(k, len(syllables))
            digits.append(syllables[d])
        words.append(space + "".join(reversed(digits)))
    return words


def build_vocab(n_vocab: int, n_merges: int = 300) -> Vocab:
    """Bytes, merges, special tokens, then unused placeholders up to exactly n_vocab tokens."""
    alphabet = byte_alphabet()
    merges = learn_merges(CORPUS, n_merges, alphabet)
    tokens = list(alphabet)
    for merged in dict.fromkeys(a + b for a, b in merges):  # two merge paths can spell one token
        if merged not in tokens:
            tokens.append(merged)
    types = [TokenType.NORMAL] * len(tokens)
    tokens += [*CONTROL_TOKENS, *TEXT_SPECIALS]
    types += [TokenType.CONTROL] * len(CONTROL_TOKENS) + [TokenType.USER_DEFINED] * len(TEXT_SPECIALS)
    if len(tokens) > n_vocab:
        raise ValueError(f"vocabulary needs at least {len(tokens)} tokens, preset asks for {n_vocab}")
    filler = [w for w in pseudo_words(alphabet[ord(" ")], n_vocab) if w not in set(tokens)]
    tokens += filler[: n_vocab - len(tokens)]
    types += [TokenType.NORMAL] * (n_vocab - len(types))
    return Vocab(tokens, [int(t) for t in types], [f"{a} {b}" for a, b in merges], tokens.index(BOS), tokens.index(EOS))
