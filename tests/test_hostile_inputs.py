"""Hostile inputs besides model shapes (issue 16): work a file controls is bounded, every
failure is one line, and nothing is left behind by a killed writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from gguf import TokenType

from llmpress import cli
from llmpress.cli import models as cli_models
from llmpress.errors import LlmpressError
from llmpress.io.chat_template import render_chat
from llmpress.io.files import read_json_file, write_bytes_atomically
from llmpress.io.tokenizer import Tokenizer
from llmpress.runtime.sampling import Sampler, SamplingConfig

MESSAGES = [{"role": "user", "content": "Hi"}]


# --- chat templates -----------------------------------------------------------------------
@pytest.mark.parametrize("template, named", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "took more than"),
    ("{{ lipsum(10**6) }}", "lipsum would build"),
    ("x" * 20_000_000, "characters long"),
    ("{{ 'a' * 10**10 }}", "'*' would build"),
    ("{{ 'a'|center(10**10) }}", "center would build"),
    ("{{ 'a'.ljust(10**10) }}", "str.ljust would build"),
    ("{% set s = 'a' * 1000 %}{{ s.replace('', s)|replace('', s) }}", "replace would build"),
    ("{{ '%*d' % (10**9, 1) }}", "'%' formatting"),
    ("{{ '{:>999999999}'.format(1) }}", "str.format with a huge width"),
    ("{{ 'a\nb'|indent(10**9) }}", "indent would build"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s }}", "namespace attribute would build"),
    ("{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s }}{% endmacro %}{{ f('ab', 40) }}",
     "argument would build"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "rendered prompt exceeds"),
    # found by the fuzzer's memory check: 50 MiB of empty slices before the time limit
    ("{{ ('abc'|slice(10**9))|list }}", "slice filter with 1,000,000,000 slices"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    ("{% if true %}" * 100 + "{% endif %}" * 100, "nests too deeply"),  # IndentationError
    ("{% if true %}" * 2500 + "{% endif %}" * 2500, "nests too deeply"),  # RecursionError
    # found by the fuzzer's memory check: 1 GB of spaces before the time limit stopped it
    ("{{ messages|tojson(indent=10**9) }}", "tojson with an indent of 1,000,000,000"),
    # and 100 KB of template: compiling it took 32 MiB (a 512 KiB one far more)
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}" * 1000, "characters long (the limit is 65,536)"),
    (7, "is a int, not text"),
    ({"default": "x"}, "is a dict, not text"),
])
def test_hostile_chat_templates_are_stopped(template, named):
    start = time.perf_counter()
    with pytest.raises(LlmpressError, match="chat template") as error:
        render_chat(template, MESSAGES)
    assert named in str(error.value)
    assert time.perf_counter() - start < 10


def test_real_templates_still_render_within_budget(default_model_path):
    from llmpress.io.gguf import read_gguf_header
    template = read_gguf_header(default_model_path)[0]["tokenizer.chat_template"]
    text = render_chat(template, MESSAGES * 200)
    assert text.count("<|im_start|>user\nHi<|im_end|>") == 200


def test_non_utf8_template_file(tmp_path):
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ 'caf\xe9' }}")
    from llmpress.io.tokenizer import _hf_chat_template
    with pytest.raises(LlmpressError, match="not UTF-8"):
        _hf_chat_template(tmp_path, {})


def test_named_templates_that_are_not_dicts(tmp_path):
    from llmpress.io.tokenizer import _hf_chat_template
    assert _hf_chat_template(tmp_path, {"chat_template": [1, "x", None]}) is None


# --- JSON ---------------------------------------------------------------------------------
def test_deeply_nested_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LlmpressError, match="nested too deeply"):
        read_json_file(path)


def test_deeply_nested_config_json_from_the_command(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert cli.main(["info", str(tmp_path)]) == 1
    assert "nested too deeply" in capsys.readouterr().err


# --- tokenizer construction ---------------------------------------------------------------
def sentencepiece_metadata(extra: list[str]) -> dict:
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
              + ["\u2581a", "a", "b", "ab", "\u2581ab", "x", "xx"] + extra)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (len(tokens) - len(types))
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
            "tokenizer.ggml.token_type": [int(t) for t in types]}


def test_a_megabyte_token_builds_in_linear_time():
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(sentencepiece_metadata(["x" * 1_000_000]))
    assert time.perf_counter() - start < 5  # was quadratic: over 60 s
    plain = Tokenizer.from_gguf_metadata(sentencepiece_metadata([]))
    assert tok.encode("ab a xx") == plain.encode("ab a xx")


# --- memory: what a hostile input drives stays near its own size (the fuzzer's check) ------
def peak_growth(setup: str, code: str) -> int:
    """Bytes by which `code` raised a fresh interpreter's peak resident memory (VmHWM,
    reset after `setup`), as tests/fuzz/worker.py measures each case."""
    script = textwrap.dedent(f"""
        import re, sys
        sys.path.insert(0, "tests")
        def status(name):
            return int(re.search(name + r":\\s+(\\d+)", open("/proc/self/status").read())[1])
        {setup}
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        {code}
        print((status("VmHWM") - before) * 1024)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def test_a_prompt_far_past_the_context_is_refused_without_tokenizing_it_whole():
    """Found by the fuzzer: a 200 KB file's template rendered 500 KB of prompt, whose
    400,000 tokens took 65 MiB (the engine keeps ~170 bytes a token) before the context
    check; a 4 MB prompt took 600 MiB."""
    setup = ("from test_hostile_inputs import sentencepiece_metadata\n"
             "        from llmpress.io.tokenizer import Tokenizer\n"
             "        tok = Tokenizer.from_gguf_metadata(sentencepiece_metadata([]))\n"
             "        tok.encode('ab')\n"
             "        text = 'ab a ' * 800_000")
    code = ("try:\n            tok.encode(text, max_tokens=64)\n"
            "        except Exception as e:\n            print(e)")
    assert peak_growth(setup, code) < 16 << 20
    tok = Tokenizer.from_gguf_metadata(sentencepiece_metadata([]))
    with pytest.raises(LlmpressError, match="over 64 tokens"):
        tok.encode("ab a " * 800_000, max_tokens=64)
    fits = "ab a " * 20_000  # long enough to be counted in slices first: same tokens
    assert tok.encode(fits, max_tokens=100_000) == tok.encode(fits)


