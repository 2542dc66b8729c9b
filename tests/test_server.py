"""The OpenAI-compatible server, as a client sees it: the real server process on a free
loopback port, the official `openai` client for good requests, raw HTTP for bad ones.
Answers are checked against the library itself (llmpress.load(...).generate, greedy) in
this process."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

import llmpress
from llmpress.runtime.server import exposure_warning, is_loopback

CTX = 512  # small, so that an over-long prompt is cheap to send
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXT_PROMPT = "The capital of France is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m llmpress.runtime.server MODEL` on a free port, until closed."""

    def __init__(self, model: Path, log_dir: Path, api_key: str | None = None, ctx: int = CTX,
                 extra_args: tuple[str, ...] = ()):
        self.base = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if k != "LLMPRESS_API_KEY"}
        # one thread: on a busy shared CPU, OpenMP teams stall on each other at every layer
        env["OMP_NUM_THREADS"] = "1"
        if api_key:
            env["LLMPRESS_API_KEY"] = api_key
        self.out, self.err = log_dir / "stdout.txt", log_dir / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llmpress.runtime.server", str(model),
                 "--port", self.base.rsplit(":", 1)[1], "--ctx", str(ctx), *extra_args],
                stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.err.read_text()
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0,
                             timeout=120)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(default_model_path, tmp_path_factory):
    proc = ServerProcess(default_model_path, tmp_path_factory.mktemp("server"))
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def lm(default_model_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server: the CPU is shared (see ServerProcess)
    yield llmpress.load(default_model_path, ctx=CTX)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_reference(lm):
    return lm.generate(lm.chat_prompt(CHAT), max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def text_reference(lm):
    return lm.generate(TEXT_PROMPT, max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def chat_answer(server):
    return server.client().chat.completions.create(
        model="smollm2", messages=CHAT, temperature=0, seed=7, max_tokens=8)


def test_startup_line_names_address_and_model(server, default_model_path):
    first = server.out.read_text().splitlines()[0]
    assert default_model_path.stem in first and server.base + "/v1" in first


def test_models_list(server, default_model_path):
    models = server.client().models.list().data
    assert [m.id for m in models] == [default_model_path.stem]
    assert server.client().models.retrieve(default_model_path.stem).id == default_model_path.stem


def test_chat_completion_equals_library_greedy(chat_answer, chat_reference, lm):
    choice = chat_answer.choices[0]
    assert chat_answer.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == chat_reference.text
    assert choice.finish_reason == chat_reference.finish_reason
    usage = chat_answer.usage
    assert usage.prompt_tokens == len(lm.encode(lm.chat_prompt(CHAT)))
    assert usage.completion_tokens == chat_reference.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_arrives_in_pieces_and_equals_non_streamed(server, chat_answer):
    pieces, times, finish, usage = [], [], None, None
    for chunk in server.client().chat.completions.create(
            model="smollm2", messages=CHAT, temperature=0, seed=7, max_tokens=8,
            stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                times.append(time.perf_counter())
            finish = choice.finish_reason or finish
    assert len(pieces) >= 3
    assert times[-1] - times[0] > 0.02  # sent as generated, not all at the end
    assert "".join(pieces) == chat_answer.choices[0].message.content
    assert finish == chat_answer.choices[0].finish_reason
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(usage, c) for c in counts] == [getattr(chat_answer.usage, c) for c in counts]


def test_completion_equals_library_greedy(server, text_reference, default_model_path):
    answer = server.client().completions.create(
        model=default_model_path.stem, prompt=TEXT_PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].text == text_reference.text
    assert answer.choices[0].finish_reason == text_reference.finish_reason
    assert answer.usage.prompt_tokens == text_reference.prompt_tokens
    assert answer.usage.completion_tokens == text_reference.completion_tokens


def test_stop_string(server, text_reference, lm):
    stop = text_reference.text.split()[1]  # a word the greedy answer reaches
    expected = text_reference.text[:text_reference.text.find(stop)]
    assert lm.generate(TEXT_PROMPT, 10, (stop,), temperature=0).text == expected
    answer = server.client().completions.create(
        model="smollm2", prompt=TEXT_PROMPT, max_tokens=8, temperature=0, stop=[stop, "@@"])
    assert answer.choices[0].text == expected
    assert answer.choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(server):
    answer = server.client().chat.completions.create(
        model="smollm2", messages=CHAT, temperature=0, max_completion_tokens=3)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3


def ask_concurrently(base: str, prompts: list[str], max_tokens: int, **extra) -> list[str]:
    """Greedy streamed completions, all prompts at once, through the async openai client."""
    async def ask_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                    timeout=120)

        async def ask(prompt: str) -> str:
            pieces = []
            async for chunk in await client.completions.create(
                    model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0,
                    stream=True, extra_body=extra or None):
                pieces.extend(c.text for c in chunk.choices)
            return "".join(pieces)

        return await asyncio.gather(*(ask(p) for p in prompts))

    return asyncio.run(ask_all())


def test_concurrent_clients_each_get_their_own_answer(server, lm):
    prompts = ["The capital of France is", "One, two, three,", "Water is made of"]
    expected = [lm.generate(p, max_tokens=4, temperature=0).text for p in prompts]
    assert ask_concurrently(server.base, prompts, 4) == expected


def test_disconnect_stops_the_generation(server):
    body = {"model": "smollm2", "prompt": TEXT_PROMPT, "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.base, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events == 4:
                    break  # leave mid-stream: closing the response drops the connection
        deadline = time.monotonic() + 20  # 400 tokens would take far longer on this CPU
        while http.get("/health").json()["busy"]:
            assert time.monotonic() < deadline, "the generation went on after the disconnect"
            time.sleep(0.1)
    time.sleep(0.3)
    assert re.search(r"POST /v1/completions 200 \d+\+\d+ tokens \(cancelled\)",
                     server.err.read_text())


BAD_REQUESTS = [
    # (name, path, raw body or JSON, status, code, param)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "smollm2", "messages": [', 400,
     "invalid_json", None),
    ("invalid UTF-8", "/v1/completions", b'{"model": "\xff\xfe"}', 400, "invalid_json", None),
    ("NaN", "/v1/completions", b'{"model": "smollm2", "prompt": "a", "temperature": NaN}',
     400, "invalid_json", None),
    ("absurd nesting", "/v1/completions", b"[" * 100_000, 400, "invalid_json", None),
    ("not an object", "/v1/chat/completions", [1, 2], 400, "invalid_json", None),
    ("no messages", "/v1/chat/completions", {"model": "smollm2"}, 400,
     "missing_required_parameter", "messages"),
    ("no model", "/v1/chat/completions", {"messages": CHAT}, 400,
     "missing_required_parameter", "model"),
    ("messages not an array", "/v1/chat/completions", {"model": "smollm2", "messages": "hi"},
     400, "invalid_type", "messages"),
    ("message without content", "/v1/chat/completions",
     {"model": "smollm2", "messages": [{"role": "user"}]}, 400, "missing_required_parameter",
     "messages[0].content"),
    ("unknown role", "/v1/chat/completions",
     {"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "invalid_value", "messages[0].role"),
    ("max_tokens a string", "/v1/chat/completions",
     {"model": "smollm2", "messages": CHAT, "max_tokens": "10"}, 400, "invalid_type",
     "max_tokens"),
    ("max_tokens a boolean", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "max_tokens": True}, 400, "invalid_type",
     "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"model": "smollm2", "prompt": "a", "max_tokens": 0},
     400, "invalid_value", "max_tokens"),
    ("temperature too high", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "temperature": 5}, 400, "invalid_value",
     "temperature"),
    ("stop a number", "/v1/completions", {"model": "smollm2", "prompt": "a", "stop": 3}, 400,
     "invalid_type", "stop"),
    ("too many stop strings", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "stop": ["x"] * 100}, 400, "invalid_value", "stop"),
    ("stream a string", "/v1/completions", {"model": "smollm2", "prompt": "a", "stream": "yes"},
     400, "invalid_type", "stream"),
    ("n above 8", "/v1/chat/completions", {"model": "smollm2", "messages": CHAT, "n": 9}, 400,
     "invalid_value", "n"),
    ("n huge", "/v1/chat/completions", {"model": "smollm2", "messages": CHAT, "n": 10**12}, 400,
     "invalid_value", "n"),
    ("n zero", "/v1/completions", {"model": "smollm2", "prompt": "a", "n": 0}, 400,
     "invalid_value", "n"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": "smollm2", "messages": CHAT, "top_logprobs": 2}, 400, "invalid_value",
     "top_logprobs"),
    ("top_logprobs too many", "/v1/chat/completions",
     {"model": "smollm2", "messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400,
     "invalid_value", "top_logprobs"),
    ("completions logprobs too many", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "logprobs": 6}, 400, "invalid_value", "logprobs"),
    ("unknown field", "/v1/chat/completions", {"model": "smollm2", "messages": CHAT, "foo": 1},
     400, "unsupported_parameter", "foo"),
    ("unknown completions field", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "functions": []}, 400, "unsupported_parameter",
     "functions"),
    ("unsupported penalty", "/v1/chat/completions",
     {"model": "smollm2", "messages": CHAT, "frequency_penalty": 0.5}, 400,
     "unsupported_parameter", "frequency_penalty"),
    ("suffix", "/v1/completions", {"model": "smollm2", "prompt": "a", "suffix": "b"}, 400,
     "unsupported_parameter", "suffix"),
    ("unknown stream option", "/v1/chat/completions",
     {"model": "smollm2", "messages": CHAT, "stream": True, "stream_options": {"x": True}},
     400, "unsupported_parameter", "stream_options.x"),
    ("unknown message field", "/v1/chat/completions",
     {"model": "smollm2", "messages": [{"role": "user", "content": "hi", "audio": {"id": "a"}}]},
     400, "unsupported_parameter", "messages[0].audio"),
    ("lone surrogate in model", "/v1/chat/completions",
     b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 400,
     "invalid_value", "model"),
    ("lone surrogate in content", "/v1/chat/completions",
     b'{"model": "smollm2", "messages": [{"role": "user", "content": "a\\udfffb"}]}', 400,
     "invalid_value", "messages[0].content"),
    ("lone surrogate in a key", "/v1/completions",
     b'{"model": "smollm2", "prompt": "a", "\\udc00": 1}', 400, "invalid_value", "body"),
    ("temperature infinite", "/v1/completions",
     b'{"model": "smollm2", "prompt": "a", "temperature": 1e999}', 400, "invalid_value",
     "temperature"),
    ("temperature negative", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "temperature": -0.5}, 400, "invalid_value",
     "temperature"),
    ("repeat_penalty tiny", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "repeat_penalty": 1e-300}, 400, "invalid_value",
     "repeat_penalty"),
    ("repeat_penalty huge", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "repeat_penalty": 1e300}, 400, "invalid_value",
     "repeat_penalty"),
    ("repeat_penalty negative", "/v1/completions",
     {"model": "smollm2", "prompt": "a", "repeat_penalty": -1}, 400, "invalid_value",
     "repeat_penalty"),
    ("top_p negative", "/v1/completions", {"model": "smollm2", "prompt": "a", "top_p": -1}, 400,
     "invalid_value", "top_p"),
    ("top_p infinite", "/v1/completions",
     b'{"model": "smollm2", "prompt": "a", "top_p": 1e999}', 400, "invalid_value", "top_p"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": CHAT}, 404,
     "model_not_found", "model"),
    ("no prompt", "/v1/completions", {"model": "smollm2"}, 400, "missing_required_parameter",
     "prompt"),
    ("token id out of range", "/v1/completions", {"model": "smollm2", "prompt": [1, 10**9]},
     400, "invalid_value", "prompt"),
    ("several prompts", "/v1/completions", {"model": "smollm2", "prompt": ["a", "b"]}, 400,
     "unsupported_value", "prompt"),
]


