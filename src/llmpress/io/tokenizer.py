"""Tokenizers for GGUF vocabularies and Hugging Face directories, on the `tokenizers` engine.

A GGUF file carries its vocabulary as metadata; we rebuild from it the same tokenizer
llama.cpp builds (src/llama-vocab.cpp), so token ids match llama.cpp's:

- "gpt2" (byte-level BPE): text is split by the regexes llama.cpp names for the file's
  `tokenizer.ggml.pre` (llm_tokenizer_bpe), each regex splitting the pieces of the one
  before ("isolated" splits, as unicode_regex_split does), bytes are mapped to printable
  characters (GPT-2's byte encoder) and merged by the file's merge ranks.
- "llama" (SentencePiece): spaces become U+2581, a space is prepended to every text
  fragment when add_space_prefix (llama_vocab::impl::tokenize), and pieces merge by score:
  the highest-scoring adjacent pair whose concatenation is a token merges first
  (llm_tokenizer_spm_session). That is BPE whose merge ranks are the token scores, so we
  derive the merges from the scores; characters outside the vocabulary fall back to <0xNN>.

Control and user-defined tokens are matched in the text before anything else
(tokenizer_st_partition); with parse_special=False control tokens are read as plain text,
user-defined ones still match, as in llama.cpp.

Decoding does not go through the engine: every token has a fixed byte string (its piece,
llama_token_to_piece), and text is the UTF-8 decoding of the joined pieces. StreamDecoder
emits text only once its bytes form complete characters.
"""

from __future__ import annotations

import codecs
import logging
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as EngineTokenizer

from llmpress.errors import LlmpressError
from llmpress.io.chat_template import BUILTIN_TEMPLATES, render_chat
from llmpress.io.files import read_json_file, read_text_file

log = logging.getLogger(__name__)

SPACE_MARK = "\u2581"  # SentencePiece's visible space
MAX_VOCABULARY = 1 << 24  # the largest real vocabularies hold ~10^6 tokens
MAX_SPECIAL_TOKEN_CHARS = 1 << 18  # all control + user-defined tokens; Gemma 3: 75,784
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# encode(max_tokens=...): a text longer than this (and than 8 characters a token) is first
# counted slice by slice, so that a prompt far beyond the context (a chat template may
# render megabytes) never holds all its tokens at once: the engine keeps ~170 bytes each
LENGTH_CHECK_CHARS = 1 << 16

# --- pre-tokenizer regexes, copied from llm_tokenizer_bpe (llama-vocab.cpp) ----------------
# llama.cpp spells case-insensitive contractions as '[sS] instead of (?i:'s): the same
# here, so no Unicode case folding (e.g. U+017F) sneaks in.
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Upper-then-lower words: llama.cpp's std::regex form of [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*
# [\p{Ll}\p{Lm}\p{Lo}\p{M}]+, which treats every letter outside a-z as "upper" (its
# collapsed text keeps no case for non-ASCII letters), so we use that form too.
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"

PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "deepseek-llm": (
        "[\r\n]",
        "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
        "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
        "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
        "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
        "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
        "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
        "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
        "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
        "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
        "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
        "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
        "\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        "\\s+$",
        _CJK,
        r"\p{N}+",
    ),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", _GPT2),
    "gpt2": (_GPT2,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "bloom": (" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",),
    "chatglm4": (_LLAMA3,),
    "viking": (" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+", r"\p{N}"),
    "tekken": (_TEKKEN,),
    "gpt4o": (_GPT4O,),
    "seed-coder": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "bailingmoe": (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
    "minicpm5": (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


@dataclass(frozen=True)
class PreTokenizerKind:
    regexes: str  # key into PRE_TOKENIZER_REGEXES
    ignore_merges: bool = False  # a whole piece that is a token is taken as is
    add_bos: bool = False  # llama.cpp's default before tokenizer.ggml.add_bos_token
    no_bos: bool = False  # the vocabulary has no BOS unless the file names one


_LLAMA3_KIND = PreTokenizerKind("llama3", ignore_merges=True, add_bos=True)
# tokenizer.ggml.pre -> behaviour; names and groups as in llama_vocab::impl::load.
PRE_TOKENIZERS: dict[str, PreTokenizerKind] = {
    "default": PreTokenizerKind("default"),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"], _LLAMA3_KIND),
    **dict.fromkeys(["dbrx", "smaug-bpe"], PreTokenizerKind("llama3")),
    "deepseek-llm": PreTokenizerKind("deepseek-llm"),
    "deepseek-coder": PreTokenizerKind("deepseek-coder"),
    **dict.fromkeys(["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"],
                    PreTokenizerKind("deepseek-v3")),
    "falcon": PreTokenizerKind("falcon"),
    **dict.fromkeys(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b", "mellum2"], PreTokenizerKind("starcoder")),
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                     "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais",
                     "trillion", "granite-docling", "exaone4", "jina-v1-en", "jina-v2-code",
                     "roberta-bpe"], PreTokenizerKind("gpt2")),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
                     "hunyuan", "solar-open"], PreTokenizerKind("qwen2")),
    "qwen35": PreTokenizerKind("qwen35"),
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"], PreTokenizerKind("bloom")),
    "chatglm-bpe": PreTokenizerKind("chatglm4", no_bos=True),
    **dict.fromkeys(["glm4", "glm5"], PreTokenizerKind("chatglm4", ignore_merges=True,
                                                       no_bos=True)),
    "viking": PreTokenizerKind("viking"),
    "tekken": PreTokenizerKind("tekken", ignore_merges=True, add_bos=True),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
                    PreTokenizerKind("gpt4o")),
    "seed-coder": PreTokenizerKind("seed-coder"),
    "grok-2": PreTokenizerKind("qwen2"),
    **dict.fromkeys(["bailingmoe", "bailingmoe2", "llada-moe"], PreTokenizerKind("bailingmoe")),
    "minicpm5": PreTokenizerKind("minicpm5", ignore_merges=True),
}

