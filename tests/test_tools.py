"""Tool calls: `tools` reach the chat template, the model's call text comes back as OpenAI
tool_calls (whole and streamed), and calls and results go back into the template. Against
the real server with the official openai client: a tiny random model whose template
speaks the Qwen/Hermes tool format (its calls forced by tool_choice, so they come from the
grammar, not luck), and the real default model, whose template knows no tools."""

from __future__ import annotations

import json

import httpx
import pytest

import llmpress
from llmpress.runtime.tools import (GENERIC, HERMES, LLAMA3, MISTRAL, parse_tool_calls,
                                    template_family, template_messages)
from test_hf_parity import VOCAB, write_byte_level_tokenizer
from test_server import ServerProcess
from test_structured_output import violations
from tiny import save_tiny_hf_model

# A template in the Qwen 2.5 style: tools listed in the system turn, calls in <tool_call>
# tags, results in <tool_response> tags.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call functions.
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Return each call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                  "properties": {"city": {"type": "string", "maxLength": 20},
                                 "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "The weather now in a city",
                                           "parameters": WEATHER_SCHEMA}},
         {"type": "function", "function": {"name": "get_time",
                                           "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TINY_CTX = 2048  # its vocabulary is mostly single bytes: the tools' JSON takes many tokens


# --- parsing each family's call text -----------------------------------------------------
@pytest.mark.parametrize("family,text,content,calls", [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
     "Let me check.", [("f", {"a": 1})]),
    (HERMES, '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>\n'
             '{"name": "g", "arguments": {"b": "x"}}\n</tool_call>', "",
     [("f", {}), ("g", {"b": "x"})]),
    (LLAMA3, '<|python_tag|>{"name": "f", "parameters": {"a": [1, 2]}}', "",
     [("f", {"a": [1, 2]})]),
    (LLAMA3, '{"name": "f", "parameters": {}}', "", [("f", {})]),
    (MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {"q": "x"}}, {"name": "g", '
              '"arguments": {}}]', "", [("f", {"q": "x"}), ("g", {})]),
    (GENERIC, '{"tool_call": {"name": "f", "arguments": {"a": true}}}', "", [("f", {"a": True})]),
    (GENERIC, '{"name": "f", "arguments": "{\\"a\\": 2}"}', "", [("f", {"a": 2})]),
    # not calls: they stay text
    (HERMES, "The weather is fine.", "The weather is fine.", []),
    (HERMES, "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
    (GENERIC, '{"answer": 42}', '{"answer": 42}', []),
    (LLAMA3, "[1, 2, 3]", "[1, 2, 3]", []),
])
def test_parse_tool_calls(family, text, content, calls):
    got_content, got = parse_tool_calls(text, family)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got)


def test_template_family():
    assert template_family(HERMES_TEMPLATE) == (HERMES, True)
    assert template_family("{{ '[TOOL_CALLS]' }}{{ tools }}") == (MISTRAL, True)
    assert template_family("<|python_tag|>{{ tools }}") == (LLAMA3, True)
    assert template_family("{% if tools %}{{ tools|tojson }}{% endif %}") == (GENERIC, True)
    assert template_family(None) == (HERMES, False)  # we teach it the hermes format


# --- the tiny Hermes-template model ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = save_tiny_hf_model(tmp_path_factory.mktemp("tiny_tools"), "qwen2", vocab_size=VOCAB,
                              max_position_embeddings=TINY_CTX)
    write_byte_level_tokenizer(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = HERMES_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def tiny_server(tiny_dir, tmp_path_factory):
    proc = ServerProcess(tiny_dir, tmp_path_factory.mktemp("tiny_server"), ctx=TINY_CTX)
    yield proc
    proc.close()


def test_tools_and_calls_reach_the_template(tiny_dir):
    lm = llmpress.load(tiny_dir, ctx=TINY_CTX)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'}]
    prompt = lm.chat_prompt(template_messages(history, TOOLS, True), tools=TOOLS)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in prompt  # tools as transformers gives them
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt  # an object
    assert '<tool_response>\n{"temp": 18}\n</tool_response>' in prompt


@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function",
                                          "function": {"name": "get_weather"}}])
def test_forced_call_round_trip(tiny_server, tool_choice):
    client = tiny_server.client()
    answer = client.chat.completions.create(model=tiny_server_model(tiny_server), messages=ASK,
                                            tools=TOOLS, tool_choice=tool_choice,
                                            temperature=1.0, seed=3, max_tokens=400)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    assert call.function.name in schema and call.id.startswith("call_")
    if call.function.name == "get_weather":
        assert violations(json.loads(call.function.arguments), WEATHER_SCHEMA) == []
    # the call and its result go back; the model answers (free text, any)
    follow = client.chat.completions.create(
        model=tiny_server_model(tiny_server), tools=TOOLS, max_tokens=4, temperature=0,
        messages=ASK + [choice.message, {"role": "tool", "tool_call_id": call.id,
                                         "content": '{"temp": 18}'}])
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.usage.prompt_tokens > answer.usage.prompt_tokens


def test_forced_call_streamed_as_deltas(tiny_server):
    kwargs = dict(model=tiny_server_model(tiny_server), messages=ASK, tools=TOOLS, seed=5,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  temperature=1.0, max_tokens=400)
    whole = tiny_server.client().chat.completions.create(**kwargs).choices[0].message
    chunks = list(tiny_server.client().chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    name = "".join(d.tool_calls[0].function.name or "" for d in deltas if d.tool_calls)
    arguments = "".join(d.tool_calls[0].function.arguments or "" for d in deltas if d.tool_calls)
    assert name == "get_weather"
    assert arguments == whole.tool_calls[0].function.arguments  # same seed, same call


def tiny_server_model(server) -> str:
    return httpx.get(server.base + "/v1/models", timeout=10).json()["data"][0]["id"]


BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "minLength": "x"}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": "f"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("fields,param", BAD_TOOLS, ids=[b[1] for b in BAD_TOOLS])
def test_bad_tools_are_a_400(tiny_server, fields, param):
    body = {"model": tiny_server_model(tiny_server), "messages": ASK, **fields}
    response = httpx.post(tiny_server.base + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# --- the real default model: its template knows no tools ---------------------------------
@pytest.fixture(scope="module")
def server(default_model_path, tmp_path_factory):
    proc = ServerProcess(default_model_path, tmp_path_factory.mktemp("server"))
    yield proc
    proc.close()


def test_default_model_round_trip(server, default_model_path):
    lm = llmpress.load(default_model_path, ctx=512)
    family, reads_tools = template_family(lm.tokenizer.chat_template)
    assert not reads_tools
    prompt = lm.chat_prompt(template_messages(ASK, TOOLS, reads_tools))
    assert "<tools>" in prompt and '"get_weather"' in prompt  # taught in the system turn

    client = server.client()
    answer = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS,
                                            tool_choice="required", temperature=0,
                                            max_tokens=80)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert violations(json.loads(call.function.arguments), WEATHER_SCHEMA) == []
    follow = client.chat.completions.create(
        model="smollm2", tools=TOOLS, temperature=0, max_tokens=30,
        messages=ASK + [message, {"role": "tool", "tool_call_id": call.id,
                                  "content": json.dumps({"temperature": 18, "unit": "celsius"})}])
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.choices[0].message.content