@pytest.mark.parametrize("name,path,body,status,code,param", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_error(server, name, path, body, status, code, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.base + path, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["code"], error["param"]) == (code, param)


def test_extreme_but_valid_values_are_served(server, chat_reference):
    """1e-300 is inside OpenAI's temperature range: served as its limit, greedy. Fields at
    their "off" value (as clients send defaults) are taken."""
    answer = server.client().chat.completions.create(
        model="smollm2", messages=CHAT, temperature=1e-300, top_p=1e-300, max_tokens=8,
        frequency_penalty=0, presence_penalty=0, logit_bias={}, user="u-1", store=False)
    assert answer.choices[0].message.content == chat_reference.text


def test_an_unexpected_fault_is_an_openai_shaped_500():
    """A bug in a route (here: a model whose encode fails) reaches the client as JSON."""
    from starlette.testclient import TestClient

    from llmpress.runtime.server import create_app

    class BrokenModel:
        context_length = 64
        model = SimpleNamespace(new_cache=lambda max_tokens: None)
        tokenizer = SimpleNamespace(chat_template=None)

        def chat_prompt(self, messages, **extra):
            return "x"

        def encode_prompt(self, text):
            raise RuntimeError("broken \ud800 encoder")

    with TestClient(create_app(BrokenModel(), "m"), raise_server_exceptions=False) as http:
        response = http.post("/v1/chat/completions", json={"model": "m", "messages": CHAT})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]