# Tokens that end generation, found by their text (llama_vocab::impl::load keeps the
# same list, since converters rarely record them).
EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
])
# Fill-in-the-middle pad/repo/separator tokens also end generation in llama.cpp.
FIM_EOG_TEXTS = {
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (bytes_to_unicode):
    printable Latin-1 bytes map to themselves, the rest to U+0100 onwards."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(0x100 + extra)
            extra += 1
    return mapping


_BYTE_DECODER = str.maketrans({c: chr(b) for b, c in gpt2_bytes_to_unicode().items()})


def _byte_level_piece(text: str) -> bytes:
    """A byte-level BPE token's bytes (llama_decode_text); a character outside the
    256-character alphabet is kept as its own UTF-8."""
    return text.translate(_BYTE_DECODER).encode("latin-1", errors=_UTF8_ERRORS)


def _utf8_beyond_latin1(error: UnicodeEncodeError) -> tuple[bytes, int]:
    """A run of characters latin-1 cannot encode, as UTF-8: one call a run, so a hostile
    megabyte token costs its own size, not a bytes object per character (92 MiB)."""
    return error.object[error.start:error.end].encode("utf-8", "surrogatepass"), error.end


_UTF8_ERRORS = "llmpress.utf8_beyond_latin1"
codecs.register_error(_UTF8_ERRORS, _utf8_beyond_latin1)


def _sentencepiece_piece(text: str) -> bytes:
    match = BYTE_TOKEN.fullmatch(text)
    if match:
        return bytes([int(match.group(1), 16)])
    return text.replace(SPACE_MARK, " ").encode()


class Tokenizer:
    """Text <-> token ids for one model. Build with from_gguf_metadata or from_hf_dir."""

    def __init__(self, engine: EngineTokenizer, *, tokens: list[str], piece_kind: str,
                 special_ids: set[int], bos_id: int | None, eos_id: int | None,
                 eos_ids: Iterable[int], add_bos: bool, add_eos: bool,
                 strip_leading_space: bool, chat_template: str | None,
                 unused_ids: Iterable[int] = ()):
        self._engine = engine
        self._engine_lock = threading.Lock()  # encode_special_tokens is engine-wide state
        self._tokens = tokens
        self._piece_kind = piece_kind  # "byte_level" or "sentencepiece"
        self._special_ids = frozenset(special_ids)  # hidden when decoding with special=False
        self._unused_ids = frozenset(unused_ids)  # no text at all (llama_token_to_piece)
        self._pieces: list[bytes] | None = None  # built on first decode
        self._longest: int | None = None  # characters of the longest token, when needed
        self.bos_id, self.eos_id = bos_id, eos_id
        self.eos_ids = frozenset(eos_ids)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.strip_leading_space = strip_leading_space
        self.chat_template = chat_template

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer llama.cpp builds from a GGUF file's tokenizer.* keys."""
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise LlmpressError("the model has no tokenizer (metadata key tokenizer.ggml.model "
                                "is missing); use a GGUF file converted with its vocabulary")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise LlmpressError("the model's vocabulary is missing or empty (metadata key "
                                "tokenizer.ggml.tokens); reconvert the model with its tokenizer")
        # llama.cpp renames empty tokens so every text maps back to one id
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n_vocab = len(tokens)
        types = _int_list(metadata, "tokenizer.ggml.token_type", n_vocab, TokenType.NORMAL)
        if model == "gpt2":
            kind = _pre_tokenizer_kind(metadata.get("tokenizer.ggml.pre"))
            bos_default = None if kind.no_bos else 11  # llama.cpp's BPE defaults
            ids = _special_ids(metadata, n_vocab, bos=bos_default, eos=11, unk=None)
            add_bos, add_eos, add_space_prefix = kind.add_bos, False, False
        elif model == "llama":
            kind = None
            ids = _special_ids(metadata, n_vocab, bos=1, eos=2, unk=0)
            add_bos, add_eos, add_space_prefix = True, False, True
        else:
            raise LlmpressError(
                f"tokenizer model {model!r} is not supported (tokenizer.ggml.model); "
                "llmpress reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies")
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", add_eos))
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", add_space_prefix))

        # End-of-turn and FIM tokens are control tokens whatever the file says (llama.cpp
        # overrides their type too, "control-looking token").
        token_ids = {t: i for i, t in enumerate(tokens)}
        for text in EOG_TEXTS.union(*FIM_EOG_TEXTS.values()):
            if text in token_ids:
                types[token_ids[text]] = TokenType.CONTROL
        control = {i for i, t in enumerate(types)
                   if t in (TokenType.CONTROL, TokenType.UNKNOWN)}
        user_defined = {i for i, t in enumerate(types) if t == TokenType.USER_DEFINED}

        if kind is not None:
            engine = _byte_level_engine(metadata, tokens, token_ids, kind)
            piece_kind = "byte_level"
        else:
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * n_vocab
            if len(scores) < n_vocab:
                raise LlmpressError(f"tokenizer.ggml.scores has {len(scores)} entries for "
                                    f"{n_vocab} tokens; the file is corrupt")
            unk = ids["unk"]
            engine = _sentencepiece_engine(tokens, token_ids, scores, types,
                                           None if unk is None else tokens[unk], add_space_prefix)
            piece_kind = "sentencepiece"
        _add_special_tokens(engine, tokens, control, user_defined)
        return cls(engine, tokens=tokens, piece_kind=piece_kind, special_ids=control,
                   bos_id=ids["bos"], eos_id=ids["eos"],
                   eos_ids=_end_of_generation_ids(metadata, tokens, token_ids, ids["eos"]),
                   add_bos=add_bos, add_eos=add_eos,
                   strip_leading_space=kind is None and add_space_prefix,
                   chat_template=metadata.get("tokenizer.chat_template") or BUILTIN_TEMPLATES.get(
                       str(metadata.get("general.architecture"))),
                   unused_ids=[i for i, t in enumerate(types) if t == TokenType.UNUSED])

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face model directory: tokenizer.json + tokenizer_config.json, end tokens
        from generation_config.json / config.json, the chat template from
        tokenizer_config.json or chat_template.jinja."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise LlmpressError(f"{path}: no tokenizer.json (only fast-tokenizer directories "
                                "are supported; convert tokenizer.model with transformers)")
        with engine_errors(tokenizer_file):
            engine = EngineTokenizer.from_file(str(tokenizer_file))
            return cls._from_hf_engine(path, tokenizer_file, engine)

    @classmethod
    def _from_hf_engine(cls, path: Path, tokenizer_file: Path,
                        engine: EngineTokenizer) -> Tokenizer:
        config = _read_json(path / "tokenizer_config.json")
        token_ids = engine.get_vocab(with_added_tokens=True)
        n_ids = max(token_ids.values(), default=-1) + 1
        if n_ids > MAX_VOCABULARY:  # ids index a list: refuse before allocating it
            raise LlmpressError(f"{tokenizer_file}: token id {n_ids - 1} is beyond any real "
                                f"vocabulary (at most {MAX_VOCABULARY:,} ids)")
        tokens = [f"[EMPTY_{i}]" for i in range(n_ids)]
        for text, i in token_ids.items():
            tokens[i] = text
        special = {i for i, t in engine.get_added_tokens_decoder().items() if t.special}
        model_configs = [_read_json(path / "generation_config.json"),
                         _read_json(path / "config.json")]
        bos_id = _hf_token_id(config, "bos", token_ids, model_configs)
        eos_id = _hf_token_id(config, "eos", token_ids, model_configs)
        end_ids = {eos_id} if eos_id is not None else set()
        for model_config in model_configs:
            found = model_config.get("eos_token_id")
            for i in found if isinstance(found, list) else [found]:
                if isinstance(i, int) and 0 <= i < len(tokens):
                    end_ids.add(i)
        end_ids.update(token_ids[t] for t in EOG_TEXTS if token_ids.get(t) in special)

        # The engine's post-processor may add BOS/EOS itself; we add them in encode instead,
        # so when tokenizer_config.json does not say, probe what the post-processor does.
        probe = engine.encode("a", add_special_tokens=True).ids
        plain = engine.encode("a", add_special_tokens=False).ids
        add_bos = config.get("add_bos_token", bos_id is not None and probe[:1] == [bos_id]
                             and plain[:1] != [bos_id])
        add_eos = config.get("add_eos_token", eos_id is not None and probe[-1:] == [eos_id]
                             and plain[-1:] != [eos_id])
        engine.post_processor = None
        piece_kind, strip = _hf_piece_kind(engine, tokenizer_file)
        return cls(engine, tokens=tokens, piece_kind=piece_kind, special_ids=special,
                   bos_id=bos_id, eos_id=eos_id, eos_ids=end_ids,
                   add_bos=bool(add_bos), add_eos=bool(add_eos),
                   strip_leading_space=strip, chat_template=_hf_chat_template(path, config))

    def pad_to(self, n_ids: int) -> None:
        """Make every id below n_ids (the model's embedding rows) decodable: the ids beyond
        the vocabulary decode to nothing, as convert_hf_to_gguf's [PAD{i}] tokens do."""
        if n_ids > len(self._tokens):
            extra = range(len(self._tokens), n_ids)
            self._tokens = [*self._tokens, *(f"[PAD{i}]" for i in extra)]
            self._unused_ids = self._unused_ids | frozenset(extra)
            self._pieces = None

    # ---- encoding ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_token(self) -> str:
        """BOS as text, for chat templates ("" when the model has none)."""
        return "" if self.bos_id is None else self.token_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str:
        return "" if self.eos_id is None else self.token_to_piece(self.eos_id)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    **extra: Any) -> str:
        """messages rendered with this model's chat template (ChatML when it has none)."""
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token, **extra)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True,
               add_eos: bool | None = None, max_tokens: int | None = None) -> list[int]:
        """Token ids of text. add_bos/add_eos default to the model's own flags
        (tokenizer.ggml.add_bos_token). parse_special=False reads control tokens such
        as <|im_start|> as plain text (user input must not forge them). max_tokens: a
        text that surely gives more is refused (LlmpressError) before it is tokenized
        whole; one that may fit is tokenized as usual (the caller checks the count)."""
        if max_tokens is not None and len(text) > max(LENGTH_CHECK_CHARS, 8 * max_tokens):
            self._refuse_if_longer(text, max_tokens, parse_special)
        with self._engine_lock:
            self._engine.encode_special_tokens = not parse_special
            ids = self._engine.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _refuse_if_longer(self, text: str, max_tokens: int, parse_special: bool) -> None:
        """Raise when text surely gives more than max_tokens tokens, without holding all
        its tokens at once. No token covers more than the vocabulary's longest token, so a
        text that long many times over is refused outright; else it is counted in slices
        of LENGTH_CHECK_CHARS, each cut allowed to add as many tokens as the longest token
        has characters (a cut word may split into more tokens than it has whole)."""
        longest = self._longest_token()
        if len(text) > 2 * longest * max_tokens:  # 2: a normalizer may shorten the text
            raise self._too_long(max_tokens, f"{len(text):,} characters")
        count = 0
        for start in range(0, len(text), LENGTH_CHECK_CHARS):
            done = min(len(text), start + LENGTH_CHECK_CHARS)
            with self._engine_lock:
                self._engine.encode_special_tokens = not parse_special
                count += len(self._engine.encode(text[start:done], add_special_tokens=False).ids)
            cuts = done // LENGTH_CHECK_CHARS - (done == len(text))  # slice ends inside text
            if count > max_tokens + max(64, longest) * cuts:
                raise self._too_long(max_tokens, f"its first {done:,} of {len(text):,} "
                                                 f"characters give {count:,}")

    def _longest_token(self) -> int:
        if self._longest is None:
            self._longest = max(map(len, self._tokens), default=1) or 1
        return self._longest

    @staticmethod
    def _too_long(max_tokens: int, why: str) -> LlmpressError:
        return LlmpressError(f"the text is over {max_tokens:,} tokens ({why}), more than the "
                             "context holds; shorten it or raise --ctx")

    # ---- decoding ---------------------------------------------------------------------

    def _piece_table(self) -> list[bytes]:
        if self._pieces is None:
            to_bytes = (_byte_level_piece if self._piece_kind == "byte_level"
                        else _sentencepiece_piece)
            special = self._special_ids
            self._pieces = [t.encode() if i in special else to_bytes(t)
                            for i, t in enumerate(self._tokens)]
            # User-defined (added, non-special) tokens are stored as plain text too.
            for i, t in self._engine.get_added_tokens_decoder().items():
                if i < len(self._pieces):
                    self._pieces[i] = t.content.encode()
            for i in self._unused_ids:
                self._pieces[i] = b""
        return self._pieces

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes one token stands for (llama_token_to_piece). A byte-fallback token
        is a single byte, possibly part of a multi-byte character."""
        if not 0 <= token_id < len(self._tokens):
            raise LlmpressError(f"token id {token_id} is outside the vocabulary "
                                f"(0..{len(self._tokens) - 1})")
        if not special and token_id in self._special_ids:
            return b""
        return self._piece_table()[token_id]

    def token_to_piece(self, token_id: int, special: bool = True) -> str:
        """One token's text; incomplete UTF-8 shows as U+FFFD (stream with StreamDecoder)."""
        return self.token_bytes(token_id, special).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Text of ids. special=False hides control tokens (<|im_end|> ...). For
        SentencePiece vocabularies the space encode put before the text is removed."""
        ids = list(ids)
        pieces = [self.token_bytes(i, special) for i in ids]
        first = self._first_text_index(ids)
        if first is not None and pieces[first].startswith(b" "):
            pieces[first] = pieces[first][1:]
        return b"".join(pieces).decode("utf-8", errors="replace")

    def _first_text_index(self, ids: list[int]) -> int | None:
        """Where the prefix space sits: the first token, or the one after a leading BOS
        (llama.cpp's detokenize keeps the space after BOS; sentencepiece and HF drop it)."""
        if not self.strip_leading_space:
            return None
        first = 1 if ids[:1] == [self.bos_id] else 0
        return first if first < len(ids) else None

    def stream_decoder(self, special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, special)

    def __repr__(self) -> str:
        return (f"Tokenizer({self._piece_kind}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={sorted(self.eos_ids)})")


class StreamDecoder:
    """Token-at-a-time decoding that yields only complete text: bytes of a character split
    over several tokens are held back until the character is whole."""

    def __init__(self, tokenizer: Tokenizer, special: bool = True):
        self.tokenizer, self.special = tokenizer, special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # only the first two matter: where the prefix space is

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still incomplete)."""
        data = self.tokenizer.token_bytes(token_id, self.special)
        if len(self._ids) < 2:
            self._ids.append(token_id)
            if self.tokenizer._first_text_index(self._ids) == len(self._ids) - 1:
                data = data.removeprefix(b" ")
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ---- helpers --------------------------------------------------------------------------


@contextmanager
def engine_errors(where: Path | str) -> Iterator[None]:
    """The tokenizers engine reports some malformed tokenizer.json files (a post-processor
    naming a missing token) with a Rust panic, a BaseException: one clear line instead."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, LlmpressError):
        raise
    except BaseException as exc:
        detail = " ".join(str(exc).split())[:200]
        raise LlmpressError(f"{where}: the tokenizers library cannot use it "
                            f"({type(exc).__name__}: {detail})") from None


