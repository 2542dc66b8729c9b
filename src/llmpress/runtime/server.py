"""An OpenAI-compatible HTTP server for one local model: `llmpress serve MODEL`.

    GET  /health                 {"status": "ok", ...}; never needs the key
    GET  /v1/models              the one model (id: the file's stem)
    POST /v1/chat/completions    messages through the model's chat template
    POST /v1/completions         raw text (or token ids) in, text out
    POST /v1/embeddings          unit-length pooled hidden states (--pooling mean|last|cls)
    POST /tokenize, /detokenize  text <-> token ids (llama.cpp's server shapes)
    GET  /metrics                Prometheus counters: requests, tokens, tok/s, cache hits

Both POST routes stream server-sent events with `"stream": true`, in the chunk shapes of
OpenAI's API, ending with `data: [DONE]`. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, and its status codes; a field this
server would not act on is a 400 naming it, never silently dropped. Chat also takes
`response_format` (JSON / a JSON schema, by constrained decoding: runtime/grammar.py) and
`tools` (runtime/tools.py); both take `n`, `logprobs`, and report prompt-cache reuse in
usage.prompt_tokens_details.cached_tokens (`--parallel N` cached conversations).

`--parallel N` worker threads generate up to N requests at once, each in its own
prompt-cache slot, and their forward passes are batched (runtime/batching.py: one pass
reads the weights for all of them); further requests wait in a bounded queue. Tokens
travel from a worker to the request's coroutine through an asyncio.Queue. A client that
goes away cancels its job: a queued job is skipped, a running one stops after its current
token and frees its worker.

Starlette (the ASGI toolkit under FastAPI) on uvicorn: the request bodies are checked by
hand here so that every error, a type error included, comes back in OpenAI's shape.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import os
import queue
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import jinja2
import numpy as np

from llmpress.errors import LlmpressError

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # an optional extra: say how to get it
    raise LlmpressError(f"the server needs {exc.name}: pip install 'llmpress[serve]'") from None

from llmpress.runtime.batching import BatchedModel
from llmpress.runtime.embedding import POOLINGS
from llmpress.runtime.generate import Chunk, GenerationConfig, stream
from llmpress.runtime.grammar import ANY_JSON_OBJECT, lark_grammar
from llmpress.runtime.tools import (ToolCall, ToolCallSplitter, auto_call_grammar,
                                    forced_call_grammar, parse_tool_calls, template_family,
                                    template_messages)
from llmpress.runtime.prompt_cache import PromptCache
from llmpress.runtime.sampling import MAX_REPEAT_PENALTY, MIN_REPEAT_PENALTY, SamplingConfig

log = logging.getLogger("llmpress.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_BODY_BYTES = 8 << 20  # far above any prompt that fits a context; stops memory abuse
KNOWN_PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
               "/tokenize", "/detokenize")  # metric labels: other paths are "other"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_CHOICES = 8  # n: the choices run one after another, so each costs a full generation
MAX_PARALLEL = 256  # prompt-cache slots; each may grow to a full context of KV memory
DEFAULT_MAX_QUEUE = 64  # waiting requests; more get 503 instead of an unbounded backlog
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions API
DISCONNECT_POLL_S = 0.25
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256  # OpenAI takes 4 stop strings
ROLES = ("system", "user", "assistant", "developer", "tool")


# --- errors -----------------------------------------------------------------------------
class ApiError(Exception):
    """An error the client caused (or a server fault), as OpenAI reports it."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return ErrorResponse(self.body(), status_code=self.status)


class ErrorResponse(JSONResponse):
    """JSON in ASCII: an error message that quotes the request (a lone surrogate in a model
    name) still renders, where UTF-8 encoding would fail into a plain-text 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def _json_type(value: Any) -> str:
    """How OpenAI's messages name a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1


_EXPECTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "integer": (_is_int, "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "boolean": (lambda v: isinstance(v, bool), "a boolean"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def missing(name: str) -> ApiError:
    return ApiError(400, f"Missing required parameter: '{name}'.", param=name,
                    code="missing_required_parameter")


def wrong_type(name: str, expected: str, value: Any) -> ApiError:
    return ApiError(400, f"Invalid type for '{name}': expected {expected}, but got "
                         f"{_json_type(value)} instead.", param=name, code="invalid_type")


def field_value(body: dict, name: str, kind: str, *, required: bool = False,
                minimum: float | None = None, maximum: float | None = None,
                default: Any = None) -> Any:
    """body[name] checked against a JSON type and a range. null counts as absent."""
    value = body.get(name)
    if value is None:
        if required:
            raise missing(name)
        return default
    check, expected = _EXPECTED[kind]
    if not check(value):
        raise wrong_type(name, expected, value)
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 parses as inf
        raise ApiError(400, f"Invalid '{name}': {value} is not a finite number.", param=name,
                       code="invalid_value")
    if minimum is not None and value < minimum:
        raise ApiError(400, f"Invalid '{name}': {value} is below the minimum value of "
                            f"{minimum}.", param=name, code="invalid_value")
    if maximum is not None and value > maximum:
        raise ApiError(400, f"Invalid '{name}': {value} is above the maximum value of "
                            f"{maximum}.", param=name, code="invalid_value")
    return value


def body_too_large(size: str | int) -> ApiError:
    return ApiError(413, f"The request body is {size} bytes; this server takes at most "
                         f"{MAX_BODY_BYTES}.", code="request_too_large")


async def read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it passes MAX_BODY_BYTES: a client sending
    gigabytes must not make the server hold them first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise body_too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise body_too_large(f"over {size}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise body_too_large(len(raw))
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd nesting
        raise ApiError(400, f"We could not parse the JSON body of your request ({exc}). "
                            "Send a JSON object with Content-Type: application/json.",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, not {_json_type(body)}.",
                       code="invalid_json")
    if (where := lone_surrogate_path(body)) is not None:
        raise ApiError(400, f"Invalid '{where}': the text holds a lone UTF-16 surrogate "
                            "(a \\uD800-\\uDFFF escape without its pair), which is not a "
                            "character.", param=where, code="invalid_value")
    return body


def lone_surrogate_path(value: Any) -> str | None:
    """Where a string (key or value) in parsed JSON holds a lone surrogate, as
    'messages[0].content'; None when there is none. JSON allows the escape, but no text
    can be made of it (it cannot be encoded, tokenized or echoed back)."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:  # iterative: the nesting may be as deep as the JSON parser allowed
        item, path = stack.pop()
        if isinstance(item, str):
            if not _is_text(item):
                return path or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                where = f"{path}.{key}" if path else key
                if not _is_text(key):
                    return path or "body"
                stack.append((child, where))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# --- request bodies -> plain options ----------------------------------------------------
@dataclass(frozen=True)
class RequestOptions:
    """What both POST routes share, checked."""

    model: str
    max_tokens: int | None  # None: until the context is full
    stop: tuple[str, ...]
    sampling: SamplingConfig
    stream: bool
    include_usage: bool
    ignore_eos: bool  # llama.cpp's server extension; lets a client force a long answer
    n: int = 1  # choices, generated one after the other
    logprobs: int | None = None  # None: no log-probabilities; else how many top ones


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise wrong_type("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in value):
        # each generated token is matched against every stop string: keep that cheap
        raise ApiError(400, f"Invalid 'stop': at most {MAX_STOP_STRINGS} strings of at most "
                            f"{MAX_STOP_CHARS} characters each.", param="stop",
                       code="invalid_value")
    return tuple(s for s in value if s)


def parse_sampling(body: dict) -> SamplingConfig:
    """OpenAI's sampling fields plus llama.cpp's (top_k, min_p, repeat_penalty); what a
    request leaves out keeps llama.cpp's defaults (SamplingConfig)."""
    options: dict[str, Any] = {}
    for name, kind, low, high in (("temperature", "number", 0, 2), ("top_p", "number", 0, 1),
                                  ("top_k", "integer", 0, None), ("min_p", "number", 0, 1),
                                  ("repeat_penalty", "number", MIN_REPEAT_PENALTY,
                                   MAX_REPEAT_PENALTY),
                                  ("seed", "integer", -(1 << 63), (1 << 64) - 1)):
        value = field_value(body, name, kind, minimum=low, maximum=high)
        if value is not None:
            options[name] = value
    if options.get("top_p") == 0:  # OpenAI allows 0: only the most likely token is left
        options["top_p"] = 1e-9
    return SamplingConfig(**options)


# Fields both POST routes act on. `user` (an end-user id for the provider's abuse
# monitoring) changes no output, so it is taken and ignored as OpenAI's own models do.
COMMON_FIELDS = frozenset({
    "model", "max_tokens", "stop", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
    "seed", "stream", "stream_options", "n", "ignore_eos", "user", "logprobs"})
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "response_format", "tools",
                               "top_logprobs",
                               "tool_choice", "parallel_tool_calls"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}
STREAM_OPTION_FIELDS = frozenset({"include_usage"})
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_call_id", "tool_calls"})
TOOL_FIELDS = frozenset({"type", "function"})
FUNCTION_FIELDS = frozenset({"name", "description", "parameters", "strict"})
MAX_TOOLS = 128  # OpenAI's limit


def _is_zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


# OpenAI fields this server does not implement, taken only at the value that means "off"
# (clients often send the default explicitly); any other value is refused by name.
NEUTRAL_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frequency_penalty": (_is_zero, "0"),
    "presence_penalty": (_is_zero, "0"),
    "logit_bias": (lambda v: v == {}, "{}"),
    "store": (lambda v: v is False, "false"),
    "metadata": (lambda v: v == {}, "{}"),
    "best_of": (lambda v: _is_int(v) and v == 1, "1"),
    "suffix": (lambda v: v == "", '""'),
    # what a client echoes back when it appends a response's message to the history
    "refusal": (lambda v: v == "", '""'),
    "annotations": (lambda v: v == [], "[]"),
}


def reject_unsupported(body: dict, supported: frozenset[str], where: str = "") -> None:
    """A field we would not act on is a 400 naming it, never silently dropped: a client
    asking for JSON output or tools must not get free text with a 200. null is absent."""
    for name, value in body.items():
        if value is None or name in supported:
            continue
        param = f"{where}.{name}" if where else name
        neutral = NEUTRAL_VALUES.get(name)
        if neutral is None:
            raise ApiError(400, f"Unrecognized request argument supplied: {param}. This server "
                                "does not support it; leave it out.", param=param,
                           code="unsupported_parameter")
        accepts, off = neutral
        if not accepts(value):
            raise ApiError(400, f"'{param}' is not supported by this server; leave it out "
                                f"(or send {off}).", param=param, code="unsupported_parameter")


def parse_options(body: dict, *, default_max_tokens: int | None) -> RequestOptions:
    model = field_value(body, "model", "string", required=True)
    n = field_value(body, "n", "integer", default=1, minimum=1, maximum=MAX_CHOICES)
    if "messages" in body:  # chat: logprobs a boolean, top_logprobs how many
        top = field_value(body, "top_logprobs", "integer", minimum=0, maximum=MAX_TOP_LOGPROBS)
        if field_value(body, "logprobs", "boolean", default=False):
            logprobs = top or 0
        elif top is not None:
            raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true.",
                           param="top_logprobs", code="invalid_value")
        else:
            logprobs = None
    else:  # legacy completions: logprobs is the number of top tokens (0..5)
        logprobs = field_value(body, "logprobs", "integer", minimum=0, maximum=5)
    max_tokens = field_value(body, "max_completion_tokens", "integer", minimum=1)
    if max_tokens is None:
        max_tokens = field_value(body, "max_tokens", "integer", minimum=1,
                                 default=default_max_tokens)
    stream_options = field_value(body, "stream_options", "object", default={})
    reject_unsupported(stream_options, STREAM_OPTION_FIELDS, "stream_options")
    return RequestOptions(
        model=model, max_tokens=max_tokens, stop=parse_stop(body.get("stop")),
        sampling=parse_sampling(body),
        stream=field_value(body, "stream", "boolean", default=False),
        include_usage=field_value(stream_options, "include_usage", "boolean", default=False),
        ignore_eos=field_value(body, "ignore_eos", "boolean", default=False), n=n,
        logprobs=logprobs,
    )


