"""Options that run, chat and serve share: --threads, --mode, --device, --chat-template."""

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
                         "9"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert seen["model"] == "some.gguf" and seen["port"] == 9
    assert (seen["mode"], seen["device"], seen["chat_template"]) == ("exact", "cpu", TEMPLATE)


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
