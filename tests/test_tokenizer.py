"""Tokenizer parity: our ids against llama.cpp (llama-cpp-python, vocab only), transformers
and sentencepiece on the same vocabularies."""

from __future__ import annotations

import ctypes
import io
import json
import logging
import time
from pathlib import Path

import gguf
import llama_cpp
import pytest
import sentencepiece as spm
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as EngineTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llmpress.errors import LlmpressError
from llmpress.io.gguf import load_gguf
from llmpress.io.tokenizer import PRE_TOKENIZERS, Tokenizer

# Text that exercises the pre-tokenizers: accents, CJK, emoji, Cyrillic, contractions in
# both cases, code, digit runs after one and two spaces, tabs, CRLF, non-ASCII spaces
# (no-break, thin, ideographic, NEL) and a combining accent.
VARIED = (
    "Café naïve résumé façade. Zürich Straße. 日本語のテキスト、東京。 Привет мир. 😀🎉 ok.\n"
    "I'M here, you'LL see; it's JSON's {\"a\": [1, 2]} \t\tdef f(x):\n    return x**2  # ok\r\n"
    "x  12 y 3456789 1,234.5 -7\n\n\n   \u00a0no\u00a0break\u2009thin\u3000wide e\u0301 \u0085nel  \n"
    "   end   "
)
CHAT = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nÇa va? 你好 👋🏽"
        "<|im_end|>\n<|im_start|>assistant\n")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def quiet_llama(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def llama_tokenize(llm: llama_cpp.Llama, text: str, special: bool, add_bos: bool = False):
    return llm.tokenize(text.encode(), add_bos=add_bos, special=special)


def llama_piece(llm: llama_cpp.Llama, token: int, special: bool) -> bytes:
    """llama_token_to_piece itself (llama-cpp-python's detokenize adds its own rules)."""
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def llama_detokenize(llm: llama_cpp.Llama, ids: list[int], special: bool) -> bytes:
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    buf = ctypes.create_string_buffer(16 * len(ids) + 16)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), False, special)
    return buf.raw[:n]


def write_vocab_gguf(path: Path, meta: dict) -> Path:
    """A GGUF file holding only a vocabulary (llama.cpp loads it with vocab_only)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in meta:
        w.add_token_merges(meta["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in meta:
        w.add_token_scores(meta["tokenizer.ggml.scores"])
    for key, add in [("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unknown_token_id", w.add_unk_token_id),
                     ("add_space_prefix", w.add_add_space_prefix),
                     ("add_bos_token", w.add_add_bos_token)]:
        if f"tokenizer.ggml.{key}" in meta:
            add(meta[f"tokenizer.ggml.{key}"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- the default model: SmolLM2-135M-Instruct -----------------------------------------


@pytest.fixture(scope="module")
def smollm_meta(default_model_path) -> dict:
    return load_gguf(default_model_path).metadata


@pytest.fixture(scope="module")
def smollm(smollm_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm_meta)


@pytest.fixture(scope="module")
def smollm_llama(default_model_path) -> llama_cpp.Llama:
    return quiet_llama(default_model_path)


@pytest.fixture(scope="module")
def smollm_hf(default_model_path):
    """transformers' own GGUF tokenizer loader on the same file."""
    return AutoTokenizer.from_pretrained(str(default_model_path.parent),
                                         gguf_file=default_model_path.name)


@pytest.fixture(scope="module")
def smollm_hf_original(smollm_hf):
    """SmolLM2's tokenizer as its Hugging Face repo defines it: transformers' GGUF loader
    does not know the "smollm" pre-tokenizer and leaves out its first step (every digit
    split off, HF's Digits(individual_digits=True)); put it back as tokenizer.json has it."""
    engine = EngineTokenizer.from_str(smollm_hf.backend_tokenizer.to_str())
    engine.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return engine


@pytest.fixture(scope="module")
def wikitext_200k(wikitext_bytes) -> str:
    head = wikitext_bytes[:200_000]
    return head[:head.rindex(b"\n") + 1].decode("utf-8")  # CRLF kept as stored


