"""hetero's tokenizer against llama.cpp's on 100 KB of mixed text, same vocabulary, same process.

Usage: python benchmarks/tokenizer.py [--reps 7] [--kib 100] [--check-under SECONDS]

The text is the test corpus (code, CJK, emoji, digits, whitespace runs, special tokens, chat
output) repeated to the size asked, plus one long CJK run (a single pre-tokenizer word, the
case a Python BPE loop cannot do fast). Medians of --reps, spread min-max, for each supported
pre-tokenizer; ids are checked equal. --check-under fails (exit 1) when hetero's median for any
pre-tokenizer is above the bound: CI's gate for "100 KB in well under a second".
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tokenizer_corpus import corpus, write_vocab_file  # noqa: E402

from hetero.pretokenize import KNOWN  # noqa: E402
from hetero.synth.llama_cpp import quiet_stderr  # noqa: E402
from hetero.tokenizer import Tokenizer  # noqa: E402
from modelfile.gguf_header import read_header  # noqa: E402


def text_of(kib: int) -> bytes:
    mixed = "".join(s for s in corpus(np.random.default_rng(0)) if isinstance(s, str))
    cjk = "混合专家模型的每个词元只使用少数专家" * 200  # one word to the V3/Kimi pre-tokenizers
    body = (mixed * (kib * 1024 // len(mixed.encode()) + 1)).encode()[: kib * 1024 - len(cjk.encode())]
    return body.decode("utf-8", "ignore").encode() + cjk.encode()


def timed(fn, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kib", type=int, default=100)
    ap.add_argument("--check-under", type=float, help="fail if hetero's median exceeds this many seconds")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    text = text_of(args.kib)
    worst = 0.0
    print(f"{len(text) / 1024:.0f} KiB, medians of {args.reps} (min-max)")
    for pre in KNOWN:
        path = write_vocab_file(Path(tempfile.mkdtemp()) / f"{pre}.gguf", pre)
        tok = Tokenizer(path, read_header(path).metadata)
        ours = timed(lambda tok=tok: tok.tokenize(text), args.reps)
        line = f"{pre:<13} hetero {statistics.median(ours) * 1e3:6.1f} ms ({min(ours) * 1e3:.1f}-{max(ours) * 1e3:.1f})"
        worst = max(worst, statistics.median(ours))
        if llama_cpp is not None:
            with quiet_stderr():
                llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            ref = timed(lambda llm=llm: llm.tokenize(text, add_bos=True, special=True), args.reps)
            same = tok.tokenize(text) == llm.tokenize(text, add_bos=True, special=True)
            ratio = statistics.median(ref) / statistics.median(ours)
            spread = f"({min(ref) * 1e3:.1f}-{max(ref) * 1e3:.1f})"
            line += f"   llama.cpp {statistics.median(ref) * 1e3:6.1f} ms {spread}   hetero {ratio:.2f}x as fast"
            line += f", ids {'equal' if same else 'DIFFER'}"
            if not same:
                print(line)
                return 1
        print(line)
    if args.check_under is not None and worst > args.check_under:
        print(f"hetero's slowest median {worst:.3f} s is over the {args.check_under} s bound")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