def _int_list(metadata: dict, key: str, n: int, default: int) -> list[int]:
    values = metadata.get(key)
    if values is None:
        return [int(default)] * n
    if len(values) < n:
        raise LlmpressError(f"{key} has {len(values)} entries for {n} tokens; the file is corrupt")
    return [int(v) for v in values[:n]]


def _pre_tokenizer_kind(pre: str | None) -> PreTokenizerKind:
    if not pre:  # llama.cpp warns and uses the default regexes
        log.warning("tokenizer.ggml.pre is missing: using the default pre-tokenizer; "
                    "tokenization may differ from the original model (reconvert the file)")
        return PRE_TOKENIZERS["default"]
    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:  # llama.cpp refuses these too ("unknown pre-tokenizer type")
        raise LlmpressError(
            f"unknown pre-tokenizer type {pre!r} (tokenizer.ggml.pre); supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}")
    return kind


def _special_ids(metadata: dict, n_vocab: int, **defaults: int | None) -> dict[str, int | None]:
    """bos/eos/unk ids: llama.cpp's default, replaced by the file's key when in range."""
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id"}
    ids = {}
    for name, default in defaults.items():
        value = metadata.get(f"tokenizer.ggml.{keys[name]}")
        if value is not None and 0 <= int(value) < n_vocab:
            ids[name] = int(value)
        else:
            ids[name] = default if default is not None and default < n_vocab else None
    return ids