def test_a_megabyte_byte_level_token_costs_its_size():
    """Found by the fuzzer: a 1 MB token outside latin-1 became a bytes object per
    character (92 MiB) when the decoding table was built."""
    from llmpress.io.tokenizer import _byte_level_piece
    for text in ("\u0120hi", "a\u00e9\u6f22\u5b57b", "\u6f22xxx", "\u0100" * 3):
        assert _byte_level_piece(text) == b"".join(
            c.encode("latin-1") if ord(c) < 256 else c.encode()
            for c in text.translate(__import__("llmpress.io.tokenizer", fromlist=["x"])
                                    ._BYTE_DECODER))
    growth = peak_growth("from llmpress.io.tokenizer import _byte_level_piece\n"
                         "        token = '\\u6f22x' * 500_000",
                         "_byte_level_piece(token)")
    assert growth < 16 << 20


def test_control_tokens_beyond_any_real_vocabulary_are_refused():
    """Found by the fuzzer: a 1 MB control token made the engine's matcher take 85 MiB."""
    metadata = sentencepiece_metadata(["<|x|>" * 60_000])
    metadata["tokenizer.ggml.token_type"][-1] = int(TokenType.CONTROL)
    with pytest.raises(LlmpressError, match="control and user-defined tokens total 300,012 "):
        Tokenizer.from_gguf_metadata(metadata)


def test_split_points_find_every_merge_the_full_scan_finds():
    """The length filter must not drop a merge: compare with trying every cut."""
    meta = sentencepiece_metadata(["abab", "aba", "bab", "xxx", "xxxx", "xxxxxxx"])
    from llmpress.io.tokenizer import _split_points, _token_lengths
    token_ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    lengths = _token_lengths(token_ids)
    for text in token_ids:
        every = [c for c in range(1, len(text)) if text[:c] in token_ids and text[c:] in token_ids]
        kept = [c for c in _split_points(len(text), lengths)
                if text[:c] in token_ids and text[c:] in token_ids]
        assert sorted(kept) == every, text


