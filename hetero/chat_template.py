"""The file's chat template: a Jinja program shipped inside a downloaded file, so it renders in an
immutable sandbox with bounded time, memory and output, and any failure is one line.

Jinja's sandbox stops attribute tricks, but not work: nested loops, `'a' * 10**10`, a string
doubled in a loop or endless recursion would hang or exhaust the machine. Bounds here: `*` and
`**` refuse results over the output limit before computing them; lipsum is gone; while the
template runs, a trace function on its own frames checks the clock and the memory it has
allocated (tracemalloc) every few lines; the rendered text is collected piece by piece and cut
off at the output limit.
"""

import math
import sys
import time
import tracemalloc

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from modelfile.errors import HeteroError

# DeepSeek-V3/R1's chat format, used when a file carries no template.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
TIME_LIMIT_S = 2.0
MEMORY_LIMIT = 256 * 2**20  # bytes the template may hold allocated while it runs
OUTPUT_LIMIT = 8 * 2**20  # characters: far above any context's worth of prompt
_CHECK_EVERY = 1  # template lines between checks: one line can double a string


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*" and _size_of_repeat(left, right) > OUTPUT_LIMIT:
            raise TemplateError(f"'*' would make a value of {_size_of_repeat(left, right):,} items")
        if operator == "**" and _power_too_big(left, right):
            raise TemplateError(f"'**' with exponent {right!r} is too large")
        return super().call_binop(context, operator, left, right)


def _size_of_repeat(left, right) -> int:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(n, int):
            return len(seq) * n
    return 0


def _power_too_big(base, exponent) -> bool:
    if not isinstance(base, int | float) or not isinstance(exponent, int | float):
        return False
    if abs(base) <= 1 or exponent <= 0:
        return False
    return exponent * math.log2(abs(base)) > 4096  # past float range; ints that size are a bomb


class ChatTemplate:
    def __init__(self, source: str | None, bos_text: str, eos_text: str, where: str = "the file"):
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals.pop("lipsum", None)  # lipsum(n=10**7) is unbounded work for nothing
        env.globals["raise_exception"] = _raise_template_error
        self.where = where
        try:
            self._template = env.from_string(source or FALLBACK_TEMPLATE)
        except (TemplateError, RecursionError, MemoryError, ValueError, TypeError) as e:
            raise HeteroError(f"{where}: chat template does not parse ({_one_line(e)})") from None
        self.bos_text, self.eos_text = bos_text, eos_text

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        values = {"messages": messages, "add_generation_prompt": add_generation_prompt,
                  "bos_token": self.bos_text, "eos_token": self.eos_text}  # fmt: skip
        guard = _Guard()
        out, size = [], 0
        try:
            with guard:
                for piece in self._template.generate(**values):
                    size += len(piece)
                    if size > OUTPUT_LIMIT:
                        raise TemplateError(f"output passed {OUTPUT_LIMIT:,} characters")
                    out.append(piece)
        except Exception as e:  # a template is a program from the file: any failure is its failure
            raise HeteroError(f"chat template of {self.where} failed: {_one_line(e)}") from None
        return "".join(out)


class _Guard:
    """While a template renders: a trace function on the template's frames (compiled templates
    have the file name '<template>') that checks time and traced memory every few lines."""

    def __enter__(self):
        self.deadline = time.monotonic() + TIME_LIMIT_S
        self.lines = 0
        self.own_tracemalloc = not tracemalloc.is_tracing()
        if self.own_tracemalloc:
            tracemalloc.start()
        self.base = tracemalloc.get_traced_memory()[0]
        self.previous = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(self.previous)
        if self.own_tracemalloc:
            tracemalloc.stop()
        return False

    def _call(self, frame, event, arg):
        return self._line if frame.f_code.co_filename == "<template>" else None

    def _line(self, frame, event, arg):
        self.lines += 1
        if self.lines % _CHECK_EVERY == 0:
            if time.monotonic() > self.deadline:
                raise TemplateError(f"took longer than {TIME_LIMIT_S:g} s")
            if tracemalloc.get_traced_memory()[0] - self.base > MEMORY_LIMIT:
                raise TemplateError(f"held more than {MEMORY_LIMIT // 2**20} MiB")
        return self._line


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, TemplateError) else f"{type(e).__name__}: {text}"[:300]


def _raise_template_error(message: str):
    raise TemplateError(message)
