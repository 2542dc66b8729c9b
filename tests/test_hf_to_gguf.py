"""A Hugging Face directory converted to GGUF (`llmpress quantize HF_DIR OUT TYPE`) carries
its tokenizer as convert_hf_to_gguf writes it: llama.cpp loads the file, tokenizes like
transformers does on the directory, and computes our runtime's logits.

Tokenizers are trained here, one per family we convert: byte-level BPE with the
pre-tokenizers of Llama 3, Qwen2, SmolLM and GPT-2, and a SentencePiece BPE with byte
fallback (Llama 2 / TinyLlama / Mistral v0.1 style), written both as tokenizer.model +
tokenizer.json and as tokenizer.json alone. References: llama.cpp (llama-cpp-python),
transformers' AutoTokenizer, sentencepiece, and gguf-py's own vocab classes.
"""

from __future__ import annotations

import io
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from test_tokenizer import write_vocab_gguf
from tiny import save_tiny_hf_model
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as EngineTokenizer
from transformers import AutoTokenizer

from llmpress.cli import main
from llmpress.errors import LlmpressError
from llmpress.io import hf_vocab
from llmpress.io.gguf import load_gguf
from llmpress.io.tokenizer import Tokenizer
from llmpress.quant.quantize import QuantizeConfig, quantize_model

K = gguf.Keys.Tokenizer
MODEL_VOCAB = 520  # embedding rows: a few more than the tokenizers' ids, as real models pad
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé façade, Zürich Straße; Ça va? e\u0301",
    "日本語のテキスト、東京。 你好世界 Привет мир",
    "emoji 😀🎉 👋🏽 🏳️‍🌈 ok",
    "numbers 3 33 333 3333 1,234.5 -7 and I'M here, you'LL see; it's",
    "  leading spaces\tand tabs\n\nnew lines\r\n  trailing  ",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SPECIAL_TEXT = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<tool> ok"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models


@pytest.fixture(scope="module")
def corpus(wikitext_bytes) -> list[str]:
    text = wikitext_bytes[:80_000].decode("utf-8")
    return [*text.splitlines(), *TEXTS * 30]


# --- byte-level BPE tokenizers, trained here -------------------------------------------
@dataclass(frozen=True)
class ByteLevelCase:
    pre: str  # the tokenizer.ggml.pre llama.cpp needs for this pre-tokenizer
    model_type: str
    bos: str | None  # a BOS the post-processor adds (Llama 3), else None
    normalizer: str | None = None


BYTE_LEVEL_CASES = {
    "llama3": ByteLevelCase("llama-bpe", "llama", bos="<|begin_of_text|>"),
    "qwen2": ByteLevelCase("qwen2", "qwen2", bos=None, normalizer="NFC"),
    "smollm": ByteLevelCase("smollm", "llama", bos=None),
    "gpt2": ByteLevelCase("gpt-2", "qwen3", bos=None),
}


