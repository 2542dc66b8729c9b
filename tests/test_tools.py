"""Tool calls: `tools` reach the chat template, the model's call text comes back as OpenAI
tool_calls (whole and streamed), and calls and results go back into the template. Against
the real server with the official openai client: a tiny random model whose template
speaks the Qwen/Hermes tool format (its calls forced by tool_choice, so they come from the
grammar, not luck), and the real default model, whose template knows no tools."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer

import llmpress
from llmpress.runtime.grammar import Constraint, lark_grammar
from llmpress.runtime.tools import (GENERIC, HERMES, LLAMA3, MISTRAL, ToolCall,
                                    ToolCallSplitter, auto_call_grammar, parse_tool_calls,
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


STREAM_CASES = [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'),
    (HERMES, '  Two calls:\n\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n'
             '<tool_call>\n{"name": "g", "arguments": {"b": "<x>"}}\n</tool_call>\nbye'),
    (HERMES, "a < b and <tool is not <tool_call{ a call"),
    (HERMES, "Almost: <tool_call>{broken</tool_call>"),
    (HERMES, "just text, with a trailing line break\n"),
    (MISTRAL, 'Sure. [TOOL_CALLS][{"name": "f", "arguments": {"q": "x"}}]'),
    (MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {}}]'),
    (LLAMA3, '<|python_tag|>{"name": "f", "parameters": {"a": [1, 2]}}'),
    (GENERIC, '  {"name": "f", "arguments": {"a": true}}'),
    (GENERIC, "Text, then {\"name\": \"f\", \"arguments\": {}} is not a call"),
]


@pytest.mark.parametrize("family,text", STREAM_CASES)
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_splitter_streams_what_the_whole_parse_gives(family, text, piece):
    """Fed in pieces, the splitter gives the whole answer's split: the same content, the
    same calls, content first."""
    splitter = ToolCallSplitter(family)
    parts = [p for i in range(0, len(text), piece) for p in splitter.feed(text[i:i + piece])]
    parts += splitter.close()
    content, calls = parse_tool_calls(text, family)
    assert "".join(p for p in parts if isinstance(p, str)) == content
    streamed_calls = [p for p in parts if isinstance(p, ToolCall)]
    assert [(c.name, c.arguments) for c in streamed_calls] == [(c.name, c.arguments)
                                                               for c in calls]
    kinds = [isinstance(p, ToolCall) for p in parts]
    assert kinds == sorted(kinds)  # no content after a call


def test_splitter_sends_content_and_calls_as_they_come():
    splitter = ToolCallSplitter(HERMES)
    assert splitter.feed("Let me ") == ["Let me"]  # the space may be the gap before a call
    assert splitter.feed("check.\n<tool") == [" check."]  # "<tool" may start a call
    assert splitter.feed('_call>\n{"name": "f", "arguments": {}}') == []
    (call,) = splitter.feed("\n</tool_call>")  # whole: sent before the answer ends
    assert (call.name, call.arguments) == ("f", "{}")
    assert splitter.feed("\n") == [] and splitter.close() == []


def test_splitter_keeps_at_most_max_calls():
    text = STREAM_CASES[1][1]
    content, calls = parse_tool_calls(text, HERMES, max_calls=1)
    assert content == "  Two calls:" and [c.name for c in calls] == ["f"]
    splitter = ToolCallSplitter(HERMES, max_calls=1)
    parts = [p for ch in text for p in splitter.feed(ch)] + splitter.close()
    assert [p.name for p in parts if isinstance(p, ToolCall)] == ["f"]


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


WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", ' \
               '"unit": "celsius"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("text,max_calls,allowed", [
    ("The weather is fine.", None, True),
    ("a < b, and <tool_ is no call", None, True),
    (f"Let me check.\n{WEATHER_CALL}", None, True),
    (f"{WEATHER_CALL}\n{TIME_CALL}\n", None, True),
    (f"{WEATHER_CALL}\n{TIME_CALL}", 1, False),  # parallel_tool_calls false: one call
    (WEATHER_CALL.replace("celsius", "kelvin"), None, False),  # not in the enum
    (WEATHER_CALL.replace("get_weather", "get_wether"), None, False),  # no such tool
    (TIME_CALL.replace("{}", '{"x": 1'), None, False),  # broken JSON
    ("I will call <tool_call> now, in words", None, False),  # opened, so it must be a call
    (f"{WEATHER_CALL} and then more text", None, False),
])
def test_auto_call_grammar_holds_only_the_calls(tiny_dir, text, max_calls, allowed):
    """tool_choice auto: free text goes unconstrained; from <tool_call> on, the answer must
    be calls to the tools, valid against their schemas (llguidance checks each token)."""
    lm = llmpress.load(tiny_dir, ctx=TINY_CTX)
    constraint = Constraint(lark_grammar(auto_call_grammar(TOOLS, HERMES, max_calls),
                                         lm.tokenizer), lm.tokenizer)
    vocab = lm.model.cfg.vocab_size
    for token in lm.tokenizer.encode(text, add_bos=False):
        if not constraint.allowed(vocab)[token]:
            assert not allowed, f"refused {lm.tokenizer.token_to_piece(token)!r}"
            return
        constraint.accept(token)
    assert constraint.matcher.is_accepting() == allowed  # a whole answer, or unfinished


def test_auto_call_grammar_is_for_hermes_only():
    assert all(auto_call_grammar(TOOLS, family) is None for family in (LLAMA3, MISTRAL, GENERIC))


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
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
     "tools[0].function.strict"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": "f"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"parallel_tool_calls": 0}, "parallel_tool_calls"),
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


# --- content, then calls: a scripted model ------------------------------------------------
# Its tokens: pieces of an answer that says something and then calls two tools. Each token's
# embedding points at the next one's lm_head row, so greedy decoding says exactly this (and
# the tool-call marker is split over two tokens, as real vocabularies split it).
SCRIPT = ["Let me look", " that up.", " One moment.\n", "<tool", "_call>\n",
          '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
          "\n</tool_call>", "\n<tool_call>\n", '{"name": "get_time", "arguments": {}}',
          "\n</tool_call>\n"]
SCRIPT_END = "<|im_end|>"


def save_scripted_model(directory, script: list[str], template: str):
    """A one-layer llama that, after any prompt, says the script's tokens and then its
    end-of-turn token: its layer adds nothing (zero output projections), so the logits
    depend on the last token only."""
    write_byte_level_tokenizer(directory)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False) for t in script])
    tok.add_special_tokens([AddedToken(SCRIPT_END, special=True)])
    tok.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config |= {"chat_template": template, "eos_token": SCRIPT_END}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ids = [tok.token_to_id(t) for t in [*script, SCRIPT_END]]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=tok.get_vocab_size(), max_position_embeddings=TINY_CTX,
        tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name else 0.0)
        embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
        embedding[:, 0] = 1.0  # any token not in the script: start it
        head[ids[0], 0] = 1.0
        for step, (token, following) in enumerate(zip(ids, ids[1:]), start=1):
            embedding[token] = 0.0
            embedding[token, step] = 1.0
            head[following, step] = 1.0
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    path = save_scripted_model(tmp_path_factory.mktemp("scripted"), SCRIPT, HERMES_TEMPLATE)
    proc = ServerProcess(path, tmp_path_factory.mktemp("scripted_server"), ctx=TINY_CTX)
    yield proc
    proc.close()


SAID = "Let me look that up. One moment."
CALLED = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {})]


def test_content_then_calls(scripted_server):
    client = scripted_server.client()
    answer = client.chat.completions.create(model=tiny_server_model(scripted_server),
                                            messages=ASK, tools=TOOLS, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == SAID
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == CALLED
    assert len({c.id for c in choice.message.tool_calls}) == 2
    # without tools the same words are an answer like any other
    plain = client.chat.completions.create(model=tiny_server_model(scripted_server),
                                           messages=ASK, temperature=0)
    assert plain.choices[0].message.content == "".join(SCRIPT)
    assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls


def test_content_then_calls_streamed(scripted_server):
    """Content deltas as the words come, then each call: index, id, name, then its
    arguments; as OpenAI streams them. The official client's own accumulator (the
    `stream` helper) rebuilds the same message as the non-streamed answer."""
    kwargs = dict(model=tiny_server_model(scripted_server), messages=ASK, tools=TOOLS,
                  temperature=0)
    client = scripted_server.client()
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    contents = [d.content for d in deltas if d.content]
    assert contents[:2] == ["Let me look", " that up."]  # sent token by token
    assert "".join(contents) == SAID
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert not any(d.content for d in deltas[first_call:])  # content before the calls
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1] if c.choices)
    calls: dict[int, dict] = {}
    for delta in deltas:
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += d.id or ""
            call["name"] += d.function.name or "" if d.function else ""
            call["arguments"] += d.function.arguments or "" if d.function else ""
    assert sorted(calls) == [0, 1]
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in (0, 1)] == CALLED
    assert all(calls[i]["id"].startswith("call_") for i in (0, 1))

    with client.chat.completions.stream(**kwargs) as events:
        final = events.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == SAID
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in final.message.tool_calls] == CALLED


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_keeps_the_first_call(scripted_server, stream):
    client = scripted_server.client()
    kwargs = dict(model=tiny_server_model(scripted_server), messages=ASK, tools=TOOLS,
                  temperature=0, parallel_tool_calls=False)
    if stream:
        with client.chat.completions.stream(**kwargs) as events:
            choice = events.get_final_completion().choices[0]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == SAID
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == CALLED[:1]


# --- strict functions: a call the model opens by itself follows the schema -----------------
BAD_CALL_SCRIPT = ["Checking.", "\n<tool_call>\n",
                   '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}',
                   "\n</tool_call>"]


@pytest.fixture(scope="module")
def bad_call_server(tmp_path_factory):
    path = save_scripted_model(tmp_path_factory.mktemp("bad_call"), BAD_CALL_SCRIPT,
                               HERMES_TEMPLATE)
    proc = ServerProcess(path, tmp_path_factory.mktemp("bad_call_server"), ctx=TINY_CTX)
    yield proc
    proc.close()


def test_strict_functions_hold_the_calls_to_their_schemas(bad_call_server):
    """The model calls get_weather with a unit outside the enum. Without strict the call
    comes back as the model wrote it; with strict (tool_choice auto) the grammar refuses
    it from <tool_call> on, so no call that breaks a schema ever comes back."""
    client = bad_call_server.client()
    kwargs = dict(model=tiny_server_model(bad_call_server), messages=ASK, temperature=0,
                  max_tokens=60)
    loose = client.chat.completions.create(tools=TOOLS, **kwargs).choices[0]
    (call,) = loose.message.tool_calls
    assert violations(json.loads(call.function.arguments), WEATHER_SCHEMA) != []

    strict_tools = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    strict = client.chat.completions.create(tools=strict_tools, **kwargs).choices[0]
    assert strict.message.content.startswith("Checking.\n<tool_call>\n") or \
        strict.message.tool_calls  # the grammar took over after the marker
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in strict.message.tool_calls or []:
        assert violations(json.loads(call.function.arguments),
                          schemas[call.function.name]) == []
    assert "kelvin" not in (strict.message.content or "")
