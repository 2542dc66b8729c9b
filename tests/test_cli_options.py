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
    """f16 by default in fast mode (as llama.cpp), f32 in exact mode, and llama.cpp's q8_0
    and q4_0 blocks (34 and 18 bytes per 32 values); keys and values each their own type;
    a type llmpress does not keep is one error line, from the CLI and the API."""
    import llmpress
    from llmpress.errors import LlmpressError
    from llmpress.models.kv_cache import KV_TYPES

    fast, exact = llmpress.load(default_model_path), llmpress.load(default_model_path, mode="exact")
    caches = [lm.model.new_cache(64) for lm in (fast, exact)]
    assert [c.dtypes for c in caches] == [(KV_TYPES["f16"],) * 2, (KV_TYPES["f32"],) * 2]
    assert caches[0].bytes() * 2 == caches[1].bytes()
    mixed = llmpress.load(default_model_path, cache_type_k="f32", cache_type_v="f16")
    assert mixed.model.new_cache(8).dtypes == (KV_TYPES["f32"], KV_TYPES["f16"])
    f16_bytes = caches[0].bytes()
    for name, block_bytes in (("q8_0", 34), ("q4_0", 18)):
        lm = llmpress.load(default_model_path, cache_type_k=name, cache_type_v=name)
        assert lm.model.new_cache(64).bytes() * 64 == f16_bytes * block_bytes
        assert lm.generate("The capital of France is", max_tokens=4, temperature=0).text
    for bad in (["-ctv", "q5_1"], ["-ctk", "Q8_0"], ["-ctk", "bf16"]):
        assert cli.main(["run", str(default_model_path), "-p", "Hi", "-n", "1", *bad]) == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"error: unknown KV cache type {bad[1]!r}; valid: f32, f16, q8_0, q4_0")
    with pytest.raises(LlmpressError, match="unknown KV cache type 'q5_1'; valid: f32, f16"):
        llmpress.load(default_model_path, cache_type_v="q5_1")


def test_a_quantized_cache_needs_whole_blocks_per_head(default_model_path):
    from dataclasses import replace

    import llmpress
    from llmpress.errors import LlmpressError
    from llmpress.models.kv_cache import KV_TYPES, KVCache

    cfg = llmpress.load(default_model_path).model.cfg
    odd = replace(cfg, head_dim=48)
    assert KVCache(odd, 4, dtypes=(KV_TYPES["f16"],) * 2).bytes() > 0
    with pytest.raises(LlmpressError, match="a q4_0 KV cache needs heads of a multiple of 32 "
                                            "values; this model's have 48: use f16 or f32"):
        KVCache(odd, 4, dtypes=(KV_TYPES["f16"], KV_TYPES["q4_0"]))


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