def parse_response_format(value: Any) -> dict | None:
    """OpenAI's response_format -> the JSON schema the answer must follow (None: free
    text). json_object is any JSON object; a json_schema without a schema too."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise wrong_type("response_format", "an object", value)
    kind = value.get("type")
    fields = {"text": {"type"}, "json_object": {"type"},
              "json_schema": {"type", "json_schema"}}.get(kind)
    if fields is None:
        raise ApiError(400, f"Invalid value for 'response_format.type': {kind!r}. Supported "
                            "values are: 'text', 'json_object' and 'json_schema'.",
                       param="response_format.type", code="invalid_value")
    reject_unsupported(value, frozenset(fields), "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_JSON_OBJECT
    spec = value.get("json_schema")
    if spec is None:
        raise missing("response_format.json_schema")
    if not isinstance(spec, dict):
        raise wrong_type("response_format.json_schema", "an object", spec)
    reject_unsupported(spec, frozenset({"name", "description", "schema", "strict"}),
                       "response_format.json_schema")
    field_value(spec, "name", "string")
    field_value(spec, "strict", "boolean")  # always strict here: the grammar enforces it
    schema = spec.get("schema")
    if schema is None:
        return ANY_JSON_OBJECT
    if not isinstance(schema, dict):
        raise wrong_type("response_format.json_schema.schema", "an object", schema)
    return schema


def parse_messages(value: Any) -> list[dict]:
    """OpenAI messages -> [{"role", "content": str}] for the chat template. Content may be
    a string or an array of text parts; "developer" is OpenAI's new name for "system"."""
    if value is None:
        raise missing("messages")
    if not isinstance(value, list):
        raise wrong_type("messages", "an array", value)
    if not value:
        raise ApiError(400, "Invalid 'messages': empty array. Expected an array with minimum "
                            "length 1, but got an empty array instead.", param="messages",
                       code="empty_array")
    return [_parse_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _parse_message(message: Any, where: str) -> dict:
    if not isinstance(message, dict):
        raise wrong_type(where, "an object", message)
    role = message.get("role")
    if role is None:
        raise missing(f"{where}.role")
    if role not in ROLES:
        raise ApiError(400, f"Invalid value for '{where}.role': {role!r}. Supported values are: "
                            f"{', '.join(map(repr, ROLES))}.", param=f"{where}.role",
                       code="invalid_value")
    reject_unsupported(message, MESSAGE_FIELDS, where)
    content = message.get("content")
    if content is None and role != "assistant":  # an assistant turn may hold only tool calls
        raise missing(f"{where}.content")
    parsed = {"role": "system" if role == "developer" else role,
              "content": _message_text(content, f"{where}.content")}
    for name in ("name", "tool_call_id"):  # templates that know them use them
        if message.get(name) is not None:
            parsed[name] = field_value(message, name, "string")
    if message.get("tool_calls"):
        parsed["tool_calls"] = _parse_message_tool_calls(message["tool_calls"], where)
    return parsed


def _parse_message_tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant turn's earlier calls, as the client sends them back."""
    where = f"{where}.tool_calls"
    if not isinstance(value, list):
        raise wrong_type(where, "an array", value)
    calls = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise wrong_type(at, "an object", call)
        reject_unsupported(call, frozenset({"id", "type", "function"}), at)
        function = call.get("function")
        if not isinstance(function, dict):
            raise missing(f"{at}.function") if function is None else \
                wrong_type(f"{at}.function", "an object", function)
        reject_unsupported(function, frozenset({"name", "arguments"}), f"{at}.function")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str):
            raise missing(f"{at}.function.name")
        if not isinstance(arguments, str):
            raise wrong_type(f"{at}.function.arguments", "a string", arguments)
        calls.append({"id": str(call.get("id") or ""), "type": "function",
                      "function": {"name": name, "arguments": arguments}})
    return calls


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request asks of tools: the ones offered, and whether a call is forced
    (tool_choice "required", or a named function: then only that one), and whether the
    answer may hold several calls (parallel_tool_calls).

    A call the model makes by itself (tool_choice auto) follows its function's schema by
    grammar when a function asks for that (`strict`, as OpenAI's structured outputs), and
    as the model manages otherwise."""

    tools: list[dict]
    forced: list[dict] | None
    parallel: bool = True

    @property
    def strict(self) -> bool:
        return any(t["function"].get("strict") for t in self.tools)


def parse_tools(body: dict) -> ToolRequest | None:
    """tools, tool_choice and parallel_tool_calls, checked. None: no tools (or tool_choice
    "none")."""
    parallel = field_value(body, "parallel_tool_calls", "boolean", default=True)
    value = body.get("tools")
    if value is None:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise ApiError(400, "Invalid 'tool_choice': it names a tool but no 'tools' are "
                                "given.", param="tool_choice", code="invalid_value")
        return None
    if not isinstance(value, list):
        raise wrong_type("tools", "an array", value)
    if len(value) > MAX_TOOLS:
        raise ApiError(400, f"Invalid 'tools': at most {MAX_TOOLS} tools.", param="tools",
                       code="invalid_value")
    tools = [_parse_tool(t, f"tools[{i}]") for i, t in enumerate(value)]
    choice = body.get("tool_choice", "auto")
    if choice in (None, "auto"):
        forced = None
    elif choice == "none":
        return None
    elif choice == "required":
        forced = tools
    elif isinstance(choice, dict):
        reject_unsupported(choice, TOOL_FIELDS, "tool_choice")
        name = (choice.get("function") or {}).get("name") \
            if isinstance(choice.get("function"), dict) else None
        forced = [t for t in tools if t["function"]["name"] == name]
        if choice.get("type") != "function" or not forced:
            raise ApiError(400, f"Invalid 'tool_choice': {name!r} is not one of the tools.",
                           param="tool_choice", code="invalid_value")
    else:
        raise ApiError(400, f"Invalid value for 'tool_choice': {choice!r}. Supported values "
                            "are: 'none', 'auto', 'required' or a named function.",
                       param="tool_choice", code="invalid_value")
    if not tools:
        raise ApiError(400, "Invalid 'tools': empty array.", param="tools",
                       code="empty_array")
    return ToolRequest(tools, forced, parallel)


def _parse_tool(tool: Any, where: str) -> dict:
    if not isinstance(tool, dict):
        raise wrong_type(where, "an object", tool)
    reject_unsupported(tool, TOOL_FIELDS, where)
    if tool.get("type") != "function":
        raise ApiError(400, f"Invalid value for '{where}.type': {tool.get('type')!r}. "
                            "Supported values are: 'function'.", param=f"{where}.type",
                       code="invalid_value")
    function = tool.get("function")
    if function is None:
        raise missing(f"{where}.function")
    if not isinstance(function, dict):
        raise wrong_type(f"{where}.function", "an object", function)
    reject_unsupported(function, FUNCTION_FIELDS, f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ApiError(400, f"Invalid '{where}.function.name': it must be 1 to 64 letters, "
                            "digits, underscores or dashes.", param=f"{where}.function.name",
                       code="invalid_value")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise wrong_type(f"{where}.function.parameters", "an object", parameters)
    clean = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if isinstance(function.get("description"), str):
        clean["description"] = function["description"]
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise wrong_type(f"{where}.function.strict", "a boolean", strict)
    if strict:
        clean["strict"] = True
    return {"type": "function", "function": clean}

def _message_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise wrong_type(where, "a string or an array of content parts", content)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" \
                or not isinstance(part.get("text"), str):
            raise ApiError(400, f"Invalid '{where}[{i}]': this server takes only text parts "
                                '({"type": "text", "text": "..."}).', param=f"{where}[{i}]",
                           code="invalid_value")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_prompt(value: Any, vocab_size: int) -> str | list[int]:
    """The completions prompt: a string, an array of token ids, or a one-element array of
    either. Several prompts (OpenAI's batch form) are refused: one choice per request."""
    if value is None:
        raise missing("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        bad = [t for t in value if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"Invalid 'prompt': token id {bad[0]} is outside the "
                                f"vocabulary (0..{vocab_size - 1}).", param="prompt",
                           code="invalid_value")
        return list(value)
    if isinstance(value, list) and len(value) > 1:
        raise ApiError(400, "Invalid 'prompt': this server takes one prompt per request "
                            "(a string or an array of token ids).", param="prompt",
                       code="unsupported_value")
    raise wrong_type("prompt", "a string or an array of token ids", value)


# --- the generation worker ----------------------------------------------------------------
_DONE = object()  # end of a job's item stream


@dataclass
class Job:
    """One generation: inputs, and the way back to the request's event loop."""

    prompt_ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    task: Callable[[], Any] | None = None  # work other than a generation (embeddings)

    def emit(self, item: Any) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is going down
            self.cancelled.set()


class GenerationWorker:
    """`parallel` threads that take jobs in arrival order and generate them at once, their
    forward passes batched. A cancelled job is skipped or stopped between two tokens."""

    def __init__(self, lm, max_queue: int = DEFAULT_MAX_QUEUE, parallel: int = 1,
                 cache_ram_bytes: int | None = None):
        self.lm, self.max_queue = lm, max_queue
        self.model = BatchedModel(lm.model)
        # --parallel N: N cached sequences (a request goes to the one sharing the longest
        # prefix), and N requests generating together. --cache-ram bounds their memory.
        self.prompt_cache = PromptCache(lm.model.new_cache, lm.context_length, parallel,
                                        cache_ram_bytes)
        self.metrics = Metrics()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.running = 0
        self._running_lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"llmpress-generate-{i}", daemon=True)
                        for i in range(parallel)]
        for thread in self.threads:
            thread.start()

    @property
    def busy(self) -> bool:
        return self.running > 0

    def _count_running(self, step: int) -> None:
        with self._running_lock:
            self.running += step

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= self.max_queue:
            raise ApiError(503, f"The server is busy: {self.max_queue} requests are already "
                                "waiting. Retry later.", code="server_overloaded")
        self.jobs.put(job)

    def stop(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not job.cancelled.is_set():
                self._count_running(1)
                try:
                    with self.model.member():  # a task (embeddings) has the model alone
                        self._run_task(job) if job.task else self._generate(job)
                finally:
                    self._count_running(-1)
            job.emit(_DONE)

    def _run_task(self, job: Job) -> None:
        try:
            job.emit(job.task())
        except LlmpressError as exc:
            job.emit(ApiError(400, str(exc)))
        except Exception as exc:  # a bug of ours: report it, keep serving
            log.exception("task failed")
            job.emit(ApiError(500, f"The request failed: {type(exc).__name__}: {exc}"))

    def _generate(self, job: Job) -> None:
        lm = self.lm
        chunks = stream(self.model, lm.tokenizer, job.prompt_ids, job.config, lm.context_length,
                        self.prompt_cache, lm.speculation)
        started, generated = time.perf_counter(), 0
        try:
            for chunk in chunks:
                generated += len(chunk.token_ids)
                if chunk.finish_reason:
                    self.metrics.count_prompt(len(job.prompt_ids), chunk.cached_tokens)
                    self.metrics.count_drafts(chunk.drafted_tokens, chunk.accepted_tokens)
                job.emit(chunk)
                if job.cancelled.is_set():
                    return
        except LlmpressError as exc:
            job.emit(ApiError(400, str(exc)))
        except Exception as exc:  # a bug of ours: report it, keep serving
            log.exception("generation failed")
            job.emit(ApiError(500, f"The generation failed: {type(exc).__name__}: {exc}"))
        finally:
            chunks.close()
            self.metrics.count_generation(generated, time.perf_counter() - started)


class Metrics:
    """Counters for /metrics (Prometheus text format); updated from the worker thread and
    the event loop, hence the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (path, status) -> count
        self.prompt_tokens = self.cached_tokens = self.cache_hits = 0
        self.generated_tokens = 0
        self.generation_seconds = 0.0
        self.drafted_tokens = self.accepted_tokens = 0

    def count_request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[path, status] = self.requests.get((path, status), 0) + 1

    def count_prompt(self, tokens: int, cached: int) -> None:
        with self.lock:
            self.prompt_tokens += tokens
            self.cached_tokens += cached
            self.cache_hits += cached > 0

    def count_drafts(self, drafted: int, accepted: int) -> None:
        with self.lock:
            self.drafted_tokens += drafted
            self.accepted_tokens += accepted

    def count_generation(self, tokens: int, seconds: float) -> None:
        with self.lock:
            self.generated_tokens += tokens
            self.generation_seconds += seconds

    def text(self, waiting: int, running: int, model: BatchedModel, evictions: int = 0) -> str:
        with self.lock:
            rate = self.generated_tokens / self.generation_seconds \
                if self.generation_seconds else 0.0
            lines = _metric("llmpress_requests_total", "counter", "HTTP requests answered",
                            [(f'path="{p}",status="{s}"', n)
                             for (p, s), n in sorted(self.requests.items())])
            for name, kind, help_text, value in (
                    ("llmpress_prompt_tokens_total", "counter", "prompt tokens received",
                     self.prompt_tokens),
                    ("llmpress_prompt_cached_tokens_total", "counter",
                     "prompt tokens taken from the prompt cache", self.cached_tokens),
                    ("llmpress_prompt_cache_hits_total", "counter",
                     "requests that reused a cached prefix", self.cache_hits),
                    ("llmpress_prompt_cache_evictions_total", "counter",
                     "cached conversations dropped to stay under --cache-ram", evictions),
                    ("llmpress_generated_tokens_total", "counter", "tokens generated",
                     self.generated_tokens),
                    ("llmpress_generation_seconds_total", "counter",
                     "seconds spent generating (prompt included)", self.generation_seconds),
                    ("llmpress_draft_tokens_total", "counter",
                     "tokens guessed by speculative decoding", self.drafted_tokens),
                    ("llmpress_draft_tokens_accepted_total", "counter",
                     "guessed tokens the model kept", self.accepted_tokens),
                    ("llmpress_generated_tokens_per_second", "gauge",
                     "generated tokens per generation second, since start", rate),
                    ("llmpress_requests_waiting", "gauge", "requests queued", waiting),
                    ("llmpress_requests_running", "gauge", "requests generating", running),
                    ("llmpress_batch_passes_total", "counter",
                     "forward passes of batched generation", model.passes),
                    ("llmpress_batch_sequences_total", "counter",
                     "sequences those passes carried (over passes: the mean batch)",
                     model.sequences)):
                lines += _metric(name, kind, help_text, [("", value)])
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
            *(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}"
              for labels, value in samples)]


async def job_chunks(job: Job) -> AsyncIterator[Chunk]:
    """Yield a submitted job's chunks as the worker produces them."""
    try:
        while (item := await job.items.get()) is not _DONE:
            if isinstance(item, ApiError):
                raise item
            yield item
    finally:
        job.cancelled.set()  # a no-op after the end; stops the work when the client left


async def watch_disconnect(request: Request, jobs: list[Job]) -> None:
    """Cancel the jobs when the client closes the connection (queued or mid-stream)."""
    while not all(job.cancelled.is_set() for job in jobs):
        if await request.is_disconnected():
            cancel(jobs)
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


# --- response bodies ----------------------------------------------------------------------
@dataclass
class Tally:
    """Token counts for `usage` and the request log."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    cached_tokens: int = 0

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def add(self, chunk: Chunk, eos_ids) -> None:
        self.completion_tokens += len(chunk.token_ids)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
            self.cached_tokens = chunk.cached_tokens
            # the end-of-turn token ends the answer but is not part of it (as lm.generate)
            if chunk.finish_reason == "stop" and chunk.token_ids \
                    and chunk.token_ids[-1] in eos_ids:
                self.completion_tokens -= 1


def chat_chunk(head: dict, delta: dict, finish_reason: str | None = None,
               index: int = 0) -> dict:
    return {**head, "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def completion_chunk(head: dict, text: str, finish_reason: str | None = None,
                     index: int = 0) -> dict:
    return {**head, "object": "text_completion",
            "choices": [{"index": index, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}]}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False,
                                                                 separators=(",", ":"))
    return f"data: {data}\n\n"


# --- the app ------------------------------------------------------------------------------
@dataclass
class ServerState:
    lm: Any  # llmpress.api.LanguageModel
    model_id: str
    aliases: frozenset[str]
    worker: GenerationWorker
    created: int = field(default_factory=lambda: int(time.time()))
    pooling: str = "mean"  # of /v1/embeddings

    def check_model(self, name: str) -> str:
        if name not in self.aliases:
            raise ApiError(404, f"The model `{name}` does not exist or you do not have access "
                                f"to it. This server has `{self.model_id}`.", param="model",
                           code="model_not_found")
        return self.model_id

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "llmpress", "context_length": self.lm.context_length}


def _usage_slot(request: Request) -> dict:
    return request.scope.setdefault("llmpress.usage", {})


def endpoint(handler: Callable) -> Callable:
    """Every failure becomes an OpenAI-shaped error response; none reaches uvicorn."""
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request, request.app.state.llmpress)
        except ApiError as exc:
            return exc.response()
        except LlmpressError as exc:
            return ApiError(400, str(exc)).response()
        except Exception as exc:
            log.exception("request failed")
            return ApiError(500, f"Internal error: {type(exc).__name__}: {exc}").response()
    return wrapped


async def health(request: Request, state: ServerState) -> Response:
    return JSONResponse({"status": "ok", "model": state.model_id,
                         "busy": state.worker.busy, "waiting": state.worker.waiting})


async def metrics(request: Request, state: ServerState) -> Response:
    return Response(state.worker.metrics.text(state.worker.waiting, state.worker.running,
                                              state.worker.model,
                                              state.worker.prompt_cache.evictions),
                    media_type="text/plain; version=0.0.4")


async def tokenize(request: Request, state: ServerState) -> Response:
    """llama.cpp's server extension: {"content", "add_special"} -> {"tokens"}."""
    body = parse_json_body(await read_body(request))
    reject_unsupported(body, frozenset({"content", "add_special", "with_pieces", "model"}))
    content = field_value(body, "content", "string", required=True)
    add_special = field_value(body, "add_special", "boolean", default=False)
    # add_special: BOS/EOS as the model's flags say; without it, the text's tokens only
    flags = {} if add_special else {"add_bos": False, "add_eos": False}
    # a text far past the context is refused before it is tokenized whole: megabytes of
    # text would hold ~170 bytes per token while the engine works (189 MiB for 2 MB)
    tokens = await asyncio.to_thread(lambda: state.lm.tokenizer.encode(
        content, max_tokens=state.lm.context_length, **flags))
    if field_value(body, "with_pieces", "boolean", default=False):
        pieces = [state.lm.tokenizer.token_to_piece(t) for t in tokens]
        return JSONResponse({"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces)]})
    return JSONResponse({"tokens": tokens})


async def detokenize(request: Request, state: ServerState) -> Response:
    """{"tokens": [ids]} -> {"content": text}."""
    body = parse_json_body(await read_body(request))
    reject_unsupported(body, frozenset({"tokens", "model"}))
    tokens = body.get("tokens")
    if tokens is None:
        raise missing("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise wrong_type("tokens", "an array of token ids", tokens)
    vocab = state.lm.tokenizer.vocab_size
    if bad := [t for t in tokens if not 0 <= t < vocab]:
        raise ApiError(400, f"Invalid 'tokens': token id {bad[0]} is outside the vocabulary "
                            f"(0..{vocab - 1}).", param="tokens", code="invalid_value")
    return JSONResponse({"content": state.lm.tokenizer.decode(tokens)})


EMBEDDING_FIELDS = frozenset({"input", "model", "encoding_format", "user"})


def parse_embedding_input(value: Any, vocab_size: int) -> list[str | list[int]]:
    """OpenAI's input: a string, an array of strings, an array of token ids, or an array
    of such arrays. -> one item per embedding."""
    if value is None:
        raise missing("input")
    items = [value] if isinstance(value, str) or (
        isinstance(value, list) and value and all(_is_int(t) for t in value)) else value
    if not isinstance(items, list) or not items:
        raise wrong_type("input", "a string, an array of strings or of token ids", value)
    for item in items:
        if isinstance(item, str):
            continue
        if not (isinstance(item, list) and item and all(_is_int(t) for t in item)):
            raise wrong_type("input", "a string, an array of strings or of token ids", value)
        if bad := [t for t in item if not 0 <= t < vocab_size]:
            raise ApiError(400, f"Invalid 'input': token id {bad[0]} is outside the vocabulary "
                                f"(0..{vocab_size - 1}).", param="input", code="invalid_value")
    if any(isinstance(item, str) and not item for item in items):
        raise ApiError(400, "Invalid 'input': an empty string has no embedding.",
                       param="input", code="invalid_value")
    return items


def encoded_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """base64: the float32 little-endian bytes, as OpenAI sends (and its client decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def embeddings(request: Request, state: ServerState) -> Response:
    body = parse_json_body(await request.body())
    reject_unsupported(body, EMBEDDING_FIELDS)
    model = state.check_model(field_value(body, "model", "string", required=True))
    encoding_format = field_value(body, "encoding_format", "string", default="float")
    if encoding_format not in ("float", "base64"):
        raise ApiError(400, f"Invalid 'encoding_format': {encoding_format!r}; use 'float' or "
                            "'base64'.", param="encoding_format", code="invalid_value")
    lm = state.lm
    items = parse_embedding_input(body.get("input"), lm.tokenizer.vocab_size)

    def task() -> tuple[list[list[float]], int]:
        token_lists = [lm.encode(i) if isinstance(i, str) else i for i in items]
        vectors = [lm.embed(ids, pooling=state.pooling)[0] for ids in token_lists]
        return vectors, sum(len(ids) for ids in token_lists)

    job = Job([], None, asyncio.get_running_loop(), task=task)
    state.worker.submit(job)
    vectors, n_tokens = [item async for item in job_chunks(job)][0]
    return JSONResponse({
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i,
                  "embedding": encoded_embedding(v, encoding_format)}
                 for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


async def list_models(request: Request, state: ServerState) -> Response:
    return JSONResponse({"object": "list", "data": [state.model_card()]})


async def get_model(request: Request, state: ServerState) -> Response:
    state.check_model(request.path_params["model"])
    return JSONResponse(state.model_card())


async def chat_completions(request: Request, state: ServerState) -> Response:
    body = parse_json_body(await read_body(request))
    reject_unsupported(body, CHAT_FIELDS)
    options = parse_options(body, default_max_tokens=None)
    model = state.check_model(options.model)
    messages = parse_messages(body.get("messages"))
    schema = parse_response_format(body.get("response_format"))
    tool_request = parse_tools(body)
    if schema is not None and tool_request and tool_request.forced:
        raise ApiError(400, "A forced tool call (tool_choice) and a response_format schema "
                            "cannot both shape one answer; send one of them.",
                       param="response_format", code="invalid_value")
    family, reads_tools = template_family(state.lm.tokenizer.chat_template)
    grammar = await asyncio.to_thread(compile_grammars, state, schema, tool_request, family)
    tools = tool_request.tools if tool_request else None
    prompt_messages = template_messages(messages, tools, reads_tools)

    def encode() -> list[int]:
        try:
            extra = {"tools": tools} if tools and reads_tools else {}
            return state.lm.encode_prompt(state.lm.chat_prompt(prompt_messages, **extra))
        except jinja2.TemplateError as exc:  # the template refused these messages
            raise ApiError(400, f"The model's chat template rejected the messages: {exc}",
                           param="messages", code="invalid_value") from None

    prompt_ids = await asyncio.to_thread(encode)
    return await generate_response(request, state, "chat", model, options, prompt_ids,
                                   param="messages", grammar=grammar,
                                   tool_family=family if tools else None,
                                   max_tool_calls=None if tool_request is None
                                   or tool_request.parallel else 1)


def compile_grammars(state: ServerState, schema: dict | None, tools: ToolRequest | None,
                     family: str) -> str | None:
    """Check every schema of the request (400 on the first bad one); -> the grammar the
    answer must follow, if any: a forced tool call's, else response_format's, else (strict
    tools) the one that holds the calls the model opens to the tools' schemas."""
    grammar = None
    if schema is not None:
        try:
            grammar = state.lm.json_grammar(schema)
        except LlmpressError as exc:
            raise ApiError(400, f"Invalid schema for response_format: {exc}",
                           param="response_format.json_schema.schema",
                           code="invalid_json_schema") from None
    for i, tool in enumerate(tools.tools if tools else []):
        try:
            state.lm.json_grammar(tool["function"]["parameters"])
        except LlmpressError as exc:
            raise ApiError(400, f"Invalid schema for function "
                                f"'{tool['function']['name']}': {exc}",
                           param=f"tools[{i}].function.parameters",
                           code="invalid_function_parameters") from None
    if tools and tools.forced:
        grammar = lark_grammar(forced_call_grammar(tools.forced, family), state.lm.tokenizer)
    elif tools and tools.strict and grammar is None:  # a call the model opens follows its schema
        auto = auto_call_grammar(tools.tools, family, None if tools.parallel else 1)
        grammar = lark_grammar(auto, state.lm.tokenizer) if auto else None
    return grammar


async def completions(request: Request, state: ServerState) -> Response:
    body = parse_json_body(await read_body(request))
    reject_unsupported(body, COMPLETION_FIELDS)
    options = parse_options(body, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
    model = state.check_model(options.model)
    prompt = parse_prompt(body.get("prompt"), state.lm.model.cfg.vocab_size)
    echo = field_value(body, "echo", "boolean", default=False)
    if isinstance(prompt, str):
        prompt_ids = await asyncio.to_thread(state.lm.encode_prompt, prompt)
        prompt_text = prompt
    else:
        prompt_ids, prompt_text = prompt, state.lm.tokenizer.decode(prompt)
    return await generate_response(request, state, "text", model, options, prompt_ids,
                                   param="prompt", echo=prompt_text if echo else "")


async def generate_response(request: Request, state: ServerState, kind: str, model: str,
                            options: RequestOptions, prompt_ids: list[int], *, param: str,
                            echo: str = "", grammar: str | None = None,
                            tool_family: str | None = None,
                            max_tool_calls: int | None = None) -> Response:
    """Check the prompt against the context, queue one job per choice (n), answer
    (streamed or not). The choices run one after the other; the second on reuses the
    prompt from the prompt cache."""
    limit = state.lm.context_length
    if not prompt_ids:
        raise ApiError(400, f"The {param} gave no tokens; send some text.", param=param,
                       code="invalid_value")
    if len(prompt_ids) >= limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, "
                            f"your {param} resulted in {len(prompt_ids)} tokens. Please reduce "
                            f"the length of the {param} (or restart the server with a larger "
                            "--ctx).", param=param, code="context_length_exceeded")
    # more than the context leaves is clamped (llama.cpp's server does so): finish "length"
    max_tokens = limit - len(prompt_ids) if options.max_tokens is None else options.max_tokens
    loop = asyncio.get_running_loop()
    jobs = [Job(prompt_ids, GenerationConfig(
        max_tokens=max_tokens, sampling=choice_sampling(options.sampling, i), stop=options.stop,
        stop_at_eos=not options.ignore_eos, grammar=grammar, logprobs=options.logprobs), loop)
        for i in range(options.n)]
    tally = Tally(len(prompt_ids))
    _usage_slot(request)["tally"] = tally
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": model}
    eos_ids = state.lm.tokenizer.eos_ids
    try:  # before any answer: a full queue is still a plain 503
        for job in jobs:
            state.worker.submit(job)
    except ApiError:
        cancel(jobs)
        raise
    if options.stream:
        events = stream_events(request, jobs, kind, head, options, tally, state.lm.tokenizer,
                               echo, tool_family, max_tool_calls)
        return JobStream(jobs, events)
    watcher = asyncio.create_task(watch_disconnect(request, jobs))
    choices = []
    try:
        for index, job in enumerate(jobs):
            texts, reason, scored = [echo], None, []
            async for chunk in job_chunks(job):
                texts.append(chunk.text)
                tally.add(chunk, eos_ids)
                reason = chunk.finish_reason or reason
                scored += answer_logprobs(chunk, eos_ids)
            choice = final_choice(kind, index, "".join(texts), reason, tool_family,
                                  max_tool_calls)
            if options.logprobs is not None:
                choice["logprobs"] = logprobs_body(kind, state.lm.tokenizer, scored, len(echo))
            choices.append(choice)
    finally:
        watcher.cancel()
    return JSONResponse({**head, "object": "chat.completion" if kind == "chat"
                         else "text_completion", "choices": choices, "usage": tally.usage()})


def answer_logprobs(chunk: Chunk, eos_ids) -> list:
    """The chunk's token log-probabilities, less the end-of-turn token (not in the text)."""
    scored = chunk.logprobs or []
    if chunk.finish_reason == "stop" and scored and scored[-1].token in eos_ids:
        scored = scored[:-1]
    return scored


def logprobs_body(kind: str, tokenizer, scored: list, offset: int = 0) -> dict:
    """OpenAI's logprobs object: chat's {"content": [...]}, or the legacy completions'
    parallel arrays (text_offset counts characters from offset)."""
    def piece(token: int) -> str:
        return tokenizer.token_to_piece(token)

    if kind == "chat":
        def entry(token: int, logprob: float) -> dict:
            return {"token": piece(token), "logprob": logprob,
                    "bytes": list(tokenizer.token_bytes(token))}
        return {"content": [{**entry(s.token, s.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                            for s in scored], "refusal": None}
    offsets, at = [], offset
    for s in scored:
        offsets.append(at)
        at += len(piece(s.token))
    return {"tokens": [piece(s.token) for s in scored],
            "token_logprobs": [s.logprob for s in scored],
            "top_logprobs": [{piece(t): lp for t, lp in s.top} for s in scored],
            "text_offset": offsets}


def choice_sampling(sampling: SamplingConfig, index: int) -> SamplingConfig:
    """Choice i of n draws with seed + i: n different answers, each reproducible."""
    if index == 0 or sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=(sampling.seed + index) % (1 << 64))


def final_choice(kind: str, index: int, text: str, reason: str | None,
                 tool_family: str | None, max_tool_calls: int | None = None) -> dict:
    if kind != "chat":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    message = {"role": "assistant", "content": text, "refusal": None}
    content, calls = parse_tool_calls(text, tool_family, max_tool_calls) if tool_family \
        else (text, [])
    if calls:
        message["content"] = content or None
        message["tool_calls"] = [c.openai() for c in calls]
        reason = "tool_calls"
    return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}


def tool_call_deltas(call: ToolCall, position: int) -> list[dict]:
    """A call as OpenAI streams it: id, type and name first (empty arguments), then the
    arguments; `index` is the call's position in the answer."""
    whole = call.openai()
    return [{"index": position, **whole, "function": {**whole["function"], "arguments": ""}},
            {"index": position, "function": {"arguments": call.arguments}}]


def cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled.set()


class JobStream(StreamingResponse):
    """An SSE response that cancels its jobs however it ends, even before the first event."""

    def __init__(self, jobs: list[Job], events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.jobs = jobs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel(self.jobs)


async def stream_events(request: Request, jobs: list[Job], kind: str, head: dict,
                        options: RequestOptions, tally: Tally, tokenizer,
                        echo: str, tool_family: str | None = None,
                        max_tool_calls: int | None = None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shapes, choice after choice; `data: [DONE]` at
    the end. With tools, the answer goes through a ToolCallSplitter: content as soon as it
    cannot be the start of a call, each call as tool_calls deltas once it is whole; a call
    may follow content, as OpenAI's models do."""
    if options.include_usage:
        head = {**head, "usage": None}  # OpenAI: null on every chunk but the last
    eos_ids = tokenizer.eos_ids

    watcher = asyncio.create_task(watch_disconnect(request, jobs))
    try:
        for index, job in enumerate(jobs):
            def piece(text: str, finish: str | None = None, scored=()) -> dict:
                if kind == "chat":
                    event = chat_chunk(head, {"content": text} if text or not finish else {},
                                       finish, index)
                else:
                    event = completion_chunk(head, text, finish, index)
                if scored:
                    event["choices"][0]["logprobs"] = logprobs_body(kind, tokenizer,
                                                                    list(scored))
                return event

            if kind == "chat":
                yield sse(chat_chunk(head, {"role": "assistant", "content": ""}, index=index))
            elif echo:
                yield sse(piece(echo))
            splitter = ToolCallSplitter(tool_family, max_tool_calls) if tool_family else None
            finish, calls, scored = None, 0, []

            def events(parts: list) -> list[str]:
                """Content pieces (with the logprobs so far) and calls, as SSE events."""
                nonlocal calls, scored
                out = []
                for part in parts:
                    if isinstance(part, ToolCall):
                        out += [sse(chat_chunk(head, {"tool_calls": [delta]}, index=index))
                                for delta in tool_call_deltas(part, calls)]
                        calls += 1
                    elif part or scored:
                        out.append(sse(piece(part, scored=scored)))
                        scored = []
                return out

            try:
                async for chunk in job_chunks(job):
                    tally.add(chunk, eos_ids)
                    finish = chunk.finish_reason or finish
                    scored += answer_logprobs(chunk, eos_ids)
                    for event in events(splitter.feed(chunk.text) if splitter
                                        else [chunk.text]):
                        yield event
            except ApiError as exc:  # the headers are gone: report in the stream, as OpenAI
                yield sse(exc.body())
                return
            for event in events(splitter.close() if splitter else []):
                yield event
            finish = "tool_calls" if calls else finish
            yield sse(piece("", finish))
        if options.include_usage:
            yield sse({**head, "object": "chat.completion.chunk" if kind == "chat"
                       else "text_completion", "choices": [], "usage": tally.usage()})
        yield sse("[DONE]")
    finally:
        watcher.cancel()
        cancel(jobs)


async def internal_error(request: Request, exc: Exception) -> Response:
    """The last resort (a fault outside any route's own handling): still OpenAI's shape."""
    log.error("unhandled error", exc_info=exc)
    return ApiError(500, f"Internal error: {type(exc).__name__}: {exc}").response()


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Unknown paths and wrong methods, in OpenAI's shape."""
    code = "unknown_url" if exc.status_code == 404 else "method_not_allowed"
    return ApiError(exc.status_code, f"Invalid URL ({request.method} {request.url.path}): "
                                     f"{exc.detail}.", code=code).response()


# --- middleware: key check and one log line per request -----------------------------------
class BearerAuth:
    """With a key, every route but /health needs `Authorization: Bearer KEY`."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if not header:
            error = ApiError(401, "You didn't provide an API key. You need to provide your API "
                                  "key in an Authorization header using Bearer auth (i.e. "
                                  "Authorization: Bearer YOUR_KEY).", code="invalid_api_key")
        elif scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            error = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        else:
            return await self.app(scope, receive, send)
        await error.response()(scope, receive, send)


class RequestLog:
    """One line per request: client, method, path, status, tokens, time (to the last byte);
    and the request counters of /metrics."""

    def __init__(self, app, metrics: Metrics | None = None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        slot = scope.setdefault("llmpress.usage", {})

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            log.info(request_log_line(scope, status[0], slot.get("tally"),
                                      time.perf_counter() - started))
            if self.metrics is not None:
                self.metrics.count_request(scope["path"] if scope["path"] in KNOWN_PATHS
                                           else "other", status[0])


def request_log_line(scope: dict, status: int, tally: Tally | None, seconds: float) -> str:
    client = scope.get("client") or ("-", 0)
    tokens = "-"
    if tally is not None:
        tokens = f"{tally.prompt_tokens}+{tally.completion_tokens} tokens " \
                 f"({tally.finish_reason or 'cancelled'})"
        if tally.cached_tokens:
            tokens += f" {tally.cached_tokens} cached"
    return f"{client[0]} {scope['method']} {scope['path']} {status} {tokens} {seconds:.2f}s"


def create_app(lm, model_id: str, aliases: frozenset[str] | set[str] = frozenset(), *,
               api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               parallel: int = 1, cors: tuple[str, ...] = (), pooling: str = "mean",
               cache_ram_mib: float | None = None) -> Starlette:
    """The ASGI app around a loaded model (llmpress.api.LanguageModel)."""
    worker = GenerationWorker(lm, max_queue, parallel,
                              None if cache_ram_mib is None else int(cache_ram_mib * 2**20))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    routes = [
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/v1/models", endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(get_model), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/embeddings", endpoint(embeddings), methods=["POST"]),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
        Route("/metrics", endpoint(metrics), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.llmpress = ServerState(lm, model_id, frozenset({model_id, *aliases}), worker,
                                     pooling=pooling)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    if cors:  # outside the key check: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(RequestLog, metrics=worker.metrics)  # outermost: logs the 401s too
    return app


# --- serve --------------------------------------------------------------------------------
def model_names(path: Path, given: str) -> tuple[str, frozenset[str]]:
    """-> (the model id: the file's stem, other names a request may use: the file name,
    the name given, and the pulled name ("smollm2") when the file is that download)."""
    from llmpress import hub

    model_id = path.name if path.is_dir() else path.stem
    pulled = {name for name in hub.CATALOG if hub.cached_path(name).resolve() == path.resolve()}
    return model_id, frozenset({model_id, path.name, str(given), *pulled})


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                               for i in infos)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when others on the network could use the model without a key."""
    if api_key or is_loopback(host):
        return None
    return (f"warning: listening on {host} without an API key: anyone who can reach this "
            "machine can use the model; set --api-key or LLMPRESS_API_KEY")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen before uvicorn starts, so a busy port is one clear error line."""
    if not 0 <= port <= 65535:
        raise LlmpressError(f"port {port} is not a TCP port; pick one in 1..65535 with --port")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise LlmpressError(f"cannot resolve host {host!r} ({exc.strerror}); "
                            "use an address such as 127.0.0.1 with --host") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise LlmpressError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another "
                            "--port (or stop what is using it)") from None
    return sock


def server_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(model_path_or_name: str | os.PathLike, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, ctx: int | None = None, api_key: str | None = None, *,
          mode: str = "fast", device: str | None = None, chat_template: str | None = None,
          max_queue: int = DEFAULT_MAX_QUEUE, parallel: int = 1,
          cors: tuple[str, ...] = (), cache_type_k: str | None = None,
          cache_type_v: str | None = None, speculative: dict | None = None,
          pooling: str = "mean", cache_ram_mib: float | None = None) -> None:
    """Load the model and serve it until Ctrl-C. api_key None reads LLMPRESS_API_KEY.
    parallel: how many conversations keep their prompt cache (slots). speculative:
    llmpress.load's draft, lookup_ngram and draft_* options."""
    from llmpress.api import load  # the public API sits above runtime; only serve needs it

    if not 1 <= parallel <= MAX_PARALLEL:
        raise LlmpressError(f"--parallel must be in 1..{MAX_PARALLEL}, not {parallel}")
    if cache_ram_mib is not None and cache_ram_mib < 0:
        cache_ram_mib = None  # -1, as llama.cpp's: no bound
    if pooling not in POOLINGS:
        raise LlmpressError(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if api_key is None:
        api_key = os.environ.get("LLMPRESS_API_KEY") or None
    lm = load(model_path_or_name, ctx=ctx, mode=mode, device=device, chat_template=chat_template,
              cache_type_k=cache_type_k, cache_type_v=cache_type_v, **(speculative or {}))
    model_id, aliases = model_names(Path(lm.source.path), str(model_path_or_name))
    sock = bind_socket(host, port)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(lm, model_id, aliases, api_key=api_key, max_queue=max_queue,
                     parallel=parallel, cors=tuple(cors), pooling=pooling,
                     cache_ram_mib=cache_ram_mib)
    url = server_url(sock)
    print(f"llmpress: serving {model_id} (context {lm.context_length} tokens, {lm.device}) "
          f"at {url}/v1{' (API key required)' if api_key else ''}", flush=True)
    if warning := exposure_warning(host, api_key):
        print(warning, file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m llmpress.runtime.server MODEL [--host] [--port] [--ctx] [--api-key]`."""
    parser = argparse.ArgumentParser(prog="python -m llmpress.runtime.server")
    parser.add_argument("model")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--ctx", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--cors", action="append", default=[], metavar="ORIGIN")
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--cache-ram", type=float, default=None)
    parser.add_argument("--draft", default=None)
    parser.add_argument("--lookup-ngram", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        serve(args.model, args.host, args.port, args.ctx, args.api_key, parallel=args.parallel,
              cors=tuple(args.cors), pooling=args.pooling, cache_ram_mib=args.cache_ram,
              speculative={"draft": args.draft, "lookup_ngram": args.lookup_ngram})
    except LlmpressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
