"""Structure-aware mutations: hostile GGUF files, Hugging Face directories and chat
templates, each derived from a seed by a seeded random generator (case i of seed s is
always the same input)."""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
from pathlib import Path

from . import gguf_layout as g

# --- values an attacker tries ---------------------------------------------------------------
def interesting_int(rng: random.Random, current: int) -> int:
    return rng.choice([0, 1, 2, 3, -1, 7, 63, 64, 65, 255, 256, 1 << 15, 1 << 16, 1 << 20,
                       (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 63) - 1,
                       1 << 63, (1 << 64) - 1, 10**9, current + 1, current - 1, current * 2,
                       current // 2, current * 1000, rng.randrange(1 << 16)])


def interesting_float(rng: random.Random) -> float:
    return rng.choice([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-45, 1e30, 1e38,
                       3.4e38, 0.5, 1e-6, 1e6])


def hostile_string(rng: random.Random) -> str:
    return rng.choice(["", "x", "llama", "gemma", "gpt2", "\ud800".encode("utf-8", "surrogatepass")
                       .decode("utf-8", "replace"), "\u2581" * 1000, "a" * 100_000,
                       "{% for i in range(100000) %}{% for j in range(100000) %}"
                       "{% endfor %}{% endfor %}", "\0" * 64, "blk.0.attn_q.weight"])


# --- GGUF -------------------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_TYPES = [U8, I8, U16, I16, U32, I32, F32, BOOL, U64, I64, F64]


def _random_value(rng: random.Random, depth: int = 0) -> tuple[int, object]:
    kind = rng.randrange(7)
    if kind == 0:
        return STRING, hostile_string(rng)
    if kind == 1:
        return F32, interesting_float(rng)
    if kind == 2:
        return ARRAY, (U32, [rng.randrange(1 << 32) for _ in range(rng.choice([0, 1, 2, 30]))])
    if kind == 3:
        return ARRAY, (STRING, [hostile_string(rng) for _ in range(rng.choice([0, 1, 3]))])
    if kind == 4 and depth < 3:  # arrays of arrays, possibly deep
        n = rng.choice([1, 2, 20, 200]) if depth == 0 else 1
        inner = (ARRAY, (U32, [1]))
        for _ in range(n):
            inner = (ARRAY, (ARRAY, [inner[1]]))
        return inner
    if kind == 5:
        return BOOL, rng.random() < 0.5
    return U64, interesting_int(rng, 576) & ((1 << 64) - 1)


def mutate_gguf(data: bytes, layout: g.Layout, rng: random.Random, templates) -> bytes:
    """One to three mutations of a seed file's bytes."""
    out = data
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.randrange(100)
        try:
            layout = g.parse(out) if out is not data else layout
            if op < 40:  # a header field in place: count, length, type, dim, offset, value
                field = rng.choice([f for f in layout.fields
                                    if not f.name.startswith("kv:") or rng.random() < 0.7])
                buf = bytearray(out)
                if field.fmt in ("<f", "<d"):
                    g.patch(buf, field, interesting_float(rng))
                else:
                    current = struct.unpack_from(field.fmt, buf, field.start)[0]
                    g.patch(buf, field, interesting_int(rng, int(current)))
                out = bytes(buf)
            elif op < 55:  # a metadata value re-typed
                key = rng.choice(list(layout.kv_values))
                vtype, value = _random_value(rng)
                out = g.replace_kv(out, key, vtype, value)
            elif op < 62:  # the chat template replaced by a hostile one
                if "tokenizer.chat_template" in layout.kv_values:
                    out = g.replace_kv(out, "tokenizer.chat_template", STRING, templates(rng))
            elif op < 70:  # one token made huge or odd
                key = "tokenizer.ggml.tokens"
                if key in layout.kv_values and len(out) < 50_000_000:
                    tokens = _read_strings(out, layout, key)
                    i = rng.randrange(len(tokens))
                    tokens[i] = rng.choice(["x" * 1_000_000, "", tokens[0], "\u2581" * 5000])
                    out = g.replace_kv(out, key, ARRAY, (STRING, tokens))
            elif op < 80:  # a tensor renamed (same length: offsets stay valid)
                name = rng.choice(list(layout.tensor_infos)).encode()
                at = out.find(struct.pack("<Q", len(name)) + name, 24)
                if at >= 0:
                    buf = bytearray(out)
                    k = at + 8 + rng.randrange(len(name))
                    buf[k] = rng.choice(b"0123456789._qkvxyz")
                    out = bytes(buf)
            elif op < 90:  # truncated
                cut = rng.choice([rng.randrange(24, max(25, layout.header_end)),
                                  rng.randrange(len(out))])
                out = out[:cut]
            else:  # a few random bytes in the header
                buf = bytearray(out)
                for _ in range(rng.choice([1, 2, 8])):
                    buf[rng.randrange(min(len(buf), layout.header_end))] = rng.randrange(256)
                out = bytes(buf)
        except Exception:  # noqa: BLE001
            break  # an earlier mutation left no structure to aim at: keep what we have
    return out


def _read_strings(data: bytes, layout: g.Layout, key: str) -> list[str]:
    _, start, _ = layout.kv_values[key]
    item_type, n = struct.unpack_from("<IQ", data, start)
    pos, out = start + 12, []
    for _ in range(n):
        length = struct.unpack_from("<Q", data, pos)[0]
        out.append(data[pos + 8:pos + 8 + length].decode("utf-8", "replace"))
        pos += 8 + length
    return out


# --- Hugging Face directories -------------------------------------------------------------------
CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
               "rope_theta", "max_position_embeddings", "tie_word_embeddings", "model_type",
               "hidden_act", "rope_scaling", "rope_parameters", "quantization_config",
               "eos_token_id", "bos_token_id")


def _json_value(rng: random.Random, current):
    choice = rng.randrange(9)
    if choice == 0:
        return None
    if choice == 1:
        return hostile_string(rng)[:1000]
    if choice == 2:
        return interesting_float(rng)
    if choice == 3:
        return [current, current]
    if choice == 4:
        return {"type": "linear", "factor": interesting_float(rng), "rope_type": "llama3"}
    if choice == 5:
        return rng.random() < 0.5
    if choice == 6:
        nested: object = 1
        for _ in range(rng.choice([10, 2000, 100_000])):
            nested = [nested]
        return nested
    return interesting_int(rng, current if isinstance(current, int) else 64)


def _dumps(value) -> str:
    try:
        return json.dumps(value)
    except RecursionError:  # a deep value: write its text directly
        depth, inner = 0, value
        while isinstance(inner, list):
            depth, inner = depth + 1, inner[0]
        return "[" * depth + json.dumps(inner) + "]" * depth


def _mutate_json_file(path: Path, rng: random.Random, keys=None) -> None:
    data = json.loads(path.read_text())
    if isinstance(data, dict) and data:
        key = rng.choice(list(keys or data))
        if rng.random() < 0.2:
            data.pop(key, None)
            path.write_text(json.dumps(data))
            return
        value = _json_value(rng, data.get(key))
        text = json.dumps({k: v for k, v in data.items() if k != key})
        path.write_text(text[:-1] + (", " if len(text) > 2 else "") + json.dumps(key) + ": "
                        + _dumps(value) + "}")


def _mutate_safetensors(path: Path, rng: random.Random) -> None:
    raw = bytearray(path.read_bytes())
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    op = rng.randrange(5)
    if op == 0:
        entry["shape"] = [interesting_int(rng, d) for d in entry["shape"]]
    elif op == 1:
        entry["shape"] = entry["shape"][::-1] + ([1] if rng.random() < 0.5 else [])
    elif op == 2:
        entry["dtype"] = rng.choice(["F64", "I8", "U8", "BOOL", "F8_E4M3", "XYZ", "F16"])
    elif op == 3:
        entry["data_offsets"] = [interesting_int(rng, o) for o in entry["data_offsets"]]
    else:
        header[name.replace("layers.0", "layers.7").replace("weight", "wieght")] = header.pop(name)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    if rng.random() < 0.1:
        struct.pack_into("<Q", raw, 0, interesting_int(rng, n) & ((1 << 64) - 1))
        path.write_bytes(raw)
        return
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def mutate_hf_dir(seed: Path, target: Path, rng: random.Random, templates) -> None:
    shutil.copytree(seed, target)
    for _ in range(rng.choice([1, 1, 2])):
        try:
            _mutate_hf_once(target, rng, templates)
        except Exception:  # noqa: BLE001 (an earlier mutation removed what this one aims at)
            break


def _mutate_hf_once(target: Path, rng: random.Random, templates) -> None:
    op = rng.randrange(100)
    if op < 40:
        _mutate_json_file(target / "config.json", rng, CONFIG_KEYS)
    elif op < 60:
        _mutate_safetensors(next(target.glob("*.safetensors")), rng)
    elif op < 72:
        tok = target / "tokenizer.json"
        data = json.loads(tok.read_text())
        sub = rng.randrange(4)
        if sub == 0:  # a post-processor naming a token it does not define
            data["post_processor"] = {
                "type": "TemplateProcessing", "special_tokens": {},
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}]}
        elif sub == 1:
            vocab = data["model"]["vocab"]
            vocab[rng.choice(list(vocab))] = interesting_int(rng, 100) % (1 << 62)
        elif sub == 2:
            data["model"]["merges"] = [["x" * 1000, "y"], ["??", "!!"]]
        else:
            data["decoder"] = rng.choice([None, {"type": "Nope"}, 7])
        tok.write_text(json.dumps(data))
    elif op < 84:
        config = target / "tokenizer_config.json"
        data = json.loads(config.read_text())
        data["chat_template"] = rng.choice([templates(rng), 7, {"a": 1}, [1, "x"],
                                            [{"name": "default", "template": 5}]])
        config.write_text(json.dumps(data))
    elif op < 90:
        victim = rng.choice(sorted(target.iterdir()))
        if rng.random() < 0.5:
            victim.unlink()
        else:
            raw = victim.read_bytes()
            victim.write_bytes(raw[:rng.randrange(len(raw) + 1)])
    elif op < 95:
        (target / "chat_template.jinja").write_bytes(rng.choice(
            [b"\xff\xfe{{ x }}", templates(rng).encode("utf-8", "replace")]))
        config = target / "tokenizer_config.json"
        data = json.loads(config.read_text())
        data.pop("chat_template", None)
        config.write_text(json.dumps(data))
    else:
        (target / "config.json").write_bytes(b"\xff\xfe" + b"{" * 10)