def test_wikitext_matches_llama_cpp_and_transformers(smollm, smollm_llama, smollm_hf,
                                                     wikitext_200k):
    assert "\r\n" in wikitext_200k
    ids = smollm.encode(wikitext_200k)
    assert len(ids) > 40_000
    assert ids == llama_tokenize(smollm_llama, wikitext_200k, special=True)
    assert ids == smollm.encode(wikitext_200k, parse_special=False)
    assert ids == llama_tokenize(smollm_llama, wikitext_200k, special=False)
    assert ids == smollm_hf.encode(wikitext_200k, add_special_tokens=False)
    assert smollm.decode(ids) == wikitext_200k
    assert llama_detokenize(smollm_llama, ids, special=True) == wikitext_200k.encode()


@pytest.mark.parametrize("text", [VARIED, CHAT, "Hello world", " leading space", "a\r\nb\n",
                                  "x  12", "ǅ ẞ ﬁ Ω K", "🏳️‍🌈 👩‍👩‍👧", "<|im_start|><|im_end|>", ""])
def test_special_tokens_and_non_ascii_match_references(smollm, smollm_llama, smollm_hf,
                                                       smollm_hf_original, text):
    ids = smollm.encode(text)
    assert ids == llama_tokenize(smollm_llama, text, special=True)
    assert ids == smollm_hf_original.encode(text, add_special_tokens=False).ids
    if not any(c.isdigit() for c in text):  # where transformers' GGUF loader is complete
        assert ids == smollm_hf.encode(text, add_special_tokens=False)
    plain = smollm.encode(text, parse_special=False)
    assert plain == llama_tokenize(smollm_llama, text, special=False)
    assert smollm.decode(ids) == text
    assert smollm.decode(plain) == text
    assert smollm.decode(ids, special=False) == llama_detokenize(
        smollm_llama, ids, special=False).decode()


def test_chat_prompt_specials_become_single_tokens(smollm):
    ids = smollm.encode(CHAT)
    assert ids.count(smollm.encode("<|im_start|>")[0]) == 3
    assert smollm.encode("<|im_start|>") == [1]
    assert len(smollm.encode("<|im_start|>", parse_special=False)) > 1


