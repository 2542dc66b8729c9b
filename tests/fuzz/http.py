"""Hostile HTTP requests against a real `llmpress serve` (python -m llmpress.runtime.server,
started here on a free loopback port with an API key): structure-aware mutations of valid
chat, completions, tokenize and detokenize requests, plus broken transports (content
types, truncated or invalid JSON, methods, paths, Authorization headers).

Outcomes: ok (2xx, a streamed answer read to its end without an error event), error (a 4xx
whose body is OpenAI's error object), bad-error (a 4xx without it), server-error (any
5xx, or a server_error inside a stream: the server's own fault), hang (no answer within
the timeout), no-answer (the connection closed without an HTTP answer) and crash (the
server process died). Only the first two are acceptable; the
runner restarts the server after a hang or a crash.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmpress.plan.machine import peak_rss_bytes

API_KEY = "fuzz-key"
CTX = 128  # an absurd max_tokens is clamped to what the context leaves: each answer is cheap


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, bytes]
    body: bytes
    label: str  # what was mutated, for the report


# --- valid requests the mutations start from ---------------------------------------------
def base_bodies(model: str) -> dict[str, dict]:
    return {
        "/v1/chat/completions": {"model": model, "max_tokens": 2, "temperature": 0,
                                 "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hello!"}]},
        "/v1/completions": {"model": model, "prompt": "The capital of France is",
                            "max_tokens": 2, "temperature": 0},
        "/tokenize": {"content": "Hello world", "add_special": True},
        "/detokenize": {"tokens": [1, 2, 3]},
    }


FIELDS = ("model", "max_tokens", "max_completion_tokens", "n", "logprobs", "top_logprobs",
          "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop",
          "stream", "stream_options", "ignore_eos", "user", "echo", "prompt", "messages",
          "response_format", "tools", "tool_choice", "parallel_tool_calls",
          "frequency_penalty", "presence_penalty", "logit_bias", "best_of", "suffix",
          "content", "add_special", "with_pieces", "tokens", "no_such_field", "__proto__", "")


class Raw:
    """JSON text put into a body as is (what json.dumps cannot write: deep nesting)."""

    def __init__(self, text: str):
        self.text = text


def hostile_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(16)
    if kind == 0:
        return rng.choice([math.nan, math.inf, -math.inf])  # written as NaN / Infinity
    if kind == 1:
        return rng.choice([1e-300, -1e-300, 5e-324, 1e300, 1e308, -0.0, 0.5, 2.0000001])
    if kind == 2:
        return rng.choice([0, -1, 1, 2, 8, 9, 20, 21, 2**31, 2**63, 2**64, 10**30, -(10**30),
                           10**400])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return rng.choice(["", "x", "\ud800", "a\udfffb", "\x00", "\u2028", "NaN", "1e999",
                           "<|im_start|>", "<|im_end|>system\n", "{{ 7*7 }}", "\\u0000"])
    if kind == 5:
        return "x" * rng.choice([1000, 100_000, 2_000_000])
    if kind == 6:
        return Raw("[" * rng.choice([100, 5000, 200_000]) + "]" * rng.choice([0, 100, 5000]))
    if kind == 7:
        return Raw('{"a":' * rng.choice([500, 50_000]) + "1" + "}" * 500)
    if kind == 8:
        return [rng.randrange(-5, 60000) for _ in range(rng.choice([0, 1, 10, 1000, 200_000]))]
    if kind == 9 and depth < 2:
        return [hostile_value(rng, depth + 1) for _ in range(rng.choice([1, 2, 5]))]
    if kind == 10 and depth < 2:
        return {rng.choice(FIELDS + ("type", "text", "role")): hostile_value(rng, depth + 1)
                for _ in range(rng.choice([0, 1, 3]))}
    if kind == 11:
        return {"type": rng.choice(["json_schema", "json_object", "text", "function", "x"]),
                "json_schema": rng.choice([{}, {"schema": hostile_schema(rng)}, 7, None]),
                "function": rng.choice([{}, {"name": "f"}, {"name": "x" * 65}, 3])}
    if kind == 12:
        return [{"type": "function", "function": {
            "name": rng.choice(["f", "get-weather", "", "x y", "a" * 64, 7]),
            "parameters": hostile_schema(rng),
            "description": rng.choice(["d", 5, None])}} for _ in range(rng.choice([1, 2, 129]))]
    if kind == 13:
        return [{"role": rng.choice(["user", "assistant", "tool", "system", "developer",
                                     "root", "", 1]),
                 "content": rng.choice(["hi", "", None, 5, [], [{"type": "text", "text": "a"}],
                                        [{"type": "image_url", "image_url": {"url": "x"}}],
                                        [{"type": "text", "text": 5}], {"text": "a"}]),
                 **rng.choice([{}, {"name": "n"}, {"tool_calls": rng.choice([
                     [], 5, [{"id": "1", "type": "function",
                              "function": {"name": "f", "arguments": "{"}}],
                     [{"function": {"name": 5}}]])}, {"tool_call_id": 5}])}
                for _ in range(rng.choice([0, 1, 2, 40]))]
    if kind == 14:
        return {"include_usage": rng.choice([True, "yes", None, 1]),
                **rng.choice([{}, {"extra": 1}])}
    return rng.choice([["\n"], ["a"] * 17, "x" * 257, [5], [""], [None], ["\ud800"]])


def hostile_schema(rng: random.Random):
    return rng.choice([
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/loop"}},
         "$defs": {"loop": {"$ref": "#/$defs/loop"}}},
        {"type": "string", "pattern": "(a+)+$" * 50},
        {"type": "array", "minItems": 10**9, "items": {"type": "integer"}},
        {"type": "string", "minLength": 10**12},
        {"type": "integer", "minimum": 10, "maximum": 1},
        {"enum": []}, {"type": "nope"}, {"anyOf": []}, {"not": {}}, 5, [], "object",
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)},
         "required": [f"p{i}" for i in range(300)]},
    ])


def dumps(value) -> str:
    """JSON text with NaN/Infinity, lone surrogates as \\u escapes and Raw pieces."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list) and any(isinstance(v, (Raw, dict, list)) for v in value):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def mutate_body(body: dict, rng: random.Random) -> tuple[dict, str]:
    labels = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.randrange(10)
        if op < 6:
            name = rng.choice(list(body) if body and rng.random() < 0.5 else FIELDS)
            body[name] = hostile_value(rng)
            labels.append(f"{name}=")
        elif op < 7 and body:
            name = rng.choice(list(body))
            del body[name]
            labels.append(f"-{name}")
        elif op < 8 and isinstance(body.get("messages"), list) and body["messages"]:
            message = rng.choice(body["messages"])
            if isinstance(message, dict):
                name = rng.choice(["role", "content", "name", "tool_calls", "tool_call_id",
                                   "refusal", "x"])
                message[name] = hostile_value(rng)
                labels.append(f"messages[].{name}=")
        elif op < 9:  # a valid request with every option at an extreme
            # (n=8 with the context's worth of tokens each would only be slow)
            max_tokens, n = rng.choice([(1, 8), (10**9, 1), (2**63, 1), (1, 1)])
            body.update({"max_tokens": max_tokens, "n": n,
                         "temperature": rng.choice([0, 2, 1e-300]),
                         "top_k": rng.choice([0, 1, 10**12]), "top_p": rng.choice([0, 1e-300]),
                         "min_p": rng.choice([0, 1]), "seed": rng.choice([-(2**63), 2**64 - 1]),
                         "stream": rng.random() < 0.5})
            labels.append("extremes")
        else:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            labels.append("stream")
    return body, ",".join(labels)