def test_hf_tokenizer_id_beyond_any_vocabulary(tmp_path):
    from tokenizers import Tokenizer as Engine
    from tokenizers import models
    # written by hand: tokenizers' own save walks every id up to 10**9 (half a minute)
    data = json.loads(Engine(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).to_str())
    data["model"]["vocab"]["b"] = 10**9
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(LlmpressError, match="beyond any real vocabulary"):
        Tokenizer.from_hf_dir(tmp_path)


def test_rust_panic_in_the_tokenizers_library_is_one_line(tmp_path):
    """A post-processor naming a token it does not define panics inside tokenizers (a
    PanicException, which is a BaseException, not an Exception)."""
    from tokenizers import Tokenizer as Engine
    from tokenizers import models
    data = json.loads(Engine(models.BPE({"a": 0, "b": 1}, [])).to_str())
    data["post_processor"] = {
        "type": "TemplateProcessing", "special_tokens": {},
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(LlmpressError, match="tokenizers library cannot use it.*Panic"):
        Tokenizer.from_hf_dir(tmp_path)


# --- the command line: no traceback, ever ---------------------------------------------------
class FakePanic(BaseException):
    """What pyo3's PanicException is: a BaseException outside Exception."""


@pytest.mark.parametrize("raised", [ZeroDivisionError("boom"), FakePanic("no entry")])
def test_internal_errors_are_one_line_with_a_log(monkeypatch, tmp_path, capsys, raised):
    monkeypatch.setenv("LLMPRESS_HOME", str(tmp_path))
    monkeypatch.delenv("LLMPRESS_DEBUG", raising=False)

    def broken(args):
        raise raised
    monkeypatch.setattr(cli_models, "cmd_info", broken)
    assert cli.main(["info", "x.gguf"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: internal error, please report ({type(raised).__name__}")
    log = tmp_path / "logs" / "last-error.log"
    assert str(log) in err and "Traceback" in log.read_text() and "broken" in log.read_text()
    with pytest.raises(type(raised)):
        cli.main(["--debug", "info", "x.gguf"])


def test_keyboard_interrupt_keeps_its_meaning(monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_models, "cmd_info", interrupted)
    assert cli.main(["info", "x.gguf"]) == 130


# --- sampling -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_or_inf_logits_give_a_clear_error(bad, temperature):
    logits = torch.zeros(10)
    logits[3] = bad
    with pytest.raises(LlmpressError, match="NaN or infinite logits"):
        Sampler(SamplingConfig(temperature=temperature, seed=0))(logits, [])


def test_banned_tokens_still_sample():
    logits = torch.full((10,), float("-inf"))
    logits[4] = 0.0
    assert Sampler(SamplingConfig(seed=0))(logits, []) == 4


# --- temporary files of killed writers ------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmpress.io.gguf_write import GGUFStreamWriter, plan_gguf
    layout = plan_gguf({"general.architecture": "llama"}, [])
    with GGUFStreamWriter(Path(sys.argv[1]), layout) as w:
        print("writing", flush=True)
        time.sleep(60)
""")


def start_writer(target):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def partials(target):
    return sorted(p.name for p in target.parent.glob(f".{target.name}.*.partial"))


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out.gguf"
    killed = start_writer(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(partials(target)) == 1  # what kill -9 during quantize leaves
    alive = start_writer(target)  # the next write to that path
    try:
        left = partials(target)
        assert len(left) == 1 and f".{alive.pid}." in left[0]  # the dead one's went
        third = start_writer(target)  # a live writer's file is never touched
        assert len(partials(target)) == 2
        third.kill()
        third.wait()
    finally:
        alive.kill()
        alive.wait()


def test_atomic_writes_clean_up_too(tmp_path):
    target = tmp_path / "imatrix.dat"
    stale = tmp_path / f".{target.name}.999999999.abcd.tmp"  # a pid no process has
    stale.write_bytes(b"half")
    write_bytes_atomically(target, b"whole")
    assert target.read_bytes() == b"whole" and not stale.exists()
    assert not list(tmp_path.glob(".*.tmp"))
    assert os.listdir(tmp_path) == ["imatrix.dat"]