def test_flags_and_end_tokens_match_llama_cpp(smollm, smollm_llama, smollm_meta):
    vocab = llama_cpp.llama_model_get_vocab(smollm_llama._model.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    assert smollm.vocab_size == n_vocab == 49152
    assert smollm.bos_id == llama_cpp.llama_vocab_bos(vocab)
    assert smollm.eos_id == llama_cpp.llama_vocab_eos(vocab)
    assert smollm.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    assert smollm.eos_ids == {i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    # llama.cpp's add_special follows the file's flag (off here); ours does by default
    assert smollm.encode("Hi") == llama_tokenize(smollm_llama, "Hi", special=True, add_bos=True)
    assert smollm.encode("Hi", add_bos=True) == [smollm.bos_id, *smollm.encode("Hi")]
    assert smollm.chat_template == smollm_meta["tokenizer.chat_template"]
    assert smollm.bos_token == "<|im_start|>" and smollm.eos_token == "<|im_end|>"


def test_every_token_piece_matches_llama_cpp(smollm, smollm_llama):
    for special in (True, False):
        ours = [smollm.token_bytes(i, special) for i in range(smollm.vocab_size)]
        assert ours == [llama_piece(smollm_llama, i, special) for i in range(smollm.vocab_size)]
    with pytest.raises(LlmpressError, match="outside the vocabulary"):
        smollm.token_to_piece(smollm.vocab_size)


def test_stream_decoder_yields_only_whole_characters(smollm):
    text = "日本語 😀🎉 Ça va 👋🏽 done"
    ids = smollm.encode(text)
    stream = smollm.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some character really was split over tokens
    assert "\ufffd" in smollm.token_to_piece(ids[pieces.index("")])


def test_construction_is_fast(smollm_meta):
    """Every model load builds one: < 0.5 s of CPU for a 49k vocabulary (CPU time, so
    other work on a shared machine does not count)."""
    best = min(_cpu_seconds(Tokenizer.from_gguf_metadata, smollm_meta) for _ in range(3))
    assert best < 0.5, f"building a 49k-token tokenizer took {best:.2f} s of CPU"


def _cpu_seconds(fn, *args) -> float:
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


# ---- byte-level BPE: every pre-tokenizer group against llama.cpp -----------------------


@pytest.fixture(scope="module")
def bpe_vocab(wikitext_bytes) -> dict:
    """A small byte-level BPE trained here, as GGUF metadata (convert_hf_to_gguf layout)."""
    engine = EngineTokenizer(models.BPE())
    engine.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    engine.train_from_iterator([wikitext_bytes[:60_000].decode(), VARIED * 5], trainer)
    model = json.loads(engine.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2}


def _one_name_per_group() -> list[str]:
    seen, names = set(), []
    for name, kind in PRE_TOKENIZERS.items():
        if (kind.regexes, kind.ignore_merges) not in seen:
            seen.add((kind.regexes, kind.ignore_merges))
            names.append(name)
    return names


@pytest.mark.slow
@pytest.mark.parametrize("pre", _one_name_per_group())
def test_pre_tokenizers_match_llama_cpp(bpe_vocab, wikitext_bytes, tmp_path, pre):
    meta = {**bpe_vocab, "tokenizer.ggml.pre": pre}
    ours = Tokenizer.from_gguf_metadata(meta)
    llm = quiet_llama(write_vocab_gguf(tmp_path / "v.gguf", meta))
    text = wikitext_bytes[:20_000].decode() + VARIED
    for sample in (text, CHAT):  # BOS by the file's flag on both sides (llama3 adds it)
        assert ours.encode(sample) == llama_tokenize(llm, sample, True, add_bos=True)
        assert ours.encode(sample, parse_special=False) == llama_tokenize(
            llm, sample, False, add_bos=True)
        assert ours.decode(ours.encode(sample, add_bos=False)) == sample
    assert ours.add_bos == llama_cpp.llama_vocab_get_add_bos(
        llama_cpp.llama_model_get_vocab(llm._model.model))


# Pre-tokenizers as the models' tokenizer.json files write them (the llama3 and qwen2
# regexes are the originals that llama-vocab.cpp quotes).
HF_PRE_TOKENIZERS = {
    "gpt-2": (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False),
    "smollm": (pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False),
    "llama-bpe": (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
        r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True),
    "qwen2": (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), False),
}


def _hf_tokenizer_json(vocab: dict, pre: str) -> EngineTokenizer:
    tokens = vocab["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in vocab["tokenizer.ggml.merges"]]
    pre_tokenizer, ignore_merges = HF_PRE_TOKENIZERS[pre]
    engine = EngineTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                        ignore_merges=ignore_merges))
    engine.pre_tokenizer = pre_tokenizer
    engine.decoder = decoders.ByteLevel()
    engine.add_special_tokens(SPECIALS)
    return engine


@pytest.mark.parametrize("pre", list(HF_PRE_TOKENIZERS))
def test_byte_level_matches_transformers(bpe_vocab, wikitext_bytes, tmp_path, pre):
    _hf_tokenizer_json(bpe_vocab, pre).save(str(tmp_path / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_gguf_metadata({**bpe_vocab, "tokenizer.ggml.pre": pre})
    for text in (wikitext_bytes[:20_000].decode() + VARIED, CHAT):
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_bos=False) == ids
        assert ours.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)


# ---- SentencePiece ("llama" vocabularies) -----------------------------------------------


@pytest.fixture(scope="module")
def sp_model(wikitext_bytes) -> spm.SentencePieceProcessor:
    """A BPE SentencePiece model with Llama's settings: byte fallback, digits split, no
    whitespace normalization; rare characters are left to byte fallback."""
    text = wikitext_bytes[:150_000].decode() + VARIED * 20
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=proto, model_type="bpe",
        vocab_size=2000, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=0.999,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