def make_request(rng: random.Random, model: str) -> Request:
    bodies = base_bodies(model)
    path = rng.choice(list(bodies))
    headers = {"content-type": b"application/json", "authorization": f"Bearer {API_KEY}".encode()}
    body, label = mutate_body(bodies[path], rng)
    raw = dumps(body).encode("utf-8", "surrogatepass")
    method = "POST"
    op = rng.randrange(100)
    if op < 8:  # the transport, not the body
        sub = rng.randrange(6)
        if sub == 0:
            raw, label = raw[:rng.randrange(len(raw) + 1)], "truncated"
        elif sub == 1:
            raw, label = raw.replace(b'"', b"'", 1), "invalid json"
        elif sub == 2:
            raw, label = b"\xff\xfe" + raw + b"\xc3", "invalid utf-8"
        elif sub == 3:
            raw, label = rng.choice([b"", b"null", b"[]", b"7", b'"x"', b"{}"]), "not an object"
        elif sub == 4:
            headers["content-type"] = rng.choice([b"text/plain", b"multipart/form-data",
                                                  b"application/x-www-form-urlencoded", b"",
                                                  b"application/json; charset=latin-1"])
            label = "content-type"
        else:
            raw, label = b"{" + b'"a":1,' * 2_000_000 + b'"b":2}', "many keys"
    elif op < 14:
        headers["authorization"] = rng.choice([
            b"", b"Bearer", b"Bearer ", b"Bearer wrong", b"Basic Zm9vOmJhcg==",
            b"bearer " + API_KEY.encode(), b"Bearer " + API_KEY.encode() + b"x",
            b"Bearer \xff\xfe", b"Bearer " + b"k" * 100_000, b"Bearer  " + API_KEY.encode()])
        label = "authorization"
    elif op < 20:
        method, path = rng.choice([
            ("GET", path), ("PUT", path), ("DELETE", "/v1/models"), ("PATCH", "/health"),
            ("OPTIONS", path), ("GET", "/v1/models/" + "x" * 5000), ("GET", "/v1/models/%00"),
            ("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd"), ("POST", "/v1/chat/completions/x"),
            ("POST", "/v1//completions"), ("GET", "/" + "a/" * 2000), ("GET", "/metrics"),
            ("GET", "/v1/models/%ff%fe"), ("GET", "/health?x=" + "y" * 8000)])
        label = f"{method} {path[:40]}"
    return Request(method, path, headers, raw, label)


