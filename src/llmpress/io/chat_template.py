"""Chat templates: the model's Jinja template turns a list of messages into prompt text.

Rendered the way transformers' apply_chat_template renders them (render_jinja_template in
transformers/utils/chat_template_utils.py): an immutable sandbox with trim_blocks and
lstrip_blocks, loop controls, a `{% generation %}` block tag, `raise_exception`,
`strftime_now`, and a `tojson` that does not HTML-escape. Templates come from model files
and are untrusted code; the sandbox keeps them away from Python internals.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.defaults import DEFAULT_FILTERS
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
        _within(_length(value), "a namespace attribute")  # values persist across loops
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
    # every line is indented: indent=10**9 would build gigabytes before any size check
    width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if width > MAX_INDENT:
        raise TemplateBudgetExceeded(f"tojson with an indent of {width:,} (the limit is "
                                     f"{MAX_INDENT})")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# --- the budget: a template from a model file must not hang or exhaust memory ------------
# real templates are a few KiB, the largest known ~30 KiB; compiling takes up to ~1 KiB of
# memory a character (62 MiB for 64 KiB of "{{a}}"; 512 KiB took far more)
MAX_TEMPLATE_CHARS = 64 * 1024
# characters (or items) any one value may reach while rendering: a few such values may be
# alive at once (4 bytes a character at worst); the fuzzer's memory check found 38 MiB
# taken by doubling a string up to 4,000,000. A real prompt's values are far smaller.
MAX_VALUE = 1_000_000
MAX_OUTPUT = 4_000_000  # characters of rendered prompt
RENDER_SECONDS = 2.0  # real templates render in milliseconds
MAX_INDENT = 64  # tojson's indent: real templates use 2 or 4
MAX_SLICES = 10_000  # the slice filter's count: each slice is a list of its own
_HUGE_FORMAT = re.compile(r"\*|\d{7,}")  # a '*' width or one of >= 7 digits


class TemplateBudgetExceeded(jinja2.exceptions.TemplateError):
    """The template asked for more time, memory or output than a prompt can need."""


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _within(size: int, what: str) -> None:
    if size > MAX_VALUE:
        raise TemplateBudgetExceeded(f"{what} would build a value of {size:,} characters or "
                                     f"items (the limit is {MAX_VALUE:,})")


def _replaced_size(text: str, old: str, new: str, count: int = -1) -> int:
    hits = text.count(old) + 1 if old == "" else text.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _check_str_method(text: str, name: str, args: tuple, kwargs: dict) -> None:
    """Pre-checks for the str methods whose result can dwarf their inputs."""
    values = (*args, *kwargs.values())
    if name in ("center", "ljust", "rjust", "zfill") and values:
        _within(int(values[0]) if isinstance(values[0], int) else 0, f"str.{name}")
    elif name == "expandtabs":
        _within(len(text) * (int(values[0]) if values and isinstance(values[0], int) else 8),
                "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        _within(_replaced_size(text, args[0], args[1], *args[2:3]), "str.replace")
    elif name == "join" and values and isinstance(values[0], (list, tuple)):
        items = values[0]
        _within(sum(_length(x) for x in items) + len(text) * len(items), "str.join")
    elif name in ("format", "format_map"):
        if re.search(r"\d{7,}", text) or any(isinstance(v, int) and v > MAX_VALUE
                                             for v in values):
            raise TemplateBudgetExceeded("str.format with a huge width")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus size checks where one operation can multiply a value's size."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and _length(seq):
                    _within(_length(seq) * n, "'*'")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 256 \
                and isinstance(left, (int, float)) and abs(left) > 1:
            raise TemplateBudgetExceeded(f"{left!r} ** {right!r} is too large")
        elif operator == "%" and isinstance(left, str) and _HUGE_FORMAT.search(
                re.sub(r"%%", "", left).split("%", 1)[-1] if "%" in left else ""):
            raise TemplateBudgetExceeded("'%' formatting with a huge or '*' width")
        result = super().call_binop(context, operator, left, right)
        _within(_length(result), f"'{operator}'")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (as jinja's own)
        for value in (*args, *kwargs.values()):
            _within(_length(value), "an argument")
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(owner, getattr(method, "__name__", ""), args, kwargs)
        result = ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
        _within(_length(result), "a call")
        return result


def _bounded_filter(name: str, check):
    plain = DEFAULT_FILTERS[name]

    def bounded(*args, **kwargs):
        check(*args, **kwargs)
        return plain(*args, **kwargs)
    # keep jinja's pass_context / pass_environment markers
    bounded.jinja_pass_arg = getattr(plain, "jinja_pass_arg", None)
    return bounded


def _center_check(value, width=80):
    if isinstance(width, int):
        _within(width, "center")


def _indent_check(text, width=4, *args, **kwargs):
    lines = str(text).count("\n") + 1
    if isinstance(width, int):
        _within(width * lines, "indent")
    elif isinstance(width, str):
        _within(len(width) * lines, "indent")


def _format_check(value, *args, **kwargs):
    if isinstance(value, str) and (_HUGE_FORMAT.search(value) or any(
            isinstance(v, int) and v > MAX_VALUE for v in (*args, *kwargs.values()))):
        raise TemplateBudgetExceeded("the format filter with a huge width")


def _replace_check(eval_ctx, text, old, new, count=None):
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        _within(_replaced_size(text, old, new, -1 if count is None else count), "replace")


def _join_check(eval_ctx, value, d="", attribute=None):
    if isinstance(value, (list, tuple)) and isinstance(d, str):
        _within(sum(_length(x) for x in value) + len(d) * len(value), "join")


def _slice_check(eval_ctx, value, slices, fill_with=None):
    # slice makes `slices` lists whatever the value's length: a list object each
    if isinstance(slices, int) and slices > MAX_SLICES:
        raise TemplateBudgetExceeded(f"the slice filter with {slices:,} slices (the limit is "
                                     f"{MAX_SLICES:,})")


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    _within(n * max if isinstance(n, int) and isinstance(max, int) else 0, "lipsum")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


BOUNDED_FILTERS = {
    "center": _bounded_filter("center", _center_check),
    "indent": _bounded_filter("indent", _indent_check),
    "format": _bounded_filter("format", _format_check),
    "replace": _bounded_filter("replace", _replace_check),
    "join": _bounded_filter("join", _join_check),
    "slice": _bounded_filter("slice", _slice_check),
}


class _Deadline:
    """A trace function that stops the template's Python code once its time is up (a
    loop of loops makes no call the sandbox sees). Installed only while rendering."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def __call__(self, frame, event, arg):
        if time.monotonic() > self.end:
            raise TemplateBudgetExceeded(f"rendering took more than {RENDER_SECONDS:g} s")
        # Every call (a generator resuming included) comes here; line by line only the
        # template's own code, whose loops may call nothing.
        return self if frame.f_code.co_filename == "<template>" else None


