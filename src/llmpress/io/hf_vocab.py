"""A Hugging Face directory's tokenizer as GGUF metadata: the tokenizer.* keys that
convert_hf_to_gguf.py writes, so llama.cpp loads the converted file and tokenizes as the
original tokenizer does.

Which vocabulary is written follows convert_hf_to_gguf (conversion/llama.py and qwen.py
set_vocab, conversion/base.py):

- tokenizer.model present: SentencePiece ("llama"): pieces, scores and types read from the
  model file (_create_vocab_sentencepiece), added tokens from added_tokens.json and
  tokenizer_config.json.
- Llama-family tokenizer.json of SentencePiece style (BPE with byte_fallback, a Sequence
  decoder): "llama" as gguf-py's LlamaHfVocab lists it, except for the scores (see
  llama_hf_vocab).
- any other tokenizer.json: byte-level BPE ("gpt2", get_vocab_base): every id of the
  model's vocabulary, added tokens typed control or user-defined, merges, and the
  pre-tokenizer name found from a hash of how the tokenizer splits a check text
  (get_vocab_base_pre).

Special token ids, add_bos/add_eos flags and the chat template follow gguf-py's
SpecialVocab rules (tokenizer.json post-processor, tokenizer_config.json, config.json).
No transformers: the `tokenizers` engine loads tokenizer.json, as transformers' fast
tokenizers do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path
from typing import Any

from gguf import Keys, TokenType
from tokenizers import Tokenizer as EngineTokenizer

from llmpress.errors import LlmpressError
from llmpress.io.files import read_json_file, read_text_file
from llmpress.io.tokenizer import PRE_TOKENIZERS

log = logging.getLogger(__name__)

K = Keys.Tokenizer
NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"  # newer gguf-py constants
NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"
SPACE_MARK = "\u2581"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
PAD_TOKEN = "[PAD{}]"  # convert_hf_to_gguf's name for ids no token has
ADDED_TOKEN_SCORE = -1000.0  # what convert gives added (and LlamaHfVocab's) tokens
UNUSED_PIECE_SCORE = -10000.0  # what convert gives ids the SentencePiece model lacks

# --- pre-tokenizer detection (get_vocab_base_pre) ---------------------------------------
# convert_hf_to_gguf encodes this text (special tokens added) and hashes str(ids): the hash
# names the pre-tokenizer and, since ids depend on it, the vocabulary it was measured on.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d"
    "\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333"
    " 33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796"
    "\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c"
    "1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b"
    "\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been "
    "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# Check-text hash -> tokenizer.ggml.pre, from convert_hf_to_gguf's table: the entries whose
# pre-tokenizer llmpress's own tokenizer reads (llmpress.io.tokenizer.PRE_TOKENIZERS), with
# the model each hash was measured on. Where two entries share a hash the later one wins,
# as in convert's chain of ifs.
KNOWN_PRE_TOKENIZER_HASHES = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",  # THUDM/glm-4-9b-hf
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",  # core42/jais-13b
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",  # bigscience/bloom
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # microsoft/phi-2
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Xenova/gpt-4o
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",  # Llama-4-Scout
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",  # skt/A.X-4.0
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
}  # fmt: skip

# A vocabulary retrained with a known family's pre-tokenizer has a hash of its own, which
# convert_hf_to_gguf refuses. Its tokenizer.json still says how it splits text; where that
# is exactly one of these definitions, llama.cpp's pre-tokenizer of that name splits the
# same way. Steps as _pre_tokenizer_steps lists them.
HF_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
HF_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_WITH_REGEX = ("ByteLevel", False, True)  # (add_prefix_space, use_regex)
_BYTE_LEVEL_ONLY = ("ByteLevel", False, False)
PRE_TOKENIZER_DEFINITIONS: dict[tuple, str] = {
    (_BYTE_LEVEL_WITH_REGEX,): "gpt-2",
    (("Digits", True), _BYTE_LEVEL_WITH_REGEX): "smollm",
    (("Split", HF_LLAMA3_SPLIT, "Isolated", False), _BYTE_LEVEL_ONLY): "llama-bpe",
    (("Split", HF_QWEN2_SPLIT, "Isolated", False), _BYTE_LEVEL_ONLY): "qwen2",
}
# Normalizers llama.cpp does without for these names (Qwen2's NFC: llama.cpp skips it).
ALLOWED_NORMALIZERS = {"gpt-2": (None,), "smollm": (None,), "llama-bpe": (None,),
                       "qwen2": (None, "NFC")}


# --- the entry point ---------------------------------------------------------------------
def tokenizer_metadata(path: str | Path, arch: str, vocab_size: int) -> dict[str, Any]:
    """The tokenizer.* GGUF keys convert_hf_to_gguf writes for the directory `path` holding
    an `arch` model ("llama", "qwen2", "qwen3") with `vocab_size` embedding rows; {} when
    the directory has no tokenizer.json nor tokenizer.model."""
    path = Path(path)
    tokenizer_json = _read_json(path / "tokenizer.json")
    config = _read_json(path / "tokenizer_config.json")
    if tokenizer_json is not None and not isinstance(tokenizer_json.get("model"), dict):
        raise LlmpressError(f"{path / 'tokenizer.json'}: not a tokenizers file (no model)")
    metadata: dict[str, Any] = {}
    if arch == "llama" and config and isinstance(config.get("add_prefix_space"), bool):
        # LlamaModel.set_vocab writes it first
        metadata[K.ADD_PREFIX] = config["add_prefix_space"]
    if (path / "tokenizer.model").is_file():
        vocab = sentencepiece_vocab(path, vocab_size, config)
        n_vocab, load_merges = len(vocab[K.LIST]), False
    elif tokenizer_json is None:
        log.warning("%s: no tokenizer.json nor tokenizer.model; a GGUF converted from it has "
                    "no vocabulary, and llama.cpp will not load it", path)
        return {}
    elif (kind := tokenizer_json["model"].get("type")) != "BPE":
        raise LlmpressError(f"{path / 'tokenizer.json'}: a {kind} tokenizer without "
                            "tokenizer.model; llmpress converts BPE tokenizers (byte-level, "
                            "SentencePiece-style) and SentencePiece models")
    elif arch == "llama" and is_llama_hf_tokenizer(tokenizer_json):
        vocab = llama_hf_vocab(path, tokenizer_json, config, vocab_size)
        n_vocab, load_merges = len(vocab[K.LIST]), False
    else:
        vocab = byte_level_vocab(path, tokenizer_json, vocab_size)
        n_vocab, load_merges = None, True
    metadata |= vocab
    metadata |= special_vocab(path, tokenizer_json, config, n_vocab, load_merges)
    if load_merges and K.MERGES not in metadata:
        raise LlmpressError(f"{path / 'tokenizer.json'}: a byte-level BPE tokenizer without "
                            "merges (model.merges or merges.txt); llama.cpp cannot load it")
    return metadata


# --- byte-level BPE: _set_vocab_gpt2 / get_vocab_base -------------------------------------
def byte_level_vocab(path: Path, tokenizer_json: dict, vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.model "gpt2", pre, tokens and token types (merges come with the
    special vocabulary), as get_vocab_base lists them."""
    where = path / "tokenizer.json"
    engine = _load_engine(where)
    vocab = engine.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise LlmpressError(f"{where}: token id {max(vocab.values())} is outside config.json's "
                            f"vocab_size {vocab_size}")
    pre = pre_tokenizer_name(engine, tokenizer_json, where)
    by_id = {i: text for text, i in vocab.items()}
    added = engine.get_added_tokens_decoder()  # id -> AddedToken
    added_texts = {token.content for token in added.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(PAD_TOKEN.format(i))
            types.append(TokenType.UNUSED)
            continue
        kind = TokenType.NORMAL
        if text in added_texts:
            token = added.get(i)
            if token is not None and not token.normalized:
                # llama.cpp expects control/user-defined tokens already normalized
                text = engine.decode(engine.encode(text, add_special_tokens=False).ids,
                                     skip_special_tokens=False)
            if (token is not None and token.special) or does_token_look_special(text):
                kind = TokenType.CONTROL
            else:
                kind = TokenType.USER_DEFINED
                text = text.replace(SPACE_MARK, " ")  # pre-normalized user-defined spaces
        tokens.append(text)
        types.append(kind)
    return {K.MODEL: "gpt2", K.PRE: pre, K.LIST: tokens, K.TOKEN_TYPE: [int(t) for t in types]}


def does_token_look_special(text: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens some models forgot to mark
    special (<|...|>, <pad>, <mask>, gemma's <unusedN>) are control tokens anyway."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def check_text_hash(engine: EngineTokenizer) -> str:
    """sha256 of str(ids) of CHECK_TEXT, special tokens added (get_vocab_base_pre)."""
    ids = engine.encode(CHECK_TEXT).ids
    return hashlib.sha256(str(ids).encode()).hexdigest()


def pre_tokenizer_name(engine: EngineTokenizer, tokenizer_json: dict, where: Path) -> str:
    """tokenizer.ggml.pre: the name convert_hf_to_gguf's hash table gives, else the name of
    the known pre-tokenizer tokenizer.json defines exactly; else a clear error."""
    digest = check_text_hash(engine)
    if digest in KNOWN_PRE_TOKENIZER_HASHES:
        return KNOWN_PRE_TOKENIZER_HASHES[digest]
    name = PRE_TOKENIZER_DEFINITIONS.get(_pre_tokenizer_steps(tokenizer_json))
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    ignore_merges = bool(tokenizer_json.get("model", {}).get("ignore_merges", False))
    if (name is not None and normalizer in ALLOWED_NORMALIZERS[name]
            and ignore_merges == PRE_TOKENIZERS[name].ignore_merges):
        return name
    known = ", ".join(sorted(set(PRE_TOKENIZER_DEFINITIONS.values())))
    raise LlmpressError(
        f"{where}: BPE pre-tokenizer not recognized (check-text hash {digest}, as "
        "convert_hf_to_gguf's get_vocab_base_pre computes it); llmpress converts the "
        f"tokenizers convert_hf_to_gguf knows and retrained ones with the {known} "
        "pre-tokenizer")


def _pre_tokenizer_steps(tokenizer_json: dict) -> tuple:
    """The pre-tokenizer as comparable steps: what each does to text, not offsets."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    listed = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            listed.append((kind, pattern.get("Regex", pattern.get("String")),
                           step.get("behavior"), bool(step.get("invert"))))
        elif kind == "ByteLevel":
            listed.append((kind, bool(step.get("add_prefix_space")),
                           bool(step.get("use_regex", True))))
        elif kind == "Digits":
            listed.append((kind, bool(step.get("individual_digits"))))
        else:
            listed.append((kind, json.dumps(step, sort_keys=True)))
    return tuple(listed)


# --- SentencePiece-style tokenizer.json: _set_vocab_llama_hf / gguf-py LlamaHfVocab ------
def is_llama_hf_tokenizer(tokenizer_json: dict) -> bool:
    """LlamaHfVocab's test: BPE with byte fallback and a Sequence decoder (Llama 2 style);
    Llama 3 (ignore_merges, no byte fallback) and others go the byte-level way."""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback", False))
            and decoder.get("type") == "Sequence")


def llama_hf_vocab(path: Path, tokenizer_json: dict, config: dict | None,
                   vocab_size: int) -> dict[str, Any]:
    """"llama" vocabulary from tokenizer.json alone, listed as gguf-py's LlamaHfVocab does:
    base ids in order (<0xNN> byte tokens BYTE, the named special tokens CONTROL), then
    added tokens past the base vocabulary (CONTROL if named special, else USER_DEFINED).

    One deliberate difference, the scores: LlamaHfVocab gives every token the placeholder
    -1000. llama.cpp's SentencePiece tokenizer merges the best-scoring adjacent pair first
    (llm_tokenizer_spm_session); with all scores equal it merges leftmost-first and splits
    words unlike the BPE. We score each token by the rank of the first merge that makes
    it (-rank), so llama.cpp merges in the BPE's order; normal tokens no merge makes
    score below every merge, the rest (bytes, control, added) keep the placeholder."""
    where = path / "tokenizer.json"
    engine = _load_engine(where)
    vocab = engine.get_vocab(with_added_tokens=True)
    by_id = {i: text for text, i in vocab.items()}
    n_base = engine.get_vocab_size(with_added_tokens=False)
    special_texts = _named_special_tokens(config)
    special_ids = {vocab[t] for t in special_texts if t in vocab}
    merges = tokenizer_json["model"].get("merges") or []
    merge_scores = _merge_rank_scores(merges)
    tokens, scores, types = [], [], []
    for i in range(n_base):
        if i not in by_id:
            raise LlmpressError(f"{where}: the vocabulary has no token with id {i}")
        text = by_id[i]
        tokens.append(text)
        if BYTE_TOKEN.fullmatch(text):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.CONTROL if i in special_ids else TokenType.NORMAL)
        scores.append(merge_scores.get(text, -float(len(merges)))
                      if types[-1] == TokenType.NORMAL else ADDED_TOKEN_SCORE)
    for i, token in sorted(engine.get_added_tokens_decoder().items()):
        if i < n_base:
            continue
        tokens.append(token.content)
        scores.append(ADDED_TOKEN_SCORE)
        types.append(TokenType.CONTROL if token.content in special_texts
                     else TokenType.USER_DEFINED)
    _pad_vocabulary(tokens, scores, types, vocab_size, where)
    return {K.MODEL: "llama", K.PRE: "default", K.LIST: tokens, K.SCORES: scores,
            K.TOKEN_TYPE: [int(t) for t in types]}


def _named_special_tokens(config: dict | None) -> set[str]:
    """transformers' all_special_tokens: the named special tokens of tokenizer_config.json
    and its additional (extra) special tokens."""
    if not config:
        return set()
    entries = [config.get(f"{name}_token") for name in
               ("bos", "eos", "unk", "sep", "pad", "cls", "mask")]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key)
        entries.extend(extra if isinstance(extra, list) else [])
    texts = {e.get("content") if isinstance(e, dict) else e for e in entries}
    return {t for t in texts if isinstance(t, str)}


def _merge_rank_scores(merges: list) -> dict[str, float]:
    """token -> -(rank of the first merge that makes it)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        pair = merge if isinstance(merge, list) else str(merge).split(" ", 1)
        if len(pair) == 2:
            scores.setdefault(pair[0] + pair[1], -float(rank))
    return scores


def _pad_vocabulary(tokens: list[str], scores: list[float], types: list[int], vocab_size: int,
                    where: Path) -> None:
    """Embedding rows past the tokenizer's last id get UNUSED [PADn] tokens, as convert's
    SentencePiece path pads, so llama.cpp's vocabulary matches token_embd."""
    if len(tokens) > vocab_size:
        raise LlmpressError(f"{where}: {len(tokens)} tokens, but config.json's vocab_size is "
                            f"{vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(PAD_TOKEN.format(i))
        scores.append(ADDED_TOKEN_SCORE)
        types.append(TokenType.UNUSED)


# --- tokenizer.model: _set_vocab_sentencepiece ------------------------------------------
def sentencepiece_vocab(path: Path, vocab_size: int, config: dict | None) -> dict[str, Any]:
    """"llama" vocabulary from tokenizer.model, as _create_vocab_sentencepiece lists it."""
    model_file = path / "tokenizer.model"
    pieces = read_sentencepiece_pieces(model_file)
    tokens = [PAD_TOKEN.format(i) for i in range(vocab_size)]
    scores = [UNUSED_PIECE_SCORE] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    if len(pieces) > vocab_size:
        log.warning("%s: ignoring pieces from id %d on: config.json's vocab_size is %d",
                    model_file, vocab_size, vocab_size)
    for i, (piece, score, kind) in enumerate(pieces[:vocab_size]):
        tokens[i], scores[i], types[i] = piece, score, int(_sentencepiece_token_type(kind))
    added = _read_json(path / "added_tokens.json")
    for text, i in (added or {}).items():
        if isinstance(i, int) and 0 <= i < vocab_size:
            tokens[i], scores[i], types[i] = text, ADDED_TOKEN_SCORE, int(TokenType.USER_DEFINED)
    decoder = (config or {}).get("added_tokens_decoder") or {}
    for key, entry in decoder.items():
        if not str(key).isdigit() or not isinstance(entry, dict):
            raise LlmpressError(f"{path / 'tokenizer_config.json'}: added_tokens_decoder entry "
                                f"{key!r} is not an id with a token")
        i, text = int(key), str(entry.get("content", ""))
        if i >= vocab_size:
            continue
        if entry.get("special") or does_token_look_special(text):
            types[i] = int(TokenType.CONTROL)
        else:
            text = text.replace(SPACE_MARK, " ")
            types[i] = int(TokenType.USER_DEFINED)
        tokens[i], scores[i] = text, ADDED_TOKEN_SCORE
    return {K.MODEL: "llama", K.PRE: "default", K.LIST: tokens, K.SCORES: scores,
            K.TOKEN_TYPE: types}


def _sentencepiece_token_type(kind: int) -> TokenType:
    """convert's order of SentencePieceProcessor tests: unknown, control, unused, byte;
    everything else (user-defined pieces too) is NORMAL."""
    return {2: TokenType.UNKNOWN, 3: TokenType.CONTROL, 5: TokenType.UNUSED,
            6: TokenType.BYTE}.get(kind, TokenType.NORMAL)


def read_sentencepiece_pieces(model_file: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a SentencePiece ModelProto.

    sentencepiece_model.proto: ModelProto field 1 is the repeated SentencePiece message,
    whose fields are 1 piece (string), 2 score (float) and 3 type (enum; 1 = NORMAL by
    default, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE).
    """
    try:
        data = model_file.read_bytes()
        pieces = []
        for field, value in _protobuf_fields(data):
            if field != 1:
                continue
            piece, score, kind = "", 0.0, 1
            for sub, sub_value in _protobuf_fields(value):
                if sub == 1:
                    piece = sub_value.decode("utf-8")
                elif sub == 2:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3:
                    kind = sub_value
            pieces.append((piece, score, kind))
    except (ValueError, struct.error, AttributeError, TypeError) as exc:
        raise LlmpressError(f"{model_file}: not a SentencePiece model ({exc})") from None
    if not pieces:
        raise LlmpressError(f"{model_file}: not a SentencePiece model (no pieces)")
    return pieces


def _protobuf_fields(data: bytes):
    """(field number, value) of a protobuf message: varints as int, 32/64-bit values and
    length-delimited ones as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"wire type {wire} at byte {pos}")
        if pos > len(data):
            raise ValueError("truncated")
        yield field, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


# --- special tokens, flags, merges, chat template: gguf-py SpecialVocab ------------------
SPECIAL_TOKEN_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# GGUFWriter has no add_cls_token_id, so SpecialVocab.add_to_gguf skips cls.
SPECIAL_ID_KEYS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "sep": K.SEP_ID,
                   "pad": K.PAD_ID, "mask": K.MASK_ID, "eot": K.EOT_ID, "eom": K.EOM_ID}
ADD_FLAG_KEYS = {"bos": K.ADD_BOS, "eos": K.ADD_EOS, "sep": K.ADD_SEP}


class _SpecialTokens:
    """What SpecialVocab gathers, in the order it gathers it (that order is kept in the
    file: first id set for a type wins)."""

    def __init__(self, n_vocab: int | None):
        self.n_vocab = n_vocab
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.types: tuple[str, ...] = SPECIAL_TOKEN_TYPES

    def set_id(self, typ: str, token_id: Any) -> None:
        if not isinstance(token_id, int):
            return
        if token_id < 0:
            raise LlmpressError(f"special token {typ} has the negative id {token_id}")
        if self.n_vocab is None or token_id < self.n_vocab:
            self.ids.setdefault(typ, token_id)
        else:
            log.warning("special token %s id %d is outside the vocabulary of %d; skipped",
                        typ, token_id, self.n_vocab)


def special_vocab(path: Path, tokenizer_json: dict | None, config: dict | None,
                  n_vocab: int | None, load_merges: bool) -> dict[str, Any]:
    """Merges, special token ids, add_* flags, chat template and normalizer flags, as
    gguf-py's SpecialVocab(path, load_merges, n_vocab=...).add_to_gguf writes them."""
    special = _SpecialTokens(n_vocab)
    config = dict(config) if config is not None else None  # edited below, as gguf-py
    merges: list[str] = []
    lowercase = strip_accents = None
    added_tokens: list = []
    if tokenizer_json is not None:
        if load_merges:
            merges = _merges_as_strings(tokenizer_json.get("model", {}).get("merges"), path)
        if normalizer := tokenizer_json.get("normalizer"):
            lowercase, strip_accents = _normalizer_flags(normalizer)
        added_tokens = tokenizer_json.get("added_tokens") or []
        if post_processor := tokenizer_json.get("post_processor"):
            _read_post_processor(post_processor, config, special)
    chat_template = None
    if config:
        chat_template = config.get("chat_template", _chat_template_files(path))
        if chat_template is not None and not isinstance(chat_template, (str, list)):
            log.warning("%s: chat_template is neither text nor a list; ignored", path)
            chat_template = None
        for typ in special.types:
            flag = config.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                special.add.setdefault(typ, flag)  # the post-processor's word wins
            entry = config.get(f"{typ}_token")
            text = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(text, str):
                found = next((t.get("id") for t in added_tokens if t.get("content") == text),
                             None)
                special.set_id(typ, found)
    model_config = _read_json(path / "config.json")
    if model_config is not None:
        for typ in special.types:
            token_id = model_config.get(f"{typ}_token_id")
            if token_id is None and isinstance(model_config.get("text_config"), dict):
                token_id = model_config["text_config"].get(f"{typ}_token_id")
            special.set_id(typ, token_id)
    if load_merges and not merges:
        merges = _merges_txt(path / "merges.txt")

    metadata: dict[str, Any] = {}
    if merges:
        metadata[K.MERGES] = merges
    metadata |= {SPECIAL_ID_KEYS[t]: i for t, i in special.ids.items() if t in SPECIAL_ID_KEYS}
    metadata |= {ADD_FLAG_KEYS[t]: v for t, v in special.add.items() if t in ADD_FLAG_KEYS}
    if chat_template is not None:
        metadata |= _chat_template_keys(chat_template)
    if lowercase is not None:
        metadata[NORMALIZER_LOWERCASE] = lowercase
    if strip_accents is not None:
        metadata[NORMALIZER_STRIP_ACCENTS] = strip_accents
    return metadata


def _read_post_processor(post_processor: dict, config: dict | None,
                         special: _SpecialTokens) -> None:
    """SpecialVocab's reading of the tokenizer.json post-processor: which tokens it adds
    decides add_bos/add_eos/add_sep, and may name bos/eos/cls/sep (config is edited)."""
    cfg = config or {}
    bos, cls, eos, sep = (cfg.get(f"{t}_token") for t in ("bos", "cls", "eos", "sep"))
    if not bos and cls and config:
        config["bos_token"] = bos = cls
    if not eos and sep and config:
        config["eos_token"] = eos = sep
    for processor in post_processor.get("processors", [post_processor]):
        kind = processor.get("type")
        if kind == "ByteLevel":
            special.add.setdefault("bos", False)
            special.add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            special.add.update(bos=True, eos=True, sep=True)
            if not cls and config:
                config["cls_token"] = cls = processor.get("cls", [bos])[0]
            if not sep and config:
                config["sep_token"] = sep = processor.get("sep", [eos])[0]
        elif kind == "TemplateProcessing":
            bos, cls, eos, sep = _read_template(processor, config, special, bos, cls, eos, sep)


def _read_template(processor: dict, config: dict | None, special: _SpecialTokens,
                   bos: Any, cls: Any, eos: Any, sep: Any) -> tuple[Any, Any, Any, Any]:
    """A TemplateProcessing: a special token leading the single template means add_bos,
    one trailing it add_eos, one between A and B in the pair template add_sep."""
    single, pair = processor.get("single", []), processor.get("pair", [])
    first = last = None
    if len(single) > 1:
        if first := single[0].get("SpecialToken", {}).get("id"):
            if not config:
                bos = first
            elif first not in (bos, cls):
                if not bos:
                    config["bos_token"] = bos = first
                if not cls:
                    config["cls_token"] = cls = first
            special.add["bos"] = first in (bos, cls)
        if last := single[-1].get("SpecialToken", {}).get("id"):
            if not config:
                eos = last
            elif last != eos:
                for extra in ("eot", "eom"):  # the old EOS stays, as end of turn/message
                    if extra not in special.types:
                        special.types = (*special.types, extra)
                        config[f"{extra}_token"] = eos
                        break
                config["eos_token"] = eos = last
            special.add["eos"] = last == eos
    if pair:
        start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
        stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
        middle = pair[start:stop]
        if (middle and middle[0].get("Sequence", {}).get("id") == "A"
                and middle[-1].get("Sequence", {}).get("id") == "B" and middle[1:-1]):
            between = middle[1:-1]
            add_sep = False
            entry = between[0].get("SpecialToken", {}).get("id")
            if entry and entry in (sep, eos) and not last:
                add_sep = True
            if len(between) == 2:
                entry = between[1].get("SpecialToken", {}).get("id")
                if entry and entry in (sep, eos):
                    add_sep = True
            special.add["sep"] = add_sep
            if add_sep and not sep and config:
                config["sep_token"] = eos
    return bos, cls, eos, sep


def _merges_as_strings(merges: Any, path: Path) -> list[str]:
    """tokenizer.json merges as "left right" strings; pairs (transformers >= 4.45) with a
    space inside a part have it written as U+0120 (' ' + 256), as SpecialVocab does."""
    if not isinstance(merges, list) or not merges:
        return []
    if isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part)
                         for part in pair) for pair in merges]
    raise LlmpressError(f"{path / 'tokenizer.json'}: merges in an unknown format")