# --- the server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m llmpress.runtime.server MODEL --api-key ...` on a free loopback port."""

    def __init__(self, model: Path, log_dir: Path, env: dict | None = None):
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log = log_dir / f"server-{port}.log"
        environment = dict(env or os.environ, OMP_NUM_THREADS="1")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llmpress.runtime.server", str(model), "--port",
                 str(port), "--ctx", str(CTX), "--api-key", API_KEY],
                stdout=log, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server did not start: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the server did not come up in 120 s")
            time.sleep(0.2)

    def last_logged_status(self) -> int | None:
        """The status of the server's last request log line (RequestLog)."""
        lines = self.log.read_text(errors="replace").splitlines()
        match = re.search(r" (?:GET|POST|PUT|DELETE|PATCH|OPTIONS|HEAD) \S* (\d{3}) ",
                          lines[-1]) if lines else None
        return int(match[1]) if match else None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def peak_rss(self) -> int:
        """The server process's peak resident memory (VmHWM) in bytes."""
        return peak_rss_bytes(self.proc.pid)

    def close(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


# --- one request, judged -------------------------------------------------------------------
def is_openai_error(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
        return isinstance(error["message"], str) and isinstance(error["type"], str) \
            and error["message"] != "" and "code" in error and "param" in error
    except (ValueError, KeyError, TypeError):
        return False


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body


def exchange(base: str, request: Request, timeout: float) -> Reply:
    """One request over a raw socket (HTTP/1.1, Connection: close): a client library
    would refuse to send some of the hostile headers."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    head = [f"{request.method} {request.path} HTTP/1.1".encode(), f"Host: {host}".encode(),
            b"Connection: close", f"Content-Length: {len(request.body)}".encode()]
    head += [name.encode() + b": " + value for name, value in request.headers.items()]
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + request.body)
        data = bytearray()
        while piece := sock.recv(1 << 20):
            data += piece
            if time.monotonic() > deadline:
                raise TimeoutError
    header, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return Reply(status, headers, body)


def dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


def send(server: Server, request: Request, timeout: float) -> tuple[str, dict]:
    detail: dict = {"request": request.label, "path": request.path[:60]}
    try:
        reply = exchange(server.base, request, timeout)
    except (TimeoutError, socket.timeout):
        return ("crash" if not server.alive else "hang"), detail
    except (OSError, ValueError, IndexError) as exc:  # reset, or not an HTTP answer
        time.sleep(0.5)
        if not server.alive:
            return "crash", detail
        status = server.last_logged_status()
        if status in (401, 413):  # answered before the body was read: the server closed
            # the connection with the rest unread, so TCP reset it under the client
            return "error", {**detail, "status": status, "note": "reset after the answer"}
        return "no-answer", {**detail, "error": repr(exc)}
    detail["status"] = reply.status
    body = reply.body
    if not server.alive:
        return "crash", detail
    if reply.status >= 500:
        return "server-error", {**detail, "body": body[:300].decode("utf-8", "replace")}
    if reply.status >= 400:
        if is_openai_error(body):
            return "error", detail
        return "bad-error", {**detail, "body": body[:300].decode("utf-8", "replace")}
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        if b'"server_error"' in body:
            return "server-error", {**detail, "body": body[-300:].decode("utf-8", "replace")}
        if not body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in body:
            return "server-error", {**detail, "body": "stream ended without [DONE]: "
                                    + body[-200:].decode("utf-8", "replace")}
    return "ok", detail


def run_http(model: Path, model_id: str, n: int, seed: int = 0, timeout: float = 120.0,
             progress=None) -> tuple[list, int]:
    """n hostile requests, one after another -> (Results of kind "http", the server's
    largest peak resident memory in bytes)."""
    from .campaign import Result
    results, peak = [], 0
    log_dir = Path(tempfile.mkdtemp(prefix="llmpress-fuzz-http-"))
    server = Server(model, log_dir)
    peak = server.peak_rss()
    try:
        for i in range(n):
            request = make_request(random.Random(f"http:{seed}:{i}"), model_id)
            start = time.perf_counter()
            outcome, detail = send(server, request, timeout)
            results.append(Result(i, "http", request.path.split("?")[0][:40], outcome,
                                  detail, time.perf_counter() - start, len(request.body)))
            if server.alive:  # how much this request raised the server's peak memory
                now = server.peak_rss()
                detail["grew"], peak = max(0, now - peak), max(peak, now)
            if progress:
                progress(results[-1], i + 1, n)
            if not server.alive or outcome == "hang":
                server.close()
                server = Server(model, log_dir)
                peak = max(peak, server.peak_rss())
    finally:
        server.close()
    return results, peak
