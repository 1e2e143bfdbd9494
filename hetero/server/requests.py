"""OpenAI request bodies -> validated generation settings, or an `ApiError` naming the field.

Fields the protocol has but this server does not act on (penalties, logit_bias, tools, user,
...) are ignored, as llama-server ignores them: front-ends send them with neutral values on
every request. Fields it cannot honour in a way a client would rely on are refused (n > 1,
logprobs), so that nobody gets silently less than they asked for.
"""

import math
from dataclasses import dataclass

from hetero.sampling import SamplingParams, sampling_problem

MAX_STOP_STRINGS = 16
MAX_NUMBER = 2**63 - 1  # no setting needs more; a seed must fit torch's 64-bit generator


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status and {"error": {message, type, code, param}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}


def first_line(e: BaseException) -> str:
    """An exception as the one line a client or the log gets."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


@dataclass(frozen=True)
class Settings:
    """What one request asks of the generator."""

    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: what the context leaves
    sampling: SamplingParams
    stop: tuple[str, ...]


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}': {message}", code="invalid_value", param=param)


def _number(body: dict, name: str, default, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise _bad(name, f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite or abs(value) > MAX_NUMBER:
        raise _bad(name, f"expected a finite number of at most {MAX_NUMBER:.0e}, got {str(value)[:40]}")
    return kind(value)


def settings(body: dict, defaults: SamplingParams) -> Settings:
    """The generation settings common to chat and text completions."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", f"expected true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "expected an object")
    n = _number(body, "n", 1, int)
    if n != 1:
        raise _bad("n", f"only 1 choice per request is supported, got {n}")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs", "log probabilities are not supported")
    max_tokens = _number(body, "max_completion_tokens", None, int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, int)
    if max_tokens is not None and max_tokens < 1:
        raise _bad("max_tokens", f"must be at least 1, got {max_tokens}")
    temperature = _number(body, "temperature", defaults.temperature)
    top_p = _number(body, "top_p", defaults.top_p)
    top_k = _number(body, "top_k", defaults.top_k, int)
    min_p = _number(body, "min_p", defaults.min_p)
    seed = _number(body, "seed", defaults.seed, int)
    if seed is not None and seed < 0:
        raise _bad("seed", f"must be 0 or more, got {seed}")
    problem = sampling_problem(temperature, top_p, top_k, min_p)
    if problem:  # "--top-p 2: must be ..." -> "'top_p': must be ..."
        option, _, why = problem.partition(": ")
        raise _bad(option.split()[0].lstrip("-").replace("-", "_"), why)
    return Settings(
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature, top_k, top_p, min_p, seed),
        stop=_stop(body.get("stop")),
    )


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "expected a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    return tuple(s for s in stops if s)


def messages(body: dict) -> list[dict]:
    """The chat messages as the template expects them: role and text content. Content given as
    a list of parts keeps its text parts, joined; other parts (images, audio) are refused."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages': expected a non-empty list of messages", code="invalid_value", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(where, "expected an object with a 'role'")
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content", "only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", "expected a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def prompt(body: dict) -> str | list[int]:
    """A text completion's prompt: a string, a list of one string, or a list of token ids."""
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise _bad("prompt", "expected a string or a non-empty list of token ids (one prompt per request)")