def test_next_chat_turn_reuses_the_prompt_cache(server):
    client = server.client()
    first = client.chat.completions.create(model="smollm2", messages=CHAT, temperature=0,
                                           max_tokens=6)
    history = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And of Spain?"}]
    second = client.chat.completions.create(model="smollm2", messages=history, temperature=0,
                                            max_tokens=6)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_n_choices(server):
    client = server.client()
    kwargs = dict(model="smollm2", messages=CHAT, temperature=1.0, seed=11, max_tokens=6)
    several = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in several.choices] == [0, 1, 2]
    single = client.chat.completions.create(**kwargs)
    assert several.choices[0].message.content == single.choices[0].message.content
    second = client.chat.completions.create(**{**kwargs, "seed": 12})  # choice i: seed + i
    assert several.choices[1].message.content == second.choices[0].message.content
    assert several.usage.prompt_tokens == single.usage.prompt_tokens
    assert several.usage.completion_tokens > single.usage.completion_tokens
    streamed = client.chat.completions.create(n=3, stream=True, **kwargs)
    texts, finishes = ["", "", ""], [None, None, None]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in several.choices]
    assert finishes == [c.finish_reason for c in several.choices]


def test_logprobs_are_the_model_log_softmax(server, lm):
    answer = server.client().chat.completions.create(
        model="smollm2", messages=CHAT, temperature=0, max_tokens=6, logprobs=True,
        top_logprobs=3)
    content = answer.choices[0].logprobs.content
    prompt = lm.encode(lm.chat_prompt(CHAT))
    tokens = lm.generate(prompt, max_tokens=6, temperature=0, prompt_cache=False).token_ids
    assert "".join(c.token for c in content) == answer.choices[0].message.content
    assert len(content) == len(tokens)
    reference = torch.log_softmax(lm.logits(prompt + tokens), dim=-1)[len(prompt) - 1:]
    for i, (entry, token) in enumerate(zip(content, tokens)):
        assert entry.token == lm.tokenizer.token_to_piece(token)
        assert abs(entry.logprob - reference[i, token].item()) < 1e-3
        assert [t.token for t in entry.top_logprobs][0] == entry.token
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes) == lm.tokenizer.token_bytes(token)
    legacy = server.client().completions.create(model="smollm2", prompt=TEXT_PROMPT,
                                                max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    streamed = server.client().chat.completions.create(
        model="smollm2", messages=CHAT, temperature=0, max_tokens=6, logprobs=True,
        stream=True)
    pieces = [e for c in streamed if c.choices and c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in pieces] == \
        [(e.token, round(e.logprob, 4)) for e in content]


def test_tokenize_and_detokenize(server, lm):
    text = "Hello, <|im_start|>wörld!"
    plain = httpx.post(server.base + "/tokenize", json={"content": text}, timeout=30).json()
    assert plain["tokens"] == lm.tokenizer.encode(text, add_bos=False, add_eos=False)
    special = httpx.post(server.base + "/tokenize", timeout=30,
                         json={"content": text, "add_special": True}).json()
    assert special["tokens"] == lm.encode(text)
    back = httpx.post(server.base + "/detokenize", json={"tokens": plain["tokens"]}, timeout=30)
    assert back.json()["content"] == text
    pieces = httpx.post(server.base + "/tokenize", timeout=30,
                        json={"content": "Hi there", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hi there"
    for path, body, param in (("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/detokenize", {"tokens": "1 2"}, "tokens"),
                              ("/tokenize", {}, "content"),
                              ("/tokenize", {"content": "a", "x": 1}, "x")):
        response = httpx.post(server.base + path, json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def read_metrics(server) -> dict[str, float]:
    text = httpx.get(server.base + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_count_requests_tokens_and_cache_hits(server):
    before = read_metrics(server)
    client = server.client()
    answers = [client.completions.create(model="smollm2", prompt=TEXT_PROMPT, max_tokens=3,
                                         temperature=0) for _ in range(2)]
    after = read_metrics(server)
    chat = 'llmpress_requests_total{path="/v1/completions",status="200"}'
    assert after[chat] - before.get(chat, 0) == 2
    assert after["llmpress_generated_tokens_total"] - before["llmpress_generated_tokens_total"] \
        == sum(a.usage.completion_tokens for a in answers)
    assert after["llmpress_prompt_cache_hits_total"] > before["llmpress_prompt_cache_hits_total"]
    assert after["llmpress_generated_tokens_per_second"] > 0
    assert after["llmpress_requests_waiting"] == 0


def test_cors_is_opt_in(server, default_model_path, tmp_path):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    closed = httpx.options(server.base + "/v1/chat/completions", headers=preflight, timeout=10)
    assert "access-control-allow-origin" not in closed.headers
    other = ServerProcess(default_model_path, tmp_path, api_key="k",
                          extra_args=("--cors", "http://app.example"))
    try:
        opened = httpx.options(other.base + "/v1/chat/completions", headers=preflight,
                               timeout=10)
        assert opened.status_code == 200  # a preflight carries no key
        assert opened.headers["access-control-allow-origin"] == "http://app.example"
        stranger = httpx.options(other.base + "/v1/chat/completions", timeout=10,
                                 headers={**preflight, "Origin": "http://evil.example"})
        assert stranger.headers.get("access-control-allow-origin") != "http://evil.example"
    finally:
        other.close()


def test_prompt_longer_than_context(server, lm):
    messages = [{"role": "user", "content": "word " * (CTX + 50)}]
    n_tokens = len(lm.encode(lm.chat_prompt(messages)))
    response = httpx.post(server.base + "/v1/chat/completions", timeout=30,
                          json={"model": "smollm2", "messages": messages})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert str(n_tokens) in error["message"] and str(CTX) in error["message"]
    with pytest.raises(openai.BadRequestError):  # the client sees it as OpenAI's would be
        server.client().completions.create(model="smollm2", prompt="word " * CTX)


def test_huge_bodies_are_refused_before_they_are_read(server, lm):
    """A declared body over the limit is a 413 at once; a text far past the context is
    refused by /tokenize before it is tokenized whole (found by the HTTP fuzzer: 2 MB of
    text raised the server's memory by 189 MiB)."""
    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000000000\r\n\r\n{")
        answer = b""
        while not answer.endswith(b"}") and (piece := sock.recv(65536)):
            answer += piece
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and '"code":"request_too_large"' in answer
    response = httpx.post(server.base + "/tokenize", json={"content": "word " * 200_000},
                          timeout=60)
    assert response.status_code == 400
    assert f"over {CTX} tokens" in response.json()["error"]["message"]
    short = httpx.post(server.base + "/tokenize", json={"content": "word " * 10}, timeout=30)
    assert short.json()["tokens"] == lm.tokenizer.encode("word " * 10, add_bos=False,
                                                         add_eos=False)


def test_unknown_paths_and_methods(server):
    for method, path, status in (("GET", "/v1/engines", 404),
                                 ("GET", "/v1/chat/completions", 405)):
        response = httpx.request(method, server.base + path, timeout=10)
        assert response.status_code == status
        assert response.json()["error"]["message"]


def test_server_survives_bad_requests_and_logs_each(server):
    """Runs after the bad-input tests: the process is up and answers a good request."""
    answer = server.client().completions.create(model="smollm2", prompt="Hi", max_tokens=2,
                                                temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert server.proc.poll() is None
    log = server.err.read_text()
    assert re.search(r"POST /v1/completions 200 \d+\+\d+ tokens \((stop|length)\) "
                     r"\d+\.\d\ds", log)
    assert re.search(r"POST /v1/chat/completions 400 - \d+\.\d\ds", log)
    assert "Traceback" not in log


def test_api_key(default_model_path, tmp_path):
    key = "sk-test-" + os.urandom(6).hex()
    server = ServerProcess(default_model_path, tmp_path, api_key=key)
    try:
        assert "API key required" in server.out.read_text()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            response = httpx.get(server.base + "/v1/models", headers=headers, timeout=10)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        client = server.client(key)
        assert client.models.list().data[0].id == default_model_path.stem
        answer = client.completions.create(model="smollm2", prompt="Hi", max_tokens=1)
        assert answer.object == "text_completion"
        assert httpx.get(server.base + "/health", timeout=10).status_code == 200
    finally:
        server.close()


def test_exposure_warning():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