@pytest.fixture(scope="module")
def sp_meta(sp_model) -> dict:
    """The vocabulary as convert_hf_to_gguf's _create_vocab_sentencepiece writes it."""
    tokens, scores, types = [], [], []
    for i in range(sp_model.vocab_size()):
        tokens.append(sp_model.IdToPiece(i))
        scores.append(sp_model.GetScore(i))
        types.append(gguf.TokenType.UNKNOWN if sp_model.IsUnknown(i)
                     else gguf.TokenType.CONTROL if sp_model.IsControl(i)
                     else gguf.TokenType.UNUSED if sp_model.IsUnused(i)
                     else gguf.TokenType.BYTE if sp_model.IsByte(i)
                     else gguf.TokenType.NORMAL)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": [int(t) for t in types],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": True}


SP_SAMPLES = [VARIED, "Hello world", "  two  spaces", "line\nbreak\r\n", "日本語 😀 ǅ ẞ",
              "tab\there", "\u0b95\u0bca rare script", "x", ""]


@pytest.mark.parametrize("text", SP_SAMPLES)
def test_sentencepiece_matches_sentencepiece(sp_model, sp_meta, wikitext_bytes, text):
    ours = Tokenizer.from_gguf_metadata(sp_meta)
    assert ours.encode(text, add_bos=False) == sp_model.encode(text)
    ids = ours.encode(text)  # BOS by default, as llama.cpp for SentencePiece vocabularies
    assert ids[:1] == [1] and ids[1:] == sp_model.encode(text)
    assert ours.decode(ids, special=False) == sp_model.decode(ids) == text
    assert ours.decode(ids[1:]) == text


def test_sentencepiece_matches_llama_cpp(sp_meta, wikitext_bytes, tmp_path):
    ours = Tokenizer.from_gguf_metadata(sp_meta)
    llm = quiet_llama(write_vocab_gguf(tmp_path / "sp.gguf", sp_meta))
    long_text = wikitext_bytes[:30_000].decode()
    assert "\u0b95" not in long_text  # the rare script below goes to byte fallback
    for text in [long_text, *SP_SAMPLES, "<s>user</s> hi<s>", "a</s>b"]:
        assert ours.encode(text) == llama_tokenize(llm, text, special=True, add_bos=True)
        assert ours.encode(text, parse_special=False, add_bos=False) == llama_tokenize(
            llm, text, special=False)
        no_bos = ours.encode(text, add_bos=False, parse_special=False)
        assert ours.decode(no_bos) == llama_detokenize(llm, no_bos, special=True).decode()


def test_sentencepiece_stream_drops_the_prefix_space(sp_meta):
    ours = Tokenizer.from_gguf_metadata(sp_meta)
    for text in ("Hello 日本語 😀 world", " leading", "\u0b95\u0bca"):
        for ids in (ours.encode(text), ours.encode(text, add_bos=False)):
            stream = ours.stream_decoder(special=False)
            pieces = [stream.push(i) for i in ids]
            assert "".join(pieces) + stream.flush() == ours.decode(ids, special=False) == text
            assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_user_defined_and_unused_tokens_match_llama_cpp(bpe_vocab, sp_meta, tmp_path, kind):
    """convert_hf_to_gguf marks added non-special tokens USER_DEFINED and pads the vocabulary
    with UNUSED [PADn] tokens; llama.cpp matches user-defined tokens even when
    parse_special=False and gives unused ones no text."""
    meta = {**bpe_vocab, "tokenizer.ggml.pre": "llama-bpe"} if kind == "gpt2" else dict(sp_meta)
    extra = ["<tool>", "<my sep>", "[PAD0]", "[PAD1]"]
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], *extra]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"],
                                         *[int(gguf.TokenType.USER_DEFINED)] * 2,
                                         *[int(gguf.TokenType.UNUSED)] * 2]
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] = [*meta["tokenizer.ggml.scores"], -1000.0, -1000.0,
                                         -10000.0, -10000.0]
    ours = Tokenizer.from_gguf_metadata(meta)
    llm = quiet_llama(write_vocab_gguf(tmp_path / "v.gguf", meta))
    for text in ["a<tool>b <my sep> c", "<|im_start|><tool><|im_end|>", "[PAD0] x " + VARIED]:
        for special in (True, False):
            assert ours.encode(text, parse_special=special, add_bos=False) == llama_tokenize(
                llm, text, special=special)
    n = ours.vocab_size
    for special in (True, False):
        assert [ours.token_bytes(i, special) for i in range(n - 6, n)] == [
            llama_piece(llm, i, special) for i in range(n - 6, n)]


