"""Split GGUF models: NAME-00001-of-0000N.gguf ... as llama.cpp's gguf-split writes them.

Every part is a GGUF file of its own with the keys split.no (0-based, u16), split.count
(u16) and split.tensors.count (i32, the model's total); the first part also holds all of
the model's metadata, and the tensors are spread over the parts in order. llama.cpp loads
the model from the first part's path (llama_split_prefix / llama_split_path).

Loading validates the whole set before anything is allocated: each part is read with the
same strict header parser as a single file (io.gguf), then the set must agree: every part
present, its split.no its place, one split.count and split.tensors.count, every tensor
exactly once. Each bad case is one LlmpressError line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmpress.errors import LlmpressError

SPLIT_NO = "split.no"  # llama-arch's LLM_KV_SPLIT_NO ...
SPLIT_COUNT = "split.count"
SPLIT_TENSORS_COUNT = "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)
MAX_SPLITS = 0xFFFF  # split.count is a u16
_PART_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_path(prefix: str | Path, no: int, count: int) -> Path:
    """llama_split_path: part `no` (0-based) of `count`, e.g. model-00001-of-00003.gguf."""
    return Path(f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf")


def split_prefix(output: str | Path) -> Path:
    """The prefix for an output path: its name without .gguf (out.gguf -> out-0000i-...)."""
    output = Path(output)
    return output.with_suffix("") if output.suffix.lower() == ".gguf" else output


def is_split(metadata: dict[str, Any]) -> bool:
    return SPLIT_COUNT in metadata


def split_key(metadata: dict[str, Any], key: str, path: Path) -> int:
    value = metadata.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise LlmpressError(f"{path}: split model part without a valid {key} ({value!r})")
    return value


def part_paths(path: Path, metadata: dict[str, Any]) -> list[Path]:
    """The paths of every part of the split model `path` (any part) belongs to, from its
    split.no / split.count and its name, which must agree."""
    count = split_key(metadata, SPLIT_COUNT, path)
    no = split_key(metadata, SPLIT_NO, path)
    if not 1 <= count <= MAX_SPLITS:
        raise LlmpressError(f"{path}: split.count {count} is not a number of parts (1 to "
                            f"{MAX_SPLITS})")
    if not 0 <= no < count:
        raise LlmpressError(f"{path}: split.no {no} is outside its {count} parts")
    match = _PART_NAME.match(path.name)
    if not match or (int(match["no"]), int(match["count"])) != (no + 1, count):
        raise LlmpressError(f"{path}: part {no + 1} of a {count}-part split model should be "
                            f"named ...{split_path('', no, count).name}")
    prefix = path.with_name(match["prefix"])
    return [split_path(prefix, i, count) for i in range(count)]


def check_part(path: Path, metadata: dict[str, Any], no: int, count: int,
               n_tensors_total: int) -> None:
    """One part against its place in the set."""
    if not is_split(metadata):
        raise LlmpressError(f"{path}: not a part of a split model (no {SPLIT_COUNT})")
    part_count = split_key(metadata, SPLIT_COUNT, path)
    if part_count != count:
        raise LlmpressError(f"{path}: split.count {part_count} in a set of {count} parts: "
                            "parts of different split models?")
    part_no = split_key(metadata, SPLIT_NO, path)
    if part_no != no:
        raise LlmpressError(f"{path}: split.no {part_no} in the file, its name says part "
                            f"{no + 1} ({no})")
    part_total = split_key(metadata, SPLIT_TENSORS_COUNT, path)
    if part_total != n_tensors_total:
        raise LlmpressError(f"{path}: split.tensors.count {part_total}, the first part says "
                            f"{n_tensors_total}: parts of different split models?")


def check_parts_exist(paths: list[Path]) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LlmpressError(f"split model: part {missing[0]} is missing{more} "
                            f"({len(paths)} parts expected)")


__all__ = ["MAX_SPLITS", "SPLIT_COUNT", "SPLIT_KEYS", "SPLIT_NO", "SPLIT_TENSORS_COUNT",
           "check_part", "check_parts_exist", "is_split", "part_paths", "split_key",
           "split_path", "split_prefix"]
