"""Chat templates: the model's Jinja template turns a list of messages into prompt text.

Rendered the way transformers' apply_chat_template renders them (render_jinja_template in
transformers/utils/chat_template_utils.py): an immutable sandbox with trim_blocks and
lstrip_blocks, loop controls, a `{% generation %}` block tag, `raise_exception`,
`strftime_now`, and a `tojson` that does not HTML-escape. Templates come from model files
and are untrusted code; the sandbox keeps them away from Python internals.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmpress.errors import LlmpressError

# What a user can do about a template that fails: the option of run, chat and serve
# (load(..., chat_template=TEXT) in Python).
OVERRIDE_HINT = "use another template with --chat-template FILE"

# Used when a model carries no template: ChatML, the format most small chat models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format (its tokenizer_config.json template, text only), for Gemma files that
# carry no template: a system message goes in front of the first user turn.
GEMMA_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
    " + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# general.architecture -> the template a file of it without tokenizer.chat_template gets
BUILTIN_TEMPLATES = {"gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    for rendering it is a plain block."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
    """dict() for templates without exposing the dict type itself (as transformers)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class TemplateRaised(jinja2.exceptions.TemplateError):
    """The template itself refused the input (raise_exception)."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_TemplateNamespace, dict=_TemplateDict())
    return env.from_string(template)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    lineno = getattr(error, "lineno", None)
    return f"{text} (template line {lineno})" if lineno else text


def select_template(template: str | None) -> tuple[str, bool]:
    """-> (template to use, whether it is the ChatML fallback because the model has none)."""
    return (template, False) if template and template.strip() else (CHATML_TEMPLATE, True)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Render messages with the model's chat template; None or "" renders ChatML (see
    select_template to know which was used). extra reaches the template as variables
    (tools, documents, enable_thinking ...)."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m for m in messages):
        raise LlmpressError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
    template, _ = select_template(template)
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise LlmpressError(f"the model's chat template is not valid Jinja: {_one_line(e)}; "
                            f"{OVERRIDE_HINT}") from None
    variables = {"tools": None, "documents": None, **extra}
    try:
        text = compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **variables)
    except TemplateRaised as e:
        raise LlmpressError(f"the chat template refused these messages: {_one_line(e)}; "
                            f"{OVERRIDE_HINT}") from None
    except Exception as e:  # undefined names, sandbox refusals, TypeError... in the template
        raise LlmpressError(f"the chat template failed on these messages: "
                            f"{type(e).__name__}: {_one_line(e)}; {OVERRIDE_HINT}") from None
    return text
