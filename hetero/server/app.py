"""The ASGI application: OpenAI's chat and text completions, models, health and metrics.

Starlette rather than FastAPI: the routes are five and their bodies are checked by hand
(`requests.py`) so that every refusal reads as OpenAI's do ({"error": {...}}, the field
named); FastAPI's value, pydantic models and generated docs, would add a dependency and
answer bad bodies in its own format. uvicorn serves it (cli/main.py).
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from hetero.conversation import THINK_OPEN, ThinkSplitter
from hetero.sampling import SamplingParams
from hetero.server import requests
from hetero.server.requests import ApiError, first_line
from hetero.server.worker import Job, Usage, Worker
from modelfile.errors import HeteroError

MAX_BODY_BYTES = 8 << 20  # a 128k-token history is ~0.5 MB of text
RETRY_AFTER_S = 5


@dataclass
class ServerState:
    alias: str
    api_key: str | None = None
    defaults: SamplingParams = SamplingParams()
    reasoning: bool = True  # DeepSeek-R1's <think> text as reasoning_content
    max_body: int = MAX_BODY_BYTES
    worker: Worker | None = None  # None while the model loads
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(state: ServerState) -> Starlette:
    async def health(request: Request) -> Response:
        if state.worker is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        _authorize(request, state)
        card = {"id": state.alias, "object": "model", "created": state.created, "owned_by": "hetero"}
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(request: Request) -> Response:
        _authorize(request, state)
        worker = _ready(state)
        return PlainTextResponse(worker.metrics_text(), media_type="text/plain; version=0.0.4")

    async def chat(request: Request) -> Response:
        body = await _body(request, state)
        messages = requests.messages(body)
        settings = requests.settings(body, state.defaults)
        worker = _ready(state)

        def prepare() -> list[int]:
            try:
                return worker.model.chat_prompt(messages)
            except HeteroError as e:  # the template refused these messages (raise_exception, a limit)
                raise ApiError(400, str(e), code="invalid_messages", param="messages") from None

        return await _complete(request, state, worker, prepare, settings, "chat")

    async def completions(request: Request) -> Response:
        body = await _body(request, state)
        prompt = requests.prompt(body)
        settings = requests.settings(body, state.defaults)
        worker = _ready(state)
        if not isinstance(prompt, str):
            n_vocab = worker.model.config.n_vocab
            if not all(0 <= t < n_vocab for t in prompt):
                raise ApiError(400, f"'prompt': token ids must be from 0 to {n_vocab - 1}", param="prompt")
        prepare = (lambda: worker.model.tokenize(prompt)) if isinstance(prompt, str) else (lambda: list(prompt))
        return await _complete(request, state, worker, prepare, settings, "text")

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers)


# -- request checks ------------------------------------------------------------------------------


def _authorize(request: Request, state: ServerState) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if given != f"Bearer {state.api_key}":
        what = "No API key provided" if not given else "Incorrect API key provided"
        raise ApiError(401, f"{what}: send 'Authorization: Bearer KEY'", code="invalid_api_key")


def _ready(state: ServerState) -> Worker:
    if state.worker is None:
        raise ApiError(503, "the model is still loading; GET /health says when it is ready", "server_error", "loading")
    return state.worker


async def _body(request: Request, state: ServerState) -> dict:
    """The JSON object of a POST, read no further than the size limit."""
    _authorize(request, state)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body:
        raise ApiError(413, f"the request body of {declared} bytes is over the {state.max_body}-byte limit")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > state.max_body:
            raise ApiError(413, f"the request body is over the {state.max_body}-byte limit")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is not None and model != state.alias:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {state.alias!r}",
                       code="model_not_found", param="model")  # fmt: skip
    return body


# -- running a request ---------------------------------------------------------------------------


async def _complete(request, state, worker: Worker, prepare, settings, kind: str) -> Response:
    """Queue the job, wait for its turn (watching for the client leaving), then answer whole or
    as a stream. The prompt is tokenized on the worker (worker.py says why), so a prompt over
    the context is refused when its turn comes."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(prepare, settings.max_tokens, settings.sampling, settings.stop,
              lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))  # fmt: skip
    if not worker.submit(job):
        raise ApiError(429, "the server is busy with other requests; try again shortly", "rate_limit_error",
                       "rate_limit_exceeded")  # fmt: skip
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    streaming = False
    try:
        first = await events.get()
        if first[0] == "refused":
            raise first[1]
        if first[0] != "start":  # cancelled: nobody is listening any more
            return Response(status_code=499)
        thinking = None  # R1's reasoning left in the content
        if state.reasoning and kind == "chat":  # split out; already open if the template opened it
            thinking = worker.model.detokenize(first[1][-8:]).rstrip().endswith(THINK_OPEN)
        reply = _Reply(kind, state.alias, thinking)
        if settings.stream:
            streaming = True
            watcher.cancel()  # from here the stream notices the client leaving (its sends fail)
            return StreamingResponse(
                _stream(job, events, reply, settings.include_usage), media_type="text/event-stream"
            )
        while True:
            event = await events.get()
            if event[0] == "text":
                reply.add(event[1])
            elif event[0] == "error":
                raise _generation_failed(event[1])
            else:
                return JSONResponse(reply.whole(event[1]))
    finally:
        watcher.cancel()
        if not streaming:
            job.cancel.set()  # a no-op once the job is done; stops it if this handler ended early


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes, whether or not tokens are flowing."""
    while not job.cancel.is_set():
        if await request.is_disconnected():
            job.cancel.set()
            return
        await asyncio.sleep(0.2)


async def _stream(job: Job, events: asyncio.Queue, reply: "_Reply", include_usage: bool):
    try:
        yield _sse(reply.chunk({"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if event[0] == "text":
                for delta in reply.pieces(event[1]):
                    yield _sse(reply.chunk(delta))
            elif event[0] == "error":
                yield _sse(_generation_failed(event[1]).body())
                break
            else:
                usage: Usage = event[1]
                for delta in reply.pieces(None):
                    yield _sse(reply.chunk(delta))
                yield _sse(reply.chunk({}, usage.finish_reason))
                if include_usage:
                    yield _sse({**reply.chunk(None), "choices": [], "usage": _usage(usage)})
                break
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel.set()  # the client left (the task is cancelled) or the stream ended


def _generation_failed(why: str) -> ApiError:
    return ApiError(500, f"generation failed: {why}", "server_error", "generation_failed")


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _usage(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


class _Reply:
    """The text of one choice as it grows, in chat or text-completion shape. With `thinking`
    not None, R1's reasoning goes to reasoning_content (True: the prompt already opened it)."""

    def __init__(self, kind: str, model: str, thinking: bool | None):
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.splitter = None
        if thinking is not None and kind == "chat":
            self.splitter = ThinkSplitter()
            self.splitter.inside = thinking
        self.parts = {"content": [], "reasoning_content": []}  # what a whole reply collects

    def pieces(self, text: str | None) -> list[dict]:
        """Stream deltas for new text (None: the end, flushing held-back text)."""
        if self.splitter is None:
            return [{"content": text}] if text else []
        split = self.splitter.flush() if text is None else self.splitter.feed(text)
        return [{"reasoning_content" if kind == "think" else "content": t} for kind, t in split]

    def add(self, text: str | None) -> None:
        """Collect new text (None: the end) for `whole`."""
        for delta in self.pieces(text):
            for key, t in delta.items():
                self.parts[key].append(t)

    def chunk(self, delta: dict | None, finish: str | None = None) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": _finish(finish)}
            return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [choice]}  # fmt: skip
        text = (delta or {}).get("content", "")
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(finish)}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}  # fmt: skip

    def whole(self, usage: Usage) -> dict:
        self.add(None)
        answer, think = "".join(self.parts["content"]), "".join(self.parts["reasoning_content"])
        head = {"id": self.id, "created": self.created, "model": self.model, "usage": _usage(usage)}
        finish = _finish(usage.finish_reason)
        if self.kind == "text":
            choice = {"index": 0, "text": answer, "logprobs": None, "finish_reason": finish}
            return {**head, "object": "text_completion", "choices": [choice]}
        message = {"role": "assistant", "content": answer}
        if think:
            message["reasoning_content"] = think
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {**head, "object": "chat.completion", "choices": [choice]}


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


# -- errors ----------------------------------------------------------------------------------------


async def _api_error(request: Request, e: ApiError) -> Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _http_error(request: Request, e: HTTPException) -> Response:
    what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    message = what.get(e.status_code, str(e.detail))
    return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code)


async def _internal_error(request: Request, e: Exception) -> Response:
    return JSONResponse(ApiError(500, f"internal error: {first_line(e)}", "server_error").body(), status_code=500)
