"""Seed files the fuzzer mutates: tiny checkpoints tests/tiny.py builds (saved by
transformers, with a trained byte-level tokenizer), their GGUF conversions by llmpress
itself, and the real default model (whose header is mutated; its data stays as is)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")

# model_type, GGUF file type of its conversion
TINY_MODELS = (("llama", "F32"), ("qwen2", "Q8_0"), ("qwen3", "Q4_0"))


@dataclass(frozen=True)
class Seeds:
    hf_dirs: tuple[Path, ...]
    tiny_ggufs: tuple[Path, ...]
    real_gguf: Path | None


def write_tokenizer(directory: Path, corpus: list[str]) -> None:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Engine

    tok = Engine(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "bos_token": "<|endoftext|>", "chat_template": CHATML}))


def build_seeds(work: Path, real: bool = True) -> Seeds:
    """Builds (once per work directory) and returns the seeds."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny.py
    work.mkdir(parents=True, exist_ok=True)
    hf_dirs, ggufs = [], []
    corpus = None
    for model_type, file_type in TINY_MODELS:
        directory = work / f"hf-{model_type}"
        gguf = work / f"tiny-{model_type}-{file_type}.gguf"
        if not gguf.exists():
            from tiny import save_tiny_hf_model

            from llmpress.calib.data import default_calibration_text
            from llmpress.quant.quantize import QuantizeConfig, quantize_model
            corpus = corpus or default_calibration_text().split("\n\n")[:400]
            save_tiny_hf_model(directory, model_type, hidden_size=64, intermediate_size=128,
                               vocab_size=512, num_attention_heads=4, num_key_value_heads=2)
            write_tokenizer(directory, corpus)
            quantize_model(QuantizeConfig(directory, gguf, file_type, error_rows=0))
        hf_dirs.append(directory)
        ggufs.append(gguf)
    real_path = None
    if real:
        from llmpress import hub
        real_path = hub.pull(hub.DEFAULT_MODEL)
    return Seeds(tuple(hf_dirs), tuple(ggufs), real_path)