def _merges_txt(merges_file: Path) -> list[str]:
    if not merges_file.is_file():
        return []
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].strip().startswith("#"):
        lines = lines[1:]
    merges = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2:
            merges.append(f"{parts[0]} {parts[1]}")
    return merges


def _normalizer_flags(normalizer: dict) -> tuple[bool | None, bool | None]:
    """(lowercase, strip_accents) from Lowercase / StripAccents / BertNormalizer steps."""
    lowercase = strip_accents = None
    kind = normalizer.get("type")
    if kind == "Lowercase":
        lowercase = True
    elif kind == "StripAccents":
        strip_accents = True
    elif kind == "BertNormalizer":
        lowercase = normalizer.get("lowercase", lowercase)
        strip_accents = normalizer.get("strip_accents", strip_accents)
    elif kind == "Sequence":
        for step in normalizer.get("normalizers", []):
            low, strip = _normalizer_flags(step)
            lowercase = low if low is not None else lowercase
            strip_accents = strip if strip is not None else strip_accents
    return lowercase, strip_accents


def _chat_template_files(path: Path) -> str | list | None:
    """chat_template.jinja (with additional_chat_templates/*.jinja: a named list), else
    chat_template.json's chat_template."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        template = read_text_file(jinja)
        extra = sorted((path / "additional_chat_templates").glob("*.jinja"))
        if not extra:
            return template
        return [{"name": "default", "template": template},
                *({"name": f.stem, "template": read_text_file(f)} for f in extra)]
    data = _read_json(path / "chat_template.json")
    return data.get("chat_template") if data else None


def _chat_template_keys(template: str | list) -> dict[str, Any]:
    """GGUFWriter.add_chat_template: a list of named templates becomes
    tokenizer.chat_template.<name> keys plus tokenizer.chat_templates; "default" is the
    plain tokenizer.chat_template."""
    if isinstance(template, str):
        return {K.CHAT_TEMPLATE: template}
    keys: dict[str, Any] = {}
    names, default = [], None
    for choice in template:
        name = re.sub(r"[^A-Za-z0-9]", "_", str(choice.get("name", "")))
        text = choice.get("template")
        if not name or text is None:
            continue
        if name == "default":
            default = text
        else:
            names.append(name)
            keys[K.CHAT_TEMPLATE_N.format(name=name)] = text
    if names:
        keys[K.CHAT_TEMPLATES] = sorted(set(names))
    if default is not None:
        keys[K.CHAT_TEMPLATE] = default
    return keys


# --- files --------------------------------------------------------------------------------
def _read_json(file: Path) -> dict | None:
    """The parsed JSON object, or None when the file is not there."""
    if not file.is_file():
        return None
    data = read_json_file(file)
    if not isinstance(data, dict):
        raise LlmpressError(f"{file}: expected a JSON object")
    return data


def _load_engine(tokenizer_file: Path) -> EngineTokenizer:
    try:
        return EngineTokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # noqa: BLE001 (the engine raises plain Exceptions)
        raise LlmpressError(f"{tokenizer_file}: cannot load ({exc})") from None