def byte_level_pre_tokenizer(pre: str):
    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    split = hf_vocab.HF_LLAMA3_SPLIT if pre == "llama-bpe" else hf_vocab.HF_QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def write_byte_level_tokenizer(directory: Path, case: ByteLevelCase, corpus: list[str]) -> None:
    """A byte-level BPE as Llama 3 / Qwen2 / SmolLM / GPT-2 ship theirs: tokenizer.json with
    added special tokens (and one user-defined token), tokenizer_config.json with the
    special tokens and a chat template."""
    tok = EngineTokenizer(models.BPE(ignore_merges=case.pre == "llama-bpe"))
    if case.normalizer == "NFC":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_level_pre_tokenizer(case.pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    specials = [case.bos or "<|endoftext|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    if case.bos:
        bos_id = tok.token_to_id(case.bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{case.bos} $A",
                                          pair=f"{case.bos} $A {case.bos} $B",
                                          special_tokens=[(case.bos, bos_id)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "bos_token": case.bos or "<|endoftext|>", "pad_token": "<|end_of_text|>",
              "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}
    if case.model_type == "qwen2":  # Qwen2 keeps its template in chat_template.jinja
        (directory / "chat_template.jinja").write_text(config.pop("chat_template"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


# --- SentencePiece BPE with byte fallback, trained here --------------------------------
def train_sentencepiece(corpus: list[str]) -> bytes:
    """Llama 2's settings: BPE, byte fallback, digits split, no normalization."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, model_type="bpe",
        vocab_size=500, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return proto.getvalue()


def sentencepiece_tokenizer_json(sp: spm.SentencePieceProcessor) -> EngineTokenizer:
    """The tokenizer.json transformers' LlamaConverter makes of a SentencePiece BPE model
    (legacy Llama 2 layout): vocabulary by id, a merge for every split of a piece into two
    pieces, ordered by the piece's score; byte fallback; spaces as U+2581 with one
    prepended to every text segment; BOS added by the post-processor."""
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    merges = []
    for piece, i in vocab.items():
        if sp.IsByte(i) or sp.IsControl(i) or sp.IsUnknown(i):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-sp.GetScore(i), vocab[left], vocab[right], left, right))
    merges.sort()
    tok = EngineTokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token="<unk>",
                                     fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def write_sentencepiece_tokenizer(directory: Path, model_proto: bytes,
                                  with_model_file: bool) -> None:
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    tok = sentencepiece_tokenizer_json(sp)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    tok.save(str(directory / "tokenizer.json"))
    decoder = {str(i): {"content": t.content, "special": t.special, "normalized": t.normalized,
                        "lstrip": False, "rstrip": False, "single_word": False}
               for i, t in tok.get_added_tokens_decoder().items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
              "added_tokens_decoder": decoder, "additional_special_tokens": ["<|im_start|>"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if with_model_file:
        (directory / "tokenizer.model").write_bytes(model_proto)


@pytest.fixture(scope="module")
def sentencepiece_proto(corpus) -> bytes:
    return train_sentencepiece(corpus)


# --- directories and their conversions ---------------------------------------------------
@dataclass
class Converted:
    directory: Path
    gguf_path: Path
    metadata: dict


def convert(directory: Path, out: Path, file_type: str) -> Converted:
    quantize_model(QuantizeConfig(directory, out, file_type, error_rows=0))
    return Converted(directory, out, load_gguf(out).metadata)


@pytest.fixture(scope="module")
def byte_level_dirs(tmp_path_factory, corpus):
    made: dict[str, Converted] = {}

    def make(name: str) -> Converted:
        if name not in made:
            case = BYTE_LEVEL_CASES[name]
            d = tmp_path_factory.mktemp(name)
            save_tiny_hf_model(d, case.model_type, vocab_size=MODEL_VOCAB,
                               hidden_size=64, intermediate_size=128)
            write_byte_level_tokenizer(d, case, corpus)
            made[name] = convert(d, d.parent / f"{name}-q8.gguf", "Q8_0")
        return made[name]
    return make


@pytest.fixture(scope="module")
def sentencepiece_dirs(tmp_path_factory, sentencepiece_proto):
    made: dict[str, Converted] = {}

    def make(layout: str) -> Converted:
        if layout not in made:
            d = tmp_path_factory.mktemp(layout)
            save_tiny_hf_model(d, "llama", vocab_size=MODEL_VOCAB, hidden_size=64,
                               intermediate_size=128)
            write_sentencepiece_tokenizer(d, sentencepiece_proto,
                                          with_model_file=layout == "model_file")
            out = d.parent / f"{layout}-f16.gguf"
            # `llmpress quantize HF_DIR OUT TYPE`, the command itself
            assert main(["quantize", str(d), str(out), "F16", "--summary"]) == 0
            made[layout] = Converted(d, out, load_gguf(out).metadata)
        return made[layout]
    return make


def llama(path: Path) -> llama_cpp.Llama:
    # F32 K/V cache (type 0): no rounding of keys and values beyond the weights'
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, n_threads_batch=1,
                           logits_all=True, type_k=0, type_v=0, verbose=False)


def check_tokenization(converted: Converted) -> None:
    """llama.cpp on the file, transformers on the directory and our tokenizer rebuilt from
    the file's metadata give the same ids, special tokens and BOS/EOS included."""
    llm = llama(converted.gguf_path)
    hf = AutoTokenizer.from_pretrained(converted.directory)
    ours = Tokenizer.from_gguf_metadata(converted.metadata)
    nfc = (json.loads((converted.directory / "tokenizer.json").read_text())
           .get("normalizer") or {}).get("type") == "NFC"
    for text in [*TEXTS, SPECIAL_TEXT, CHAT_TEMPLATE[:40]]:
        if nfc:  # Qwen2's NFC normalizer: llama.cpp has none (nor a key to ask for one)
            text = unicodedata.normalize("NFC", text)
        expected = hf.encode(text)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, text
        assert ours.encode(text) == expected, text
        if text in TEXTS:  # (around special tokens, spaces decode as llama.cpp's do)
            assert ours.decode(expected, special=False) == hf.decode(
                expected, skip_special_tokens=True)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    assert llama_cpp.llama_vocab_n_tokens(vocab) == MODEL_VOCAB
    assert llama_cpp.llama_vocab_eos(vocab) == hf.eos_token_id
    assert ours.chat_template == CHAT_TEMPLATE


# --- byte-level BPE -----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BYTE_LEVEL_CASES))
def test_byte_level_directory_converts_and_tokenizes_like_transformers(byte_level_dirs, name):
    converted = byte_level_dirs(name)
    meta = converted.metadata
    assert meta[K.MODEL] == "gpt2"
    assert meta[K.PRE] == BYTE_LEVEL_CASES[name].pre
    check_tokenization(converted)


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_byte_level_vocabulary_matches_gguf_py(byte_level_dirs, name):
    """Tokens and types as get_vocab_base lists them (transformers' vocabulary, added tokens
    control or user-defined, [PADn] unused) and SpecialVocab's merges, ids and flags."""
    converted = byte_level_dirs(name)
    meta, d = converted.metadata, converted.directory
    hf = AutoTokenizer.from_pretrained(d)
    by_id = {i: t for t, i in hf.get_vocab().items()}
    added = hf.added_tokens_decoder
    expected_types = [gguf.TokenType.UNUSED if i not in by_id
                      else gguf.TokenType.NORMAL if i not in added
                      else gguf.TokenType.CONTROL if added[i].special
                      else gguf.TokenType.USER_DEFINED for i in range(MODEL_VOCAB)]
    assert meta[K.LIST] == [by_id.get(i, f"[PAD{i}]") for i in range(MODEL_VOCAB)]
    assert meta[K.TOKEN_TYPE] == [int(t) for t in expected_types]
    special = gguf.SpecialVocab(d, load_merges=True)
    assert meta[K.MERGES] == special.merges
    assert_special_vocab_matches(meta, special)
    if name == "llama3":
        assert meta[K.ADD_BOS] is True and meta[K.BOS_ID] == hf.bos_token_id
    else:
        assert meta[K.ADD_BOS] is False


def assert_special_vocab_matches(meta: dict, special: gguf.SpecialVocab) -> None:
    ids = {t: meta[k] for t, k in hf_vocab.SPECIAL_ID_KEYS.items() if k in meta}
    assert ids == {t: i for t, i in special.special_token_ids.items() if t != "cls"}
    flags = {t: meta[k] for t, k in hf_vocab.ADD_FLAG_KEYS.items() if k in meta}
    reference = {t: v for t, v in special.add_special_token.items()
                 if t in hf_vocab.ADD_FLAG_KEYS}
    # convert_hf_to_gguf's newer gguf-py also reads a ByteLevel post-processor as
    # "add neither BOS nor EOS"; the gguf-py installed here predates that rule
    assert {t: v for t, v in flags.items() if t in reference} == reference
    assert not any(v for t, v in flags.items() if t not in reference)
    assert meta.get(K.CHAT_TEMPLATE) == special.chat_template


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gpt2"])
def test_logits_match_our_runtime_on_the_directory(byte_level_dirs, tmp_path, name):
    """llama.cpp on the converted file computes the logits our runtime computes on the
    directory in exact mode: to float32 rounding on an F32 file (measured: 3e-7 of the
    largest logit), to F16 activation rounding on an F16 file (5e-4); the Q8_0 file
    predicts the same top token (measured: all positions)."""
    import llmpress
    converted = byte_level_dirs(name)
    lm = llmpress.load(converted.directory, mode="exact", device="cpu")
    ids = lm.encode(TEXTS[0] + " " + TEXTS[2])[:16]
    ours = lm.logits(ids)
    scale = float(ours.abs().max())
    for file_type, tolerance in (("F32", 1e-5), ("F16", 3e-3)):
        converted_file = convert(converted.directory, tmp_path / f"{file_type}.gguf", file_type)
        torch.testing.assert_close(llama_logits(converted_file.gguf_path, ids), ours, rtol=0,
                                   atol=tolerance * scale)
    top = llama_logits(converted.gguf_path, ids).argmax(-1)
    assert (top == ours.argmax(-1)).float().mean() >= 0.9


def llama_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llm = llama(path)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def test_smollm2_vocabulary_reproduces_convert_hf_to_gguf(default_model_path, tmp_path):
    """The real SmolLM2 vocabulary, written back as its Hugging Face tokenizer.json: the
    check-text hash is the one convert_hf_to_gguf's table names "smollm", and tokens,
    types and merges come out as in the GGUF file convert_hf_to_gguf wrote."""
    original = load_gguf(default_model_path).metadata
    tokens, types = original[K.LIST], original[K.TOKEN_TYPE]
    pairs = [tuple(m.split(" ", 1)) for m in original[K.MERGES]]
    tok = EngineTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs))
    tok.pre_tokenizer = byte_level_pre_tokenizer("smollm")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert hf_vocab.check_text_hash(tok) == (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[original[K.BOS_ID]], "eos_token": tokens[original[K.EOS_ID]],
        "chat_template": original[K.CHAT_TEMPLATE]}))
    ours = hf_vocab.tokenizer_metadata(tmp_path, "llama", len(tokens))
    for key in (K.MODEL, K.PRE, K.LIST, K.TOKEN_TYPE, K.MERGES, K.BOS_ID, K.EOS_ID,
                K.CHAT_TEMPLATE):
        assert ours[key] == original[key], key


# --- SentencePiece ------------------------------------------------------------------------
def test_trained_sentencepiece_tokenizer_json_is_faithful(sentencepiece_proto):
    """The test's own tokenizer.json (LlamaConverter's layout) splits as sentencepiece."""
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_proto)
    tok = sentencepiece_tokenizer_json(sp)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text


@pytest.mark.parametrize("layout", ["model_file", "json_only"])
def test_sentencepiece_directory_converts_and_tokenizes_like_transformers(sentencepiece_dirs,
                                                                          layout):
    converted = sentencepiece_dirs(layout)
    meta = converted.metadata
    assert meta[K.MODEL] == "llama" and meta[K.PRE] == "default"
    types = meta[K.TOKEN_TYPE]
    assert [meta[K.LIST][i] for i, t in enumerate(types) if t == gguf.TokenType.BYTE] == [
        f"<0x{b:02X}>" for b in range(256)]
    check_tokenization(converted)
    llm = llama(converted.gguf_path)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    assert llama_cpp.llama_vocab_get_add_bos(vocab)
    assert llama_cpp.llama_vocab_bos(vocab) == 1


def test_sentencepiece_model_file_matches_gguf_py(sentencepiece_dirs):
    """tokenizer.model read as convert_hf_to_gguf reads it: pieces, scores and types equal
    gguf-py's SentencePieceVocab (sentencepiece itself); added tokens follow
    tokenizer_config.json; ids past the model are [PADn]."""
    converted = sentencepiece_dirs("model_file")
    meta, d = converted.metadata, converted.directory
    reference = list(gguf.SentencePieceVocab(d).all_tokens())
    n = len(reference)
    # convert_hf_to_gguf then lays tokenizer_config.json's added tokens over the pieces:
    # control when special, score -1000 (gguf-py's SentencePieceVocab leaves that out)
    added = {0: "<unk>", 1: "<s>", 2: "</s>", n: "<|im_start|>", n + 1: "<|im_end|>",
             n + 2: "<tool>"}
    pieces = {i: (t.decode(), s, int(k)) for i, (t, s, k) in enumerate(reference)}
    for i, text in added.items():
        kind = gguf.TokenType.USER_DEFINED if text == "<tool>" else gguf.TokenType.CONTROL
        pieces[i] = (text, -1000.0, int(kind))
    ours = zip(meta[K.LIST], meta[K.SCORES], meta[K.TOKEN_TYPE])
    assert dict(enumerate(ours)) == pieces | {
        i: (f"[PAD{i}]", -10000.0, int(gguf.TokenType.UNUSED))
        for i in range(n + 3, MODEL_VOCAB)}
    assert meta[K.LIST][-1] == f"[PAD{MODEL_VOCAB - 1}]"
    assert_special_vocab_matches(meta, gguf.SpecialVocab(d, n_vocab=MODEL_VOCAB))


def test_sentencepiece_json_only_matches_gguf_py_llama_hf_vocab(sentencepiece_dirs):
    """Without tokenizer.model: tokens and types as gguf-py's LlamaHfVocab lists them;
    scores follow the merge ranks instead of its -1000 placeholder, which would make
    llama.cpp merge leftmost-first (shown here) rather than in the BPE's order."""
    converted = sentencepiece_dirs("json_only")
    meta, d = converted.metadata, converted.directory
    reference = list(gguf.LlamaHfVocab(d).all_tokens())
    n = len(reference)
    assert meta[K.LIST][:n] == [t.decode() for t, _, _ in reference]
    assert meta[K.TOKEN_TYPE][:n] == [int(k) for _, _, k in reference]
    assert set(meta[K.TOKEN_TYPE][n:]) == {gguf.TokenType.UNUSED}
    assert_special_vocab_matches(meta, gguf.SpecialVocab(d, n_vocab=MODEL_VOCAB))
    placeholder = dict(meta, **{K.SCORES: [s for _, s, _ in reference] + meta[K.SCORES][n:]})
    hf = AutoTokenizer.from_pretrained(d)
    llm = llama_cpp.Llama(str(write_vocab_gguf(d.parent / "placeholder.gguf", placeholder)),
                          vocab_only=True, verbose=False)
    assert any(llm.tokenize(t.encode(), add_bos=True, special=True) != hf.encode(t)
               for t in TEXTS)


# --- what is refused ----------------------------------------------------------------------
def test_unknown_pre_tokenizer_names_its_hash(tmp_path, corpus):
    tok = EngineTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.ByteLevel(use_regex=False)])
    tok.train_from_iterator(corpus[:200], trainers.BpeTrainer(
        vocab_size=300, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    digest = hf_vocab.check_text_hash(tok)
    with pytest.raises(LlmpressError, match=f"pre-tokenizer not recognized .*hash {digest}"):
        hf_vocab.tokenizer_metadata(tmp_path, "qwen2", 300)


def test_directory_without_tokenizer_has_no_tokenizer_keys(tmp_path):
    assert hf_vocab.tokenizer_metadata(tmp_path, "llama", 100) == {}


def test_bad_tokenizer_files_raise_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LlmpressError, match="tokenizer.json: not valid JSON"):
        hf_vocab.tokenizer_metadata(tmp_path, "llama", 100)
    (tmp_path / "tokenizer.json").write_text("[]")
    with pytest.raises(LlmpressError, match="tokenizer.json: expected a JSON object"):
        hf_vocab.tokenizer_metadata(tmp_path, "llama", 100)
    EngineTokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)).save(
        str(tmp_path / "tokenizer.json"))
    with pytest.raises(LlmpressError, match="a Unigram tokenizer without tokenizer.model"):
        hf_vocab.tokenizer_metadata(tmp_path, "llama", 100)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff")
    with pytest.raises(LlmpressError, match="tokenizer.model: not a SentencePiece model"):
        hf_vocab.tokenizer_metadata(tmp_path, "llama", 100)


