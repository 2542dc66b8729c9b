"""Built-in catalog of well-known models: their config.json values as data (plan/data/*.json),
each with the Hugging Face page it was taken from, so `llmpress fit Llama-3.1-70B` needs
no download.

A catalog entry is looked up by name (any case, "-"/"_"/"." ignored) or, for the classic
grid, by size label ("7B"); an unknown name gets the nearest entries (difflib).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmpress.errors import LlmpressError

DATA_DIR = Path(__file__).resolve().parent / "data"

# The model a size label of the classic "how much RAM" grid stands for, where the catalog
# has several of that size: the classic grid's 7B and 13B are Llama (2) models.
SIZE_DEFAULTS = {"7B": "Llama-2-7B", "8B": "Llama-3.1-8B", "13B": "Llama-2-13B",
                 "14B": "Qwen2.5-14B", "32B": "Qwen2.5-32B", "70B": "Llama-3.1-70B",
                 "72B": "Qwen2.5-72B"}


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # e.g. "Llama-3.1-8B"
    size: str  # size label, e.g. "8B"
    source: str  # the config.json the values come from
    config: dict[str, Any] = field(compare=False, repr=False)  # config.json keys
    note: str = ""


def _key(text: str) -> str:
    """Lookup key: lower case without separators ("llama_3.1-8b" -> "llama318b")."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _read_entry(path: Path) -> CatalogEntry:
    data = json.loads(path.read_text(encoding="utf-8"))
    return CatalogEntry(name=data["name"], size=data["size"], source=data["source"],
                        config=data["config"], note=data.get("note", ""))


@lru_cache(maxsize=1)
def catalog() -> dict[str, CatalogEntry]:
    """Every catalog entry by name, smallest model first."""
    entries = [_read_entry(p) for p in sorted(DATA_DIR.glob("*.json"))]
    entries.sort(key=lambda e: (size_in_billions(e.size), e.name))
    return {e.name: e for e in entries}


def size_in_billions(label: str) -> float:
    """"135M" -> 0.135, "7B" -> 7.0; LlmpressError for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([MmBb])\s*", label)
    if not match:
        raise LlmpressError(f"model size {label!r}: write it as a number of parameters with "
                            "M or B, e.g. 7B or 135M")
    value = float(match.group(1))
    return value / 1000 if match.group(2) in "Mm" else value


def find_entry(name: str) -> CatalogEntry:
    """The entry called `name` (case and separators ignored); the nearest names if none."""
    entries = catalog()
    by_key = {_key(n): e for n, e in entries.items()}
    if _key(name) in by_key:
        return by_key[_key(name)]
    nearest = difflib.get_close_matches(_key(name), list(by_key), n=3, cutoff=0.4)
    hint = (f"did you mean {', '.join(by_key[k].name for k in nearest)}?" if nearest
            else f"catalog models: {', '.join(entries)}")
    raise LlmpressError(f"{name!r} is not a file, a Hugging Face directory or a catalog "
                        f"model; {hint} (`llmpress fit --list` shows the catalog)")


def entry_for_size(label: str) -> CatalogEntry:
    """The catalog model a size label stands for ("70B" -> Llama-3.1-70B)."""
    wanted = size_in_billions(label)
    entries = catalog()
    same = [e for e in entries.values() if size_in_billions(e.size) == wanted]
    preferred = SIZE_DEFAULTS.get(f"{wanted:g}B")
    for entry in same:
        if entry.name == preferred:
            return entry
    if same:
        return same[0]
    sizes = sorted({e.size for e in entries.values()}, key=size_in_billions)
    raise LlmpressError(f"no catalog model of size {label}; sizes in the catalog: "
                        f"{', '.join(sizes)}")