def _end_of_generation_ids(metadata: dict, tokens: list[str], token_ids: dict[str, int],
                           eos_id: int | None) -> set[int]:
    """The set llama.cpp stops on (special_eog_ids): EOS, the EOT/EOM/FIM pad-repo-sep ids
    the file names (else found by text), and every token whose text is an end marker."""
    found: set[int] = {eos_id} if eos_id is not None else set()
    for key in ("eot", "eom", *FIM_EOG_TEXTS):
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and 0 <= int(value) < len(tokens):
            found.add(int(value))
        else:
            found.update(token_ids[t] for t in FIM_EOG_TEXTS.get(key, ()) if t in token_ids)
    found.update(token_ids[t] for t in EOG_TEXTS if t in token_ids)
    # gpt-oss / solar-open: "<|end|>" ends a message, not the generation
    present = {tokens[i] for i in found}
    if "<|end|>" in present and ({"<|return|>", "<|call|>"} <= present
                                 or {"<|calls|>", "<|flush|>"} <= present):
        found.discard(token_ids["<|end|>"])
    if "</s>" in present and ({"<|tool_response>", "<|plamo:eos|>"} & present):
        found.discard(token_ids["</s>"])
    return found


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    # A merge is "left right"; split at the first space after the first character
    # (llama_vocab::impl::load), since a token may itself be a space.
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise LlmpressError(f"tokenizer.ggml.merges entry {m!r} has no space; "
                                "the file is corrupt")
        pairs.append((m[:cut], m[cut + 1:]))
    return pairs


