"""Tool calls: OpenAI `tools` into the chat template, the model's tool-call text back out
as OpenAI `tool_calls`.

Each template family writes calls its own way (what its model was trained on):
  hermes   Qwen 2.5/3, Hermes:  <tool_call>{"name": ..., "arguments": {...}}</tool_call>
  llama3   Llama 3.x:           {"name": ..., "parameters": {...}} (maybe <|python_tag|>)
  mistral  Mistral:             [TOOL_CALLS][{"name": ..., "arguments": {...}}]
  generic  any other template:  a JSON object with "name" and "arguments"
A template that does not read `tools` at all gets them from us in a system message that
asks for the hermes format (llama.cpp's server does the same), and earlier calls and
results written into the messages as text. Forced calls (tool_choice "required" or a
named function) are decoded under a grammar of the family's format, so they always parse;
with tool_choice "auto" and a `strict` function, a hermes answer is free until it opens a
<tool_call>, and from there the same grammar holds it (auto_call_grammar).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from llmpress.runtime.grammar import JSON_LAYOUT

HERMES, LLAMA3, MISTRAL, GENERIC = "hermes", "llama3", "mistral", "generic"


def template_family(template: str | None) -> tuple[str, bool]:
    """-> (the family whose call format the template's model writes, whether the template
    renders `tools` itself)."""
    template = template or ""
    reads_tools = "tools" in template
    if "<tool_call>" in template:
        return HERMES, reads_tools
    if "[TOOL_CALLS]" in template:
        return MISTRAL, reads_tools
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3, reads_tools
    return (GENERIC if reads_tools else HERMES), reads_tools


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- into the template ---------------------------------------------------------------------
def template_messages(messages: list[dict], tools: list[dict] | None,
                      reads_tools: bool) -> list[dict]:
    """Messages as the template gets them. Templates that know tools read an assistant's
    tool_calls with arguments as an object (as transformers passes them); for the others,
    the tools go into the system message and calls become hermes text."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [{"id": c["id"], "type": "function",
                      "function": {"name": c["function"]["name"],
                                   "arguments": _as_object(c["function"]["arguments"])}}
                     for c in m["tool_calls"]]
            if reads_tools:
                m["tool_calls"] = calls
            else:
                text = "\n".join(_hermes_text(c["function"]) for c in calls)
                m = {"role": m["role"], "content": "\n".join(filter(None, [m["content"], text]))}
        elif m["role"] == "tool" and not reads_tools:
            m = {"role": "tool", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if tools and not reads_tools:
        system = tool_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def tool_system_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query. The "
            f"functions are:\n<tools>\n{listing}\n</tools>\nTo call a function, answer "
            "with a JSON object with its name and arguments inside <tool_call></tool_call> "
            'tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
            "\n</tool_call>")