# --- chat templates -----------------------------------------------------------------------------
TEMPLATE_PARTS = [
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{{ i }}{% endfor %}",
    "{{ lipsum(10**6) }}", "{{ lipsum(3) }}",
    "{{ 'x' * 10**9 }}", "{{ 'ab' * 100 }}", "{{ 9 ** 9 ** 9 }}", "{{ 2 ** 64 }}",
    "{{ 'a'|center(10**10) }}", "{{ 'a'.rjust(10**9) }}", "{{ 'a'.zfill(10**8) }}",
    "{{ '%0*d' % (10**9, 1) }}", "{{ '%.999999999f' % 1.0 }}", "{{ '{:>99999999}'.format(1) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ f('ab', 60) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ messages.__class__.__mro__ }}", "{{ ''.__class__.__subclasses__() }}",
    "{{ raise_exception('no') }}", "{% for %}", "{{ undefined_thing.x.y }}",
    "{{ (range(100000)|list|join(',' * 1000))|length }}", "{{ ('abc'|slice(10**9))|list }}",
    "{{ 'a\nb'|indent(10**9) }}", "{{ 'x'|replace('', 'y' * 1000)|replace('', 'z' * 1000) }}",
    "{% set d = dict(a=1) %}{{ d.update({'b': 2}) }}", "{{ messages|tojson(indent=10**9) }}",
    "{{ strftime_now('%Y' * 100000) }}", "{{ messages[10**20] }}", "{{ 1 / 0 }}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
]


def hostile_template(rng: random.Random) -> str:
    parts = [rng.choice(TEMPLATE_PARTS) for _ in range(rng.choice([1, 1, 2, 3]))]
    text = "".join(parts)
    if rng.random() < 0.05:
        text = text * rng.choice([1000, 200_000])  # large templates
    if rng.random() < 0.1:
        text = "{% if true %}" * rng.choice([100, 5000]) + text + "{% endif %}" * 100
    return text