def _byte_level_engine(metadata: dict, tokens: list[str], token_ids: dict[str, int],
                       kind: PreTokenizerKind) -> EngineTokenizer:
    merges = metadata.get("tokenizer.ggml.merges")
    if not merges:
        raise LlmpressError("a BPE vocabulary needs tokenizer.ggml.merges, which this model "
                            "lacks; reconvert it with convert_hf_to_gguf.py")
    pairs = _split_merges(merges)
    try:
        bpe = models.BPE(token_ids, pairs, ignore_merges=kind.ignore_merges)
    except Exception:  # a merge naming unknown tokens: llama.cpp ignores such merges
        pairs = [(a, b) for a, b in pairs
                 if a in token_ids and b in token_ids and a + b in token_ids]
        bpe = models.BPE(token_ids, pairs, ignore_merges=kind.ignore_merges)
    engine = EngineTokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated")
              for r in PRE_TOKENIZER_REGEXES[kind.regexes]]
    engine.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    engine.decoder = decoders.ByteLevel()
    return engine


def _token_lengths(token_ids: dict[str, int]) -> tuple[frozenset[int], list[int]]:
    """The distinct token lengths, as a set and sorted."""
    present = frozenset(len(t) for t in token_ids)
    return present, sorted(present)


def _split_points(n: int, lengths: tuple[frozenset[int], list[int]]) -> Iterable[int]:
    """Where a token of n characters can split into two tokens: both parts must have a
    length some token has. Trying only those keeps a hostile 1 MB token from costing
    n cuts of n characters each (quadratic); a real vocabulary's lengths are few."""
    present, ordered = lengths
    if n <= len(ordered):
        return (cut for cut in range(1, n) if cut in present and n - cut in present)
    return (cut for cut in ordered if cut < n and n - cut in present)