def _as_object(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _hermes_text(function: dict) -> str:
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


# --- out of the model ------------------------------------------------------------------------
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_HERMES_CLOSED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
# where calls may start after some text, per family (llama3 and generic: the whole answer
# is the call or it is text)
_CALL_MARKERS = {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]"}
# how an answer that is nothing but a call begins
_WHOLE_ANSWER_STARTS = ("{", "[", "<|python_tag|>")


def parse_tool_calls(text: str, family: str,
                     max_calls: int | None = None) -> tuple[str, list[ToolCall]]:
    """-> (the text that is not a call, the calls: the first max_calls). Text that only
    looks like a call (broken JSON, no name) stays text. The same split as a stream gets
    (ToolCallSplitter)."""
    splitter = ToolCallSplitter(family, max_calls)
    parts = splitter.feed(text) + splitter.close()
    calls = [p for p in parts if isinstance(p, ToolCall)]
    return "".join(p for p in parts if isinstance(p, str)), calls


class ToolCallSplitter:
    """Splits an answer, as its text arrives, into content and calls, in order: content
    goes out as soon as it cannot be the start of a call, a call as soon as it is whole
    (hermes: at its </tool_call>; the other formats: at the end of the answer). Content
    before a call loses its trailing whitespace (the line break before the tag). Calls past
    max_calls are dropped (OpenAI's parallel_tool_calls false: one call at most)."""

    def __init__(self, family: str, max_calls: int | None = None):
        self.family, self.marker = family, _CALL_MARKERS.get(family)
        self.calls_left = max_calls
        self.mode = "start"  # -> "content" -> "calls"; or "start" -> "whole"
        self.pending = ""  # text not yet sent: held whitespace or a marker's beginning
        self.calls_text = ""  # from the marker on
        self.gap = ""  # the whitespace between the content and the marker
        self.bodies_done, self.sent_calls = 0, 0

    def feed(self, text: str) -> list[str | ToolCall]:
        return self._capped(self._feed(text))

    def close(self) -> list[str | ToolCall]:
        """The rest, at the end of the answer."""
        return self._capped(self._close())

    def _capped(self, parts: list[str | ToolCall]) -> list[str | ToolCall]:
        if self.calls_left is None:
            return parts
        kept = []
        for part in parts:
            if isinstance(part, ToolCall):
                if self.calls_left <= 0:
                    continue
                self.calls_left -= 1
            kept.append(part)
        return kept

    def _feed(self, text: str) -> list[str | ToolCall]:
        if self.mode == "start":
            self.pending += text
            head = self.pending.lstrip()
            if not head or any(m.startswith(head) for m in _WHOLE_ANSWER_STARTS
                               if not head.startswith(m)):
                return []  # too early to tell
            if head.startswith(_WHOLE_ANSWER_STARTS):
                self.mode = "whole"
                return []
            self.mode, text, self.pending = "content", self.pending, ""
        if self.mode == "whole":
            self.pending += text
            return []
        if self.mode == "content":
            return self._content(text)
        self.calls_text += text
        return self._closed_calls()

    def _close(self) -> list[str | ToolCall]:
        if self.mode in ("start", "whole"):
            content, calls = _parse_whole_answer(self.pending, self.family)
            return [p for p in (content, *calls) if p]
        if self.mode == "content":
            return [self.pending] if self.pending else []
        parts: list[str | ToolCall] = []
        if self.family == HERMES:
            bodies = _HERMES_CALL.findall(self.calls_text)[self.bodies_done:]
            parts = [c for body in bodies for c in _calls_in(body)]
        elif self.family == MISTRAL:
            parts = _calls_in(self.calls_text.removeprefix(self.marker).strip())
        if not parts and not self.sent_calls:  # it was not a call after all
            return [self.gap + self.calls_text]
        return parts

    def _content(self, text: str) -> list[str | ToolCall]:
        text = self.pending + text
        if self.marker and (at := text.find(self.marker)) >= 0:
            content = text[:at].rstrip()
            self.gap, self.calls_text = text[len(content):at], text[at:]
            self.mode, self.pending = "calls", ""
            return [p for p in (content, *self._closed_calls()) if p]
        keep = _marker_start_length(text, self.marker) if self.marker else 0
        body = text[:len(text) - keep]
        sent = body.rstrip()  # whitespace waits: it may be the gap before a call
        self.pending = text[len(sent):]
        return [sent] if sent else []

    def _closed_calls(self) -> list[ToolCall]:
        if self.family != HERMES:
            return []
        bodies = _HERMES_CLOSED_CALL.findall(self.calls_text)[self.bodies_done:]
        self.bodies_done += len(bodies)
        calls = [c for body in bodies for c in _calls_in(body)]
        self.sent_calls += len(calls)
        return calls


def _marker_start_length(text: str, marker: str) -> int:
    """How many characters at text's end could be the beginning of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _parse_whole_answer(text: str, family: str) -> tuple[str, list[ToolCall]]:
    """An answer that starts like a call: the call(s) in it, else the text."""
    if family == HERMES and "<tool_call>" in text:
        calls = [c for body in _HERMES_CALL.findall(text) for c in _calls_in(body)]
        if calls:
            return text[:text.index("<tool_call>")].strip(), calls
    if family == MISTRAL and "[TOOL_CALLS]" in text:
        head, _, body = text.partition("[TOOL_CALLS]")
        if calls := _calls_in(body.strip()):
            return head.strip(), calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if body.startswith(("{", "[")):  # llama3 and generic: the whole answer is the call
        if calls := _calls_in(body):
            return "", calls
    return text, []


def _calls_in(body: str) -> list[ToolCall]:
    try:
        value = json.loads(body)
    except ValueError:
        return []
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        value = value["tool_calls"]
    if isinstance(value, dict) and isinstance(value.get("tool_call"), dict):
        value = value["tool_call"]  # llama.cpp's generic format
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = item["function"]
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _as_object(arguments)
        calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False),
                              new_call_id()))
    return calls


# --- forcing a call ----------------------------------------------------------------------------
def forced_call_grammar(tools: list[dict], family: str) -> str:
    """A Lark grammar (llguidance's dialect) for exactly one call to one of tools, in the
    family's format: the call's arguments follow the function's parameter schema."""
    call = f"call: {_call_json(tools, family)}"
    if family == HERMES:
        return f"start: {json.dumps('<tool_call>' + chr(10))} call " \
               f"{json.dumps(chr(10) + '</tool_call>')}\n{call}"
    if family == MISTRAL:
        return f'start: "[TOOL_CALLS][" call "]"\n{call}'
    return f"start: call\n{call}"


def auto_call_grammar(tools: list[dict], family: str, max_calls: int | None = None) -> str | None:
    """For tool_choice "auto" with strict functions (as llama.cpp's "lazy" grammar): free
    text, or text and then calls to tools, each following its function's schema, so that
    a call the model starts always parses. Nothing is constrained before the first <tool_call>. Hermes only: its
    marker is text to the grammar engine, where Mistral's [TOOL_CALLS] is a control token
    (and llama3/generic calls are the whole answer, indistinguishable from JSON text)."""
    if family != HERMES:
        return None
    more = "" if max_calls == 1 else f" ({json.dumps(chr(10) + '<tool_call>' + chr(10))} call)*"
    return "\n".join([
        f"start: FREE | PREFIX call{more} /[ \\n]?/",
        "FREE: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/",  # text with no call in it
        # text up to its first <tool_call> (two would let a call go unchecked)
        "PREFIX: /(?s:.*)<tool_call>\\n/ & ~/(?s:.*<tool_call>.*<tool_call>.*)/",
        f"call: body {json.dumps(chr(10) + '</tool_call>')}",
        f"body: {_call_json(tools, family)}"])


def _call_json(tools: list[dict], family: str) -> str:
    """A call's JSON (name and arguments, as the family writes them) as a grammar rule's
    body: one of the tools, its arguments valid against its parameter schema."""
    key = "parameters" if family == LLAMA3 else "arguments"
    options = [{"type": "object", "additionalProperties": False, "required": ["name", key],
                "properties": {"name": {"const": t["function"]["name"]},
                               key: t["function"].get("parameters") or {"type": "object"}}}
               for t in tools]
    return f"%json {json.dumps({'anyOf': options, 'x-guidance': JSON_LAYOUT})}"
