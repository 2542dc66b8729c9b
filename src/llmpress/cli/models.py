"""`llmpress pull`, `list`, `rm` and `info`: the catalog and what a model is."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from rich.table import Table

from llmpress.cli.common import _add_model_args, _load, _mib, console


def cmd_pull(args) -> None:
    from llmpress import hub
    path = hub.pull(args.name)  # draws its own progress bar
    console.print(f"{args.name}: {path} ({_mib(path.stat().st_size)})")


def cmd_list(args) -> None:
    from llmpress import hub
    table = Table(title=f"models ({hub.cache_dir() / 'models'})")
    for col in ("name", "size", "type", "where"):
        table.add_column(col, justify="right" if col == "size" else "left",
                         overflow="fold")
    for name, entry in hub.CATALOG.items():
        where = str(hub.cached_path(name)) if hub.is_pulled(name) else "not pulled"
        table.add_row(name, _mib(entry.size), entry.quant_type, where)
    console.print(table)


def cmd_rm(args) -> None:
    from llmpress import hub
    console.print(f"removed {hub.remove(args.name)}", highlight=False)


def cmd_info(args) -> None:
    info = _load(args).info()
    if args.json:
        print(json.dumps(asdict(info) | {"bits_per_weight": info.bits_per_weight}, indent=2))
        return
    table = Table(title=info.name, show_header=False)
    rows = [
        ("file", info.path + (f" (split: {info.parts} parts)" if info.parts > 1 else "")),
        ("architecture", info.architecture), ("parameters", f"{info.parameters:,}"),
        ("layers", info.layers), ("heads / KV heads", f"{info.heads} / {info.kv_heads}"),
        ("embedding / FFN", f"{info.embedding} / {info.ffn}"), ("vocabulary", f"{info.vocab:,}"),
        ("context length", f"{info.context_length:,}"), ("file size", _mib(info.file_bytes)),
        ("bits per weight", f"{info.bits_per_weight:.2f}"),
        ("chat template", "yes" if info.has_chat_template else "no"),
        ("matmuls", info.matmul),
    ]
    if info.experts:  # a mixture of experts: what one token computes with
        rows[3:3] = [("experts (used / total)", f"{info.experts_used} / {info.experts}"),
                     ("active parameters", f"{info.active_parameters:,}")]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    types = Table(title="tensor types")
    for col in ("type", "tensors", "bytes"):
        types.add_column(col, justify="right" if col != "type" else "left")
    for t in info.tensor_types:
        types.add_row(t.type_name, str(t.count), _mib(t.n_bytes))
    console.print(types)


def add_model_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="fetch a named model into the cache")
    p.add_argument("name", help="a catalog name (see `llmpress list`), or hf:ORG/NAME[:FILE]")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="the catalog's models: size, type, where pulled")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="delete a pulled model from the cache")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("info", help="architecture, sizes and tensor types of a model")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