def _sentencepiece_engine(tokens: list[str], token_ids: dict[str, int], scores: list[float],
                          types: list[int], unk_text: str | None,
                          add_space_prefix: bool) -> EngineTokenizer:
    """SentencePiece merging as BPE: merge (a, b) ranks by the score of the token a+b, so
    the engine merges pairs in the order llm_tokenizer_spm_session does."""
    lengths = _token_lengths(token_ids)
    candidates = []
    for text, i in token_ids.items():
        if types[i] == TokenType.BYTE or len(text) < 2:
            continue
        for cut in _split_points(len(text), lengths):
            left, right = text[:cut], text[cut:]
            if left in token_ids and right in token_ids:
                candidates.append((-scores[i], i, left, right))
    candidates.sort()
    bpe = models.BPE(token_ids, [(a, b) for _, _, a, b in candidates], unk_token=unk_text,
                     byte_fallback=True)
    engine = EngineTokenizer(bpe)
    steps = [normalizers.Replace(" ", SPACE_MARK)]
    if add_space_prefix:  # llama.cpp prepends it to every text fragment
        steps.insert(0, normalizers.Prepend(SPACE_MARK))
    engine.normalizer = normalizers.Sequence(steps)
    return engine


def _add_special_tokens(engine: EngineTokenizer, tokens: list[str], control: set[int],
                        user_defined: set[int]) -> None:
    """Control tokens are 'special' (skipped when parse_special=False); user-defined ones
    always match. Both match raw text, before normalization, like tokenizer_st_partition."""
    total = sum(len(tokens[i]) for i in control | user_defined)
    if total > MAX_SPECIAL_TOKEN_CHARS:  # the engine's matcher takes ~85 bytes a character
        raise LlmpressError(f"the vocabulary's control and user-defined tokens total {total:,} "
                            f"characters (the limit is {MAX_SPECIAL_TOKEN_CHARS:,}; Gemma 3's "
                            "6,414 take 75,784); the file is corrupt")
    engine.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i in sorted(control)])
    engine.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i in sorted(user_defined)])


def _hf_token_id(config: dict, name: str, token_ids: dict[str, int],
                 model_configs: list[dict]) -> int | None:
    """bos/eos id: tokenizer_config.json's token text, else the id the model configs give."""
    entry = config.get(f"{name}_token")
    text = entry.get("content") if isinstance(entry, dict) else entry
    if isinstance(text, str) and text in token_ids:
        return token_ids[text]
    for model_config in model_configs:
        found = model_config.get(f"{name}_token_id")
        found = found[0] if isinstance(found, list) and found else found
        if isinstance(found, int) and 0 <= found < len(token_ids):
            return found
    return None


def _hf_piece_kind(engine: EngineTokenizer, tokenizer_file: Path) -> tuple[str, bool]:
    """-> (how token strings map to bytes, whether decoding drops one leading space),
    read from the tokenizer.json decoder."""
    decoder = engine.decoder.__getstate__().decode() if engine.decoder is not None else "null"
    if '"ByteLevel"' in decoder:
        return "byte_level", False
    if SPACE_MARK in decoder or '"ByteFallback"' in decoder or '"Metaspace"' in decoder:
        # Llama-2 style: Strip(" ", 1, 0) or Metaspace that prepended the space
        strip = '"Strip"' in decoder or ('"Metaspace"' in decoder and '"never"' not in decoder)
        return "sentencepiece", strip
    raise LlmpressError(f"{tokenizer_file}: decoder {decoder[:80]} is not supported (llmpress "
                        "decodes byte-level BPE and SentencePiece-style vocabularies)")


def _hf_chat_template(path: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = read_text_file(jinja_file)
    return template


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json_file(path)
    return data if isinstance(data, dict) else {}
