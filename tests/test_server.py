"""`hetero serve` as clients meet it: the real server in a subprocess on a free localhost port,
driven by the official `openai` client (and raw HTTP for what a client library would not send),
its answers compared with `Model.generate` on the same file in this process."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import random_prompt

import hetero
from hetero.chat_template import ChatTemplate
from hetero.conversation import ThinkSplitter
from hetero.sampling import SamplingParams
from hetero.server.app import _Reply
from hetero.server.worker import Job, Usage, Worker

openai = pytest.importorskip("openai")

CTX = 512
API_KEY = "sk-test-key"
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, path, *args, key: str | None = None):
        self.key = key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cli.main", "serve", str(path), "--port", str(self.port), "--ctx", str(CTX),
               "--threads", "2", *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        saw_loading = False
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                status, body = get(self.url + "/health")
                if status == 200 and body == {"status": "ok"}:
                    break
                saw_loading |= status == 503 and body == {"status": "loading"}
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.1)
        self.saw_loading = saw_loading

    def client(self, key: str = "none", **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kwargs)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def metric(self, name: str) -> float:
        _, text = get(
            self.url + "/metrics", raw=True, headers={"Authorization": f"Bearer {self.key}"} if self.key else {}
        )
        return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(f"hetero_{name} "))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def get(url: str, raw: bool = False, headers=None):
    return request("GET", url, None, raw, headers)


def request(method: str, url: str, data: bytes | None, raw: bool = False, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            body = r.read().decode()
            return r.status, (body if raw else json.loads(body))
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        return e.code, (body if raw else json.loads(body))


@pytest.fixture(scope="module")
def model_path(synth):
    return synth("tiny", "F32")


@pytest.fixture(scope="module")
def model(model_path):
    return hetero.load_model(model_path, n_ctx=CTX, gpu_mem="0", threads=2)


@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path, "--alias", "tiny-test")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def q8_model(synth):
    """A quantized file: int8 activation rounding and top-k routing turn any difference in a
    prompt's sums into other tokens, which the F32 file would hide."""
    return hetero.load_model(synth("tiny", "Q8_0"), n_ctx=CTX, gpu_mem="0", threads=2)


@pytest.fixture(scope="module")
def q8_server(synth):
    s = Server(synth("tiny", "Q8_0"), "--alias", "tiny-test")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def r1_server(model_path, tmp_path_factory):
    """An R1-style template (the reply opens with <think>), an API key and a queue of one."""
    template = tmp_path_factory.mktemp("tpl") / "r1.jinja"
    template.write_text(R1_TEMPLATE, encoding="utf-8")
    s = Server(model_path, "--chat-template-file", str(template), "--api-key", API_KEY, "--max-queue", "1",
               "--alias", "r1-test", key=API_KEY)  # fmt: skip
    yield s
    s.stop()


def expected(model, prompt, max_tokens, **sampling) -> str:
    return "".join(model.generate(prompt, max_tokens, **sampling))


def test_chat_equals_generate_streaming_or_not(server, model):
    client = server.client()
    want = expected(model, HELLO, 12, temperature=0)
    reply = client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason in ("length", "stop")
    n_prompt = len(model.chat_prompt(HELLO))
    assert reply.usage.prompt_tokens == n_prompt
    assert reply.usage.total_tokens == n_prompt + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == "stop" or reply.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(messages=HELLO, model="tiny-test", max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason


def test_seed_reproduces_sampled_text(server, model):
    client = server.client()
    texts = [
        client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=10, temperature=0.9, seed=7)
        .choices[0]
        .message.content  # fmt: skip
        for _ in range(2)
    ]
    assert texts[0] == texts[1] == expected(model, HELLO, 10, temperature=0.9, top_p=0.95, seed=7)