# ---- Hugging Face directories ------------------------------------------------------------


def test_from_hf_dir_matches_transformers(bpe_vocab, tmp_path):
    engine = _hf_tokenizer_json(bpe_vocab, "llama-bpe")
    # BOS comes from the post-processor, as in Llama 3's tokenizer.json
    engine.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    engine.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n" \
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_hf_dir(tmp_path)
    assert ours.bos_id == hf.bos_token_id and ours.eos_id == hf.eos_token_id
    assert ours.eos_ids == {0, 2}
    assert ours.chat_template == hf.chat_template == template
    for text in (VARIED, CHAT):
        ids = hf.encode(text)  # with BOS, from the post-processor
        assert ids[0] == hf.bos_token_id
        assert ours.encode(text) == ids
        assert ours.decode(ids, special=False) == hf.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.chat_prompt(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_from_hf_dir_sentencepiece_style(sp_model, tmp_path):
    """A tokenizer.json in Llama-2 style (Metaspace, byte fallback): the engine runs the
    file; our decoding must agree with transformers'."""
    from transformers import LlamaTokenizer
    spm_file = tmp_path / "tokenizer.model"
    spm_file.write_bytes(sp_model.serialized_model_proto())
    LlamaTokenizer(vocab_file=str(spm_file), legacy=False).save_pretrained(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = Tokenizer.from_hf_dir(tmp_path / "hf")
    for text in ("Hello world", VARIED, "日本語 😀"):
        ids = hf.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids, special=False) == hf.decode(ids, skip_special_tokens=True)


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.tokens": None}, "vocabulary is missing"),
    ({"tokenizer.ggml.tokens": []}, "vocabulary is missing"),
    ({"tokenizer.ggml.model": None}, "has no tokenizer"),
    ({"tokenizer.ggml.model": "bert"}, "tokenizer model 'bert' is not supported"),
    ({"tokenizer.ggml.pre": "no-such-pre"}, "unknown pre-tokenizer type 'no-such-pre'"),
    ({"tokenizer.ggml.merges": None}, "needs tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": ["nospace"]}, "has no space"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries"),
])
def test_bad_metadata_is_one_clear_error(bpe_vocab, change, message):
    meta = {k: v for k, v in {**bpe_vocab, "tokenizer.ggml.pre": "gpt-2", **change}.items()
            if v is not None}
    with pytest.raises(LlmpressError, match=message) as info:
        Tokenizer.from_gguf_metadata(meta)
    assert "\n" not in str(info.value)


def test_unknown_pre_type_is_refused_by_llama_cpp_too(bpe_vocab, tmp_path):
    path = write_vocab_gguf(tmp_path / "bad.gguf", {**bpe_vocab, "tokenizer.ggml.pre": "nope"})
    with pytest.raises(ValueError):
        quiet_llama(path)


def test_missing_pre_type_warns_and_uses_default_like_llama_cpp(bpe_vocab, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llmpress.io.tokenizer"):
        ours = Tokenizer.from_gguf_metadata(bpe_vocab)
    assert "tokenizer.ggml.pre is missing" in caplog.text
    llm = quiet_llama(write_vocab_gguf(tmp_path / "nopre.gguf", bpe_vocab))
    assert ours.encode(VARIED) == llama_tokenize(llm, VARIED, special=True)


def test_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(LlmpressError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
