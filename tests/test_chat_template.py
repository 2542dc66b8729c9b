"""Chat templates rendered by us against transformers' apply_chat_template and llama.cpp's
llama_chat_apply_template."""

from __future__ import annotations

import ctypes

import llama_cpp
import pytest
from tokenizers import Tokenizer as EngineTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from llmpress.errors import LlmpressError
from llmpress.io.chat_template import CHATML_TEMPLATE, render_chat, select_template
from llmpress.io.gguf import load_gguf

BOS, EOS = "<s>", "</s>"

CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi é 日本 😀"}],
    "multi_turn": [{"role": "system", "content": "You answer in French."},
                   {"role": "user", "content": "Hello"},
                   {"role": "assistant", "content": "Bonjour !"},
                   {"role": "user", "content": "Ça va ?\nLine two"}],
    "no_system": [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And 3+3?"}],
    "single_user": [{"role": "user", "content": "  spaced  "}],
}

# A template in the style of current Hub templates: whitespace control, lstrip/trim
# blocks, namespace, loop controls, tojson with options, raise_exception, generation blocks,
# tools and an extra variable.
FEATURES_TEMPLATE = """\
{%- set ns = namespace(system=none, count=0) %}
{%- if messages[0].role == 'system' %}
    {%- set ns.system = messages[0].content %}
{%- endif %}
{{ bos_token }}
{% if ns.system %}
<<SYS>>{{ ns.system | trim }}<</SYS>>
{% endif %}
{% if tools %}
Tools: {{ tools | tojson(indent=2) }}
Compact: {{ tools[0] | tojson(separators=(',', ':'), sort_keys=true) }}
{% endif %}
{% for message in messages %}
    {% if message.role == 'system' %}{% continue %}{% endif %}
    {% if message.role not in ['user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message.role) }}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if message.content == 'STOP' %}{% break %}{% endif %}
    [{{ ns.count }}|{{ loop.index0 }}] {{ message.role | upper }}:
    {% if message.role == 'assistant' %}
        {% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}
    {% else %}
        {{ message.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
ASSISTANT{% if enable_thinking is defined and not enable_thinking %} (no think){% endif %}:
{% endif %}
{{ {'a': 1, 'ü': 'ö'} | tojson }} {{ dict(x=1) | tojson }} {{ strftime_now('%Y') }}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}}}}]


def hf_render(template: str, messages: list[dict], add_generation_prompt: bool, **extra) -> str:
    """transformers' apply_chat_template(tokenize=False) with the same BOS/EOS texts."""
    engine = EngineTokenizer(models.BPE({"a": 0, BOS: 1, EOS: 2}, []))
    hf = PreTrainedTokenizerFast(tokenizer_object=engine, bos_token=BOS, eos_token=EOS)
    hf.chat_template = template
    return hf.apply_chat_template(messages, tokenize=False,
                                  add_generation_prompt=add_generation_prompt, **extra)


def llama_cpp_render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """llama.cpp's built-in renderer (it recognises a template family, not Jinja)."""
    chat = (llama_cpp.llama_chat_message * len(messages))(*[
        llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode())
        for m in messages])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages),
                                            add_generation_prompt, buf, len(buf))
    assert 0 < n <= len(buf)
    return buf.raw[:n].decode()


@pytest.fixture(scope="module")
def smollm_template(default_model_path) -> str:
    return load_gguf(default_model_path).metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_default_model_template_matches_transformers(smollm_template, name,
                                                     add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = render_chat(smollm_template, messages, add_generation_prompt,
                       bos_token=BOS, eos_token=EOS)
    assert ours == hf_render(smollm_template, messages, add_generation_prompt)
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    if messages[0]["role"] != "system":  # the template supplies SmolLM's own system prompt
        assert ours.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", ["system_user", "multi_turn"])
def test_default_model_template_matches_llama_cpp(smollm_template, name, add_generation_prompt):
    """llama.cpp renders this template as plain ChatML, which adds no default system
    prompt: the two agree when the conversation brings its own."""
    messages = CONVERSATIONS[name]
    assert render_chat(smollm_template, messages, add_generation_prompt) == llama_cpp_render(
        smollm_template, messages, add_generation_prompt)


@pytest.mark.parametrize("extra", [{}, {"tools": TOOLS}, {"enable_thinking": False}])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_template_features_match_transformers(name, extra):
    messages = CONVERSATIONS[name]
    for add_generation_prompt in (True, False):
        ours = render_chat(FEATURES_TEMPLATE, messages, add_generation_prompt,
                           bos_token=BOS, eos_token=EOS, **extra)
        assert ours == hf_render(FEATURES_TEMPLATE, messages, add_generation_prompt, **extra)
    assert '{"a": 1, "ü": "ö"}' in ours  # tojson keeps non-ASCII and does not HTML-escape


def test_loop_break_matches_transformers():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "STOP"},
                {"role": "user", "content": "never shown"}]
    ours = render_chat(FEATURES_TEMPLATE, messages, bos_token=BOS, eos_token=EOS)
    assert ours == hf_render(FEATURES_TEMPLATE, messages, True)
    assert "never shown" not in ours


def test_no_template_falls_back_to_chatml_like_llama_cpp():
    assert select_template(None) == (CHATML_TEMPLATE, True)
    assert select_template("  ") == (CHATML_TEMPLATE, True)
    assert select_template("{{ x }}") == ("{{ x }}", False)
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (True, False):
            assert render_chat(None, messages, add_generation_prompt) == llama_cpp_render(
                "chatml", messages, add_generation_prompt)


def test_tokenizer_renders_with_its_own_template(default_model_path, smollm_template):
    from llmpress.io.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(load_gguf(default_model_path).metadata)
    messages = CONVERSATIONS["multi_turn"]
    assert tok.chat_prompt(messages) == render_chat(
        smollm_template, messages, bos_token="<|im_start|>", eos_token="<|im_end|>")


# ---- errors: one line, LlmpressError ------------------------------------------------------


@pytest.mark.parametrize("template, messages, message", [
    (FEATURES_TEMPLATE, [{"role": "tool", "content": "x"}], "refused these messages: unknown role: tool"),
    ("{% for m in messages %}{{ m.content }", CONVERSATIONS["single_user"], "not valid Jinja"),
    ("{% generation %}x", CONVERSATIONS["single_user"], "not valid Jinja"),
    ("{{ messages[0].content + 1 }}", CONVERSATIONS["single_user"], "TypeError"),
    ("{{ missing.attr }}", CONVERSATIONS["single_user"], "'missing' is undefined"),
    ("{{ ''.__class__.__mro__ }}", CONVERSATIONS["single_user"], "unsafe"),
    ("{% set x = [] %}{{ x.append(1) }}", CONVERSATIONS["single_user"], "SecurityError"),
    ("{% set ns = namespace(_private=1) %}", CONVERSATIONS["single_user"], "not allowed"),
    ("{{ x }}", [{"content": "no role"}], "must be a list of"),
    ("{{ x }}", "not a list", "must be a list of"),
])
def test_template_errors_are_one_clear_line(template, messages, message):
    with pytest.raises(LlmpressError, match=message) as info:
        render_chat(template, messages)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("template", ["{% for m in messages %}{{ m.content }",
                                      "{{ missing.attr }}", FEATURES_TEMPLATE])
def test_template_errors_name_the_option_that_replaces_the_template(template):
    with pytest.raises(LlmpressError, match="use another template with --chat-template FILE"):
        render_chat(template, [{"role": "tool", "content": "x"}])
