"""Options that run, chat and serve share: --threads, --mode, --device, --chat-template,
--cache-type-k/-v."""

from __future__ import annotations

import pytest

from llmpress import cli
from llmpress.io.chat_template import render_chat

MESSAGES = [{"role": "user", "content": "Hi"}]
TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "


def test_serve_takes_the_options_of_run(monkeypatch, tmp_path):
    import torch

    from llmpress.runtime import server

    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    seen = {}
    monkeypatch.setattr(server, "serve", lambda model, **kw: seen.update(kw, model=model))
    threads = torch.get_num_threads()
    try:
        assert cli.main(["serve", "some.gguf", "--threads", "1", "--mode", "exact",
                         "--device", "cpu", "--chat-template", str(template), "--port",
                         "9", "-ctk", "f32", "-ctv", "f16"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert seen["model"] == "some.gguf" and seen["port"] == 9
    assert (seen["mode"], seen["device"], seen["chat_template"]) == ("exact", "cpu", TEMPLATE)
    assert (seen["cache_type_k"], seen["cache_type_v"]) == ("f32", "f16")


def test_kv_cache_types(default_model_path, capsys):
    """f16 by default in fast mode (as llama.cpp), f32 in exact mode; each half as large as
    the other; a type llmpress does not keep is one error line."""
    import torch

    import llmpress

    fast, exact = llmpress.load(default_model_path), llmpress.load(default_model_path, mode="exact")
    caches = [lm.model.new_cache(64) for lm in (fast, exact)]
    assert [c.dtypes for c in caches] == [(torch.float16,) * 2, (torch.float32,) * 2]
    assert caches[0].bytes() * 2 == caches[1].bytes()
    mixed = llmpress.load(default_model_path, cache_type_k="f32", cache_type_v="f16")
    assert mixed.model.new_cache(8).dtypes == (torch.float32, torch.float16)
    assert cli.main(["run", str(default_model_path), "-p", "Hi", "-n", "1", "-ctv", "q4_0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: unknown KV cache type 'q4_0': llmpress keeps keys and values as f32 "
                   "or f16 (llama.cpp's q8_0/q4_0 caches are not implemented yet)")


def test_a_chat_template_file_replaces_the_models(default_model_path, tmp_path, capsys):
    import llmpress

    lm = llmpress.load(default_model_path, chat_template=TEMPLATE, mode="exact")
    assert lm.chat_prompt(MESSAGES) == render_chat(TEMPLATE, MESSAGES) == \
        "[user] Hi\n[assistant] "
    assert llmpress.load(default_model_path).chat_prompt(MESSAGES) != lm.chat_prompt(MESSAGES)
    missing = tmp_path / "missing.jinja"
    assert cli.main(["run", str(default_model_path), "-p", "Hi", "--chat",
                     "--chat-template", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot read the chat template {missing}: No such file or directory"


@pytest.mark.parametrize("command", ["run", "chat", "serve"])
def test_every_chat_command_has_the_options(command):
    args = cli.build_parser().parse_args(
        [command, "m", "--threads", "2", "--mode", "exact", "--device", "cpu",
         "--chat-template", "t.jinja"] + (["-p", "x"] if command == "run" else []))
    assert (args.threads, args.mode, args.device, args.chat_template) == \
        (2, "exact", "cpu", "t.jinja")
