"""Where each field of a GGUF header sits, so tests and the fuzzer can change one value in
place (same size: tensor data stays where it is) or rebuild the header around new values.

Independent of llmpress's reader on purpose: a mutation tool must not share the parser it
attacks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class Field:
    """One header field: its byte range and how it is encoded."""
    name: str  # "kv:<key>", "kv-type:<key>", "array-len:<key>", "tensor-dim:<t>:<i>", ...
    start: int
    fmt: str  # struct format of the field itself


@dataclass
class Layout:
    version: int
    n_tensors: int
    n_kv: int
    fields: list[Field]
    kv_values: dict[str, tuple[int, int, int]]  # key -> (type, value start, value end)
    tensor_infos: dict[str, tuple[int, int]]  # name -> (info start, info end)
    header_end: int  # end of the tensor infos (data starts at the next alignment)

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)


def _skip_value(data: bytes, pos: int, vtype: int, key: str, fields: list[Field]) -> int:
    if vtype in SCALAR_FORMATS:
        return pos + struct.calcsize(SCALAR_FORMATS[vtype])
    if vtype == STRING:
        fields.append(Field(f"str-len:{key}", pos, "<Q"))
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
    if vtype == ARRAY:
        item_type, n = struct.unpack_from("<IQ", data, pos)
        fields.append(Field(f"array-type:{key}", pos, "<I"))
        fields.append(Field(f"array-len:{key}", pos + 4, "<Q"))
        pos += 12
        if item_type in SCALAR_FORMATS:
            return pos + n * struct.calcsize(SCALAR_FORMATS[item_type])
        for _ in range(n):
            pos = _skip_value(data, pos, item_type, key + "[]", [])
            if pos > len(data):
                raise ValueError(f"{key}: array runs past the end")
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def parse(data: bytes) -> Layout:
    """The layout of a well-formed GGUF file's header."""
    assert data[:4] == b"GGUF"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    fields = [Field("version", 4, "<I"), Field("tensor-count", 8, "<Q"),
              Field("kv-count", 16, "<Q")]
    kv_values, infos = {}, {}
    pos = 24
    for _ in range(n_kv):
        if pos > len(data):
            raise ValueError("metadata runs past the end")
        fields.append(Field("key-len", pos, "<Q"))
        n = struct.unpack_from("<Q", data, pos)[0]
        key = data[pos + 8:pos + 8 + n].decode("utf-8", "replace")
        pos += 8 + n
        vtype = struct.unpack_from("<I", data, pos)[0]
        fields.append(Field(f"kv-type:{key}", pos, "<I"))
        pos += 4
        if vtype in SCALAR_FORMATS:
            fields.append(Field(f"kv:{key}", pos, SCALAR_FORMATS[vtype]))
        end = _skip_value(data, pos, vtype, key, fields)
        kv_values[key] = (vtype, pos, end)
        pos = end
    for _ in range(n_tensors):
        if pos > len(data):
            raise ValueError("tensor infos run past the end")
        start = pos
        n = struct.unpack_from("<Q", data, pos)[0]
        fields.append(Field("tensor-name-len", pos, "<Q"))
        name = data[pos + 8:pos + 8 + n].decode("utf-8", "replace")
        pos += 8 + n
        n_dims = struct.unpack_from("<I", data, pos)[0]
        if n_dims > 8:  # a mutated count: parsing on would build billions of fields
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        fields.append(Field(f"tensor-ndims:{name}", pos, "<I"))
        pos += 4
        for i in range(n_dims):
            fields.append(Field(f"tensor-dim:{name}:{i}", pos, "<Q"))
            pos += 8
        fields.append(Field(f"tensor-type:{name}", pos, "<I"))
        fields.append(Field(f"tensor-offset:{name}", pos + 4, "<Q"))
        pos += 12
        infos[name] = (start, pos)
    return Layout(version, n_tensors, n_kv, fields, kv_values, infos, pos)


def patch(data: bytearray, field: Field, value) -> None:
    """Overwrite one field in place (the value wraps to the field's width)."""
    fmt = field.fmt
    if fmt in ("<f", "<d"):
        struct.pack_into(fmt, data, field.start, float(value))
        return
    size = struct.calcsize(fmt)
    raw = int(value) & ((1 << (8 * size)) - 1)
    struct.pack_into(fmt.upper() if fmt != "<?" else "<B", data, field.start, raw)


def set_kv(data: bytearray, key: str, value) -> None:
    """Change a scalar metadata value in place, keeping its type."""
    patch(data, parse(bytes(data[:1 << 24])).field(f"kv:{key}"), value)


def encode_value(vtype: int, value) -> bytes:
    """GGUF bytes of a value (type id included); arrays are (item_type, [items])."""
    body = struct.pack("<I", vtype)
    if vtype in SCALAR_FORMATS:
        return body + struct.pack(SCALAR_FORMATS[vtype], value)
    if vtype == STRING:
        raw = value if isinstance(value, bytes) else value.encode()
        return body + struct.pack("<Q", len(raw)) + raw
    item_type, items = value
    out = [body, struct.pack("<IQ", item_type, len(items))]
    for item in items:
        out.append(encode_value(item_type, item)[4:])  # items carry no type id of their own
    return b"".join(out)


def replace_kv(data: bytes, key: str, vtype: int, value, alignment: int = 32) -> bytes:
    """The file with one metadata value re-encoded (any type); tensor data is moved to the
    new aligned start, so the tensors' offsets stay valid."""
    layout = parse(data)
    _, start, end = layout.kv_values[key]
    old_data_start = -(-layout.header_end // alignment) * alignment
    header = data[:start - 4] + encode_value(vtype, value) + data[end:layout.header_end]
    padding = b"\0" * (-len(header) % alignment)
    return header + padding + data[old_data_start:]