def _render_bounded(compiled: jinja2.Template, variables: dict[str, Any]) -> str:
    """The template's output, within RENDER_SECONDS and MAX_OUTPUT characters."""
    previous = sys.gettrace()
    sys.settrace(_Deadline(RENDER_SECONDS))
    try:
        pieces, size = [], 0
        for piece in compiled.generate(**variables):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise TemplateBudgetExceeded(f"the rendered prompt exceeds {MAX_OUTPUT:,} "
                                             "characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters.update(BOUNDED_FILTERS)
    env.filters["tojson"] = _tojson
    env.globals["lipsum"] = _lipsum
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
    if template is not None and not isinstance(template, str):
        raise LlmpressError(f"the model's chat template is a {type(template).__name__}, "
                            f"not text; {OVERRIDE_HINT}")
    template, _ = select_template(template)
    if len(template) > MAX_TEMPLATE_CHARS:
        raise LlmpressError(f"the model's chat template is {len(template):,} characters long "
                            f"(the limit is {MAX_TEMPLATE_CHARS:,}); {OVERRIDE_HINT}")
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise LlmpressError(f"the model's chat template is not valid Jinja: {_one_line(e)}; "
                            f"{OVERRIDE_HINT}") from None
    except (RecursionError, SyntaxError, MemoryError):  # Python's own limits on the code
        # jinja generates: nesting depth, indentation levels
        raise LlmpressError("the model's chat template nests too deeply to compile; "
                            f"{OVERRIDE_HINT}") from None
    variables = {"tools": None, "documents": None, **extra}
    try:
        text = _render_bounded(compiled, dict(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **variables))
    except TemplateRaised as e:
        raise LlmpressError(f"the chat template refused these messages: {_one_line(e)}; "
                            f"{OVERRIDE_HINT}") from None
    except (TemplateBudgetExceeded, MemoryError, RecursionError) as e:
        raise LlmpressError(f"the chat template was stopped: {_one_line(e) or type(e).__name__}"
                            f"; {OVERRIDE_HINT}") from None
    except Exception as e:  # undefined names, sandbox refusals, TypeError... in the template
        raise LlmpressError(f"the chat template failed on these messages: "
                            f"{type(e).__name__}: {_one_line(e)}; {OVERRIDE_HINT}") from None
    return text