def test_text_completions_and_models(server, model):
    client = server.client()
    want = expected(model, "The capital of France is", 8, temperature=0)
    done = client.completions.create(model="tiny-test", prompt="The capital of France is", max_tokens=8,
                                     temperature=0)  # fmt: skip
    assert done.choices[0].text == want and done.object == "text_completion"
    streamed = client.completions.create(model="tiny-test", prompt="The capital of France is", max_tokens=8,
                                         temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == want
    ids = model.tokenize("Paris is")
    by_ids = client.completions.create(model="tiny-test", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == expected(model, ids, 5, temperature=0)
    assert [m.id for m in client.models.list()] == ["tiny-test"]


def test_stop_strings_end_the_reply_before_them(server, model):
    client = server.client()
    full = expected(model, HELLO, 30, temperature=0)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    reply = client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=30, temperature=0,
                                           stop=[stop, "never-there"])  # fmt: skip
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) as the server splits a reply (a random model may open one with <think>)."""
    splitter = ThinkSplitter()
    pieces = splitter.feed(text) + splitter.flush()
    return tuple("".join(t for k, t in pieces if k == kind) for kind in ("think", "answer"))


@pytest.mark.parametrize("weights", ["F32", "Q8_0"])
def test_prompt_cache_skips_the_earlier_turns(weights, request):
    """Three turns of one conversation: turns 2 and 3 take their history from the cache and
    answer as a cold run does, to the token, on float and quantized weights."""
    server, model = (
        request.getfixturevalue(n) for n in (("server", "model") if weights == "F32" else ("q8_server", "q8_model"))
    )
    client = server.client()
    history = [{"role": "user", "content": f"What is the capital of France? Answer in {os.getpid() % 97} words."}]
    for turn in range(3):
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model="tiny-test", messages=history, max_tokens=16, temperature=0)
        seconds = time.perf_counter() - t0
        message = reply.choices[0].message
        think, answer = getattr(message, "reasoning_content", None) or "", message.content
        assert (think, answer) == split_reasoning(expected(model, history, 16, temperature=0))
        cached = reply.usage.prompt_tokens_details.cached_tokens
        print(f"turn {turn + 1}: {reply.usage.prompt_tokens} prompt tokens, {cached} cached, {seconds:.2f} s")
        if turn:
            assert cached > 0 and cached < reply.usage.prompt_tokens
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And number {turn}?"}]
    assert server.metric("prompt_cache_hits_total") >= 2


def test_four_clients_at_once_answered_in_order(server, model):
    prompts = [[{"role": "user", "content": f"Count to {i} please."}] for i in range(4)]
    wants = [expected(model, p, 6, temperature=0) for p in prompts]
    first_chunk, texts = {}, {}

    def ask(i):
        chunks = server.client().chat.completions.create(model="tiny-test", messages=prompts[i], max_tokens=6,
                                                          temperature=0, stream=True)  # fmt: skip
        parts = []
        for c in chunks:
            parts.append(c.choices[0].delta.content or "")
            if parts[-1]:
                first_chunk.setdefault(i, time.monotonic())  # text: the job runs on the model
        texts[i] = "".join(parts)

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        time.sleep(0.3)  # arrival order 0, 1, 2, 3
    for t in threads:
        t.join(120)
    assert texts == dict(enumerate(wants))
    assert sorted(first_chunk, key=first_chunk.get) == [0, 1, 2, 3]


def test_a_client_that_leaves_frees_the_server(server):
    before = server.metric("requests_cancelled_total")
    stream = server.client().chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=400,
                                                      temperature=0, stream=True)  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()  # the connection goes; 400 tokens would take the tiny model ~10 s
    t0 = time.perf_counter()
    reply = server.client().chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=2)
    waited = time.perf_counter() - t0
    print(f"the next request answered after {waited:.2f} s")
    assert reply.usage.completion_tokens <= 2
    assert server.metric("requests_cancelled_total") == before + 1


def test_reasoning_goes_to_reasoning_content(r1_server, model):
    tok = model.tokenizer
    own, tok.chat = tok.chat, ChatTemplate(R1_TEMPLATE, tok.bos_text, tok.eos_text)
    try:
        text = expected(model, HELLO, 12, temperature=0)
    finally:
        tok.chat = own
    splitter = ThinkSplitter()
    splitter.inside = True  # the template opened <think>
    parts = {"think": "", "answer": ""}
    for kind, piece in splitter.feed(text) + splitter.flush():
        parts[kind] += piece
    client = r1_server.client(API_KEY)
    reply = client.chat.completions.create(model="r1-test", messages=HELLO, max_tokens=12, temperature=0)
    message = reply.choices[0].message
    assert parts["think"] and getattr(message, "reasoning_content", None) == parts["think"]
    assert message.content == parts["answer"]
    chunks = client.chat.completions.create(model="r1-test", messages=HELLO, max_tokens=12, temperature=0, stream=True)
    streamed = {"reasoning_content": "", "content": ""}
    for c in chunks:
        for key in streamed:
            streamed[key] += getattr(c.choices[0].delta, key, None) or ""
    assert streamed == {"reasoning_content": parts["think"], "content": parts["answer"]}


def test_reasoning_format_none_leaves_it_inline():
    reply = _Reply("chat", "m", None)
    reply.add("<think>a</think>b")
    whole = reply.whole(Usage(3, 0, 2, "stop", 0.1, 0.1))
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "<think>a</think>b"}
    split = _Reply("chat", "m", False)
    assert split.pieces("<think>a</th") + split.pieces("ink>b") + split.pieces(None) == [
        {"reasoning_content": "a"}, {"content": "b"}]  # fmt: skip


def test_full_queue_answers_429(r1_server):
    client = r1_server.client(API_KEY)
    running = client.chat.completions.create(model="r1-test", messages=HELLO, max_tokens=300, temperature=0,
                                             stream=True)  # fmt: skip
    for chunk in running:  # text has come: it runs on the model now
        if chunk.choices[0].delta.content or getattr(chunk.choices[0].delta, "reasoning_content", None):
            break
    waiting = threading.Thread(
        target=lambda: client.chat.completions.create(model="r1-test", messages=HELLO, max_tokens=1), daemon=True
    )
    waiting.start()
    deadline = time.monotonic() + 30
    while r1_server.metric("queue_length") < 1:  # the queue of one is full
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r1_server.metric("busy") == 1  # greedy, this reply does not end within 300 tokens
    status, body = request("POST", r1_server.url + "/v1/chat/completions", json.dumps({"messages": HELLO}).encode(),
                           headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    running.close()
    waiting.join(60)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"


def test_a_request_mid_generation_is_answered(server, model):
    """A chat request arriving while another generates: its template renders on the worker
    (rendering turns tracemalloc on process-wide, which crashed the decoding threads)."""
    client = server.client()
    long = client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=200, temperature=0,
                                          stream=True)  # fmt: skip
    for i, _ in enumerate(long):
        if i == 3:
            break
    answers = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(
                client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=3, temperature=0)
                .choices[0]
                .message.content
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for _ in long:  # the first reply goes on while the others wait
        pass
    for t in threads:
        t.join(120)
    assert answers == [expected(model, HELLO, 3, temperature=0)] * 3
    assert server.proc.poll() is None


def test_a_non_streaming_client_that_leaves_is_cancelled(server):
    before = server.metric("requests_cancelled_total")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        body = json.dumps({"messages": HELLO, "max_tokens": 400, "temperature": 0}).encode()  # greedy: no EOS
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        deadline = time.monotonic() + 30
        while server.metric("busy") < 1:  # it generates
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while server.metric("requests_cancelled_total") < before + 1:  # 400 tokens would take ~10 s more
        assert time.monotonic() < deadline, "the job went on after its client left"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "data,headers,status,code",
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b"[1, 2]", {}, 400, "invalid_json"),
        (json.dumps({"model": "r1-test"}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"messages": "hi"}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"messages": HELLO, "temperature": "hot"}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"messages": HELLO, "top_p": 3}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"messages": HELLO, "max_tokens": 0}).encode(), {}, 400, "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1' + b"0" * 400 + b"}", {}, 400,
         "invalid_value"),
        (json.dumps({"messages": HELLO, "seed": 2**70}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"messages": HELLO, "seed": -1}).encode(), {}, 400, "invalid_value"),
        (b"[" * 100000 + b"]" * 100000, {}, 400, "invalid_json"),
        (json.dumps({"messages": HELLO, "n": 2}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"messages": HELLO, "stop": [1]}).encode(), {}, 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), {}, 400,
         "invalid_value"),
        (json.dumps({"messages": HELLO, "model": "gpt-4"}).encode(), {}, 404, "model_not_found"),
        (json.dumps({"messages": [{"role": "user", "content": "hello " * 600}]}).encode(), {}, 400,
         "context_length_exceeded"),
        (json.dumps({"messages": HELLO}).encode(), {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
        (json.dumps({"messages": HELLO}).encode(), None, 401, "invalid_api_key"),
    ],
)  # fmt: skip
def test_bad_requests_are_answered_the_openai_way(r1_server, data, headers, status, code):
    auth = {"Authorization": f"Bearer {API_KEY}"} if headers is not None else {}
    got, body = request("POST", r1_server.url + "/v1/chat/completions", data, headers={**auth, **(headers or {})})
    assert got == status, body
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]
    if code == "context_length_exceeded":
        assert str(CTX) in body["error"]["message"] and "tokens" in body["error"]["message"]


def test_oversized_body_is_refused_before_it_is_read(r1_server):
    with socket.create_connection(("127.0.0.1", r1_server.port), timeout=30) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {9 << 20}\r\n\r\n{{".encode())  # fmt: skip
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            piece = s.recv(65536)
            if not piece:
                break
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["message"].startswith("the request body of")


def test_still_healthy_after_bad_requests(r1_server):
    for path in ("/v1/nothing", "/v1/chat/completions"):
        status, body = get(r1_server.url + path, headers={"Authorization": f"Bearer {API_KEY}"})
        assert status in (404, 405) and body["error"]["message"]
    assert get(r1_server.url + "/health") == (200, {"status": "ok"})
    reply = r1_server.client(API_KEY).completions.create(model="r1-test", prompt="Hello", max_tokens=2)
    assert reply.usage.completion_tokens <= 2


def test_rss_flat_over_fifty_requests(server):
    client = server.client()
    for i in range(5):
        client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=4, seed=i)
    before = server.rss_kib()
    for i in range(50):
        client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": f"Say {i}"}],
                                       max_tokens=4, seed=i)  # fmt: skip
    grown = (server.rss_kib() - before) / 1024
    print(f"RSS after 50 requests: {grown:+.1f} MiB")
    assert grown < 50


def test_cli_refuses_bad_options_in_one_line(model_path, server):
    for args, needle in (
        (["--port", "0"], "--port 0"),
        (["--reasoning-format", "xml"], "--reasoning-format"),
        (["--port", str(server.port)], "cannot listen"),
        (["--chat-template-file", "/nonexistent.jinja"], "cannot read"),
        (["--cache-slots", "0"], "--cache-slots 0"),
    ):
        run = subprocess.run([sys.executable, "-m", "cli.main", "serve", str(model_path), *args], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
        assert run.returncode == 2 and needle in run.stderr and "Traceback" not in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "cli.main", "serve", "/nonexistent.gguf"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    help_text = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--help"], capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "200"}).stdout  # fmt: skip
    assert "Example: hetero serve" in help_text


def run_job(worker: Worker, ids: list[int], max_tokens: int = 8) -> tuple[str, Usage]:
    """One greedy request straight to the worker (no HTTP): its text and usage."""
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        done.set() if event[0] in ("done", "error", "refused") else None

    assert worker.submit(Job(lambda: list(ids), max_tokens, SamplingParams(temperature=0), (), emit))
    assert done.wait(120) and events[-1][0] == "done", events[-1]
    return "".join(e[1] for e in events if e[0] == "text"), events[-1][1]


def test_the_prompt_cache_keeps_several_conversations(q8_model):
    """Two slots: a request of another conversation between two turns (a front-end's title
    request) does not cost the first its cache; the resumed turn answers as a cold run. A
    third conversation drops the least recently used. One slot: the other request evicts."""
    rng = np.random.default_rng()
    bos = q8_model.tokenizer.bos_id
    a, b, c = (random_prompt(int(rng.integers(20, 40)), bos) for _ in range(3))
    a[1], b[1], c[1] = 601, 602, 603  # three conversations apart from their second token on
    more = rng.integers(0, 600, 5).tolist()
    worker = Worker(q8_model, 4, slots=2)
    try:
        assert run_job(worker, a)[1].cached_tokens == 0
        assert run_job(worker, b)[1].cached_tokens <= 1  # BOS at most
        text, usage = run_job(worker, a + more)
        assert usage.cached_tokens == len(a) and text == expected(q8_model, a + more, 8, temperature=0)
        assert "hetero_prompt_cache_conversations 2" in worker.metrics_text()
        run_job(worker, c)  # a is copied out, b (used least recently) dropped
        assert run_job(worker, b + more)[1].cached_tokens <= 1
        assert run_job(worker, c + more)[1].cached_tokens == len(c)
    finally:
        worker.close()
    worker = Worker(q8_model, 4, slots=1)
    try:
        run_job(worker, a)
        run_job(worker, b)
        assert run_job(worker, a + more)[1].cached_tokens <= 1
    finally:
        worker.close()
