"""Split GGUF models (gguf-split's NAME-0000i-of-0000N.gguf): written by our one writer,
loaded by llama.cpp and by llmpress like the single file, and bad sets refused in one line.

References: llama-cpp-python (llama.cpp loads a split model from its first part) and
gguf-py's reader for the split keys' GGUF types; the single file written by the same
quantize call for the logits and the tensor bytes.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType

from llmpress.cli import main
from llmpress.errors import LlmpressError
from llmpress.io.gguf import load_gguf
from llmpress.io.gguf_write import (
    MetadataValue,
    SplitLimits,
    TensorSlot,
    plan_split,
    write_gguf,
)
from llmpress.models.llama import LlamaModel
from llmpress.quant.quantize import QuantizeConfig, quantize_model

MAX_BYTES = 40_000_000  # the default model (~94 MiB at Q4_1) in 3 parts
TOKENS = [1, 504, 3458, 282, 2260, 314, 260, 1345, 30, 378, 5248, 28, 1118, 216, 19, 25]


def parts_of(first: Path) -> list[Path]:
    return sorted(first.parent.glob(first.name.replace("-00001-of-", "-*-of-")))


@pytest.fixture(scope="module")
def whole_and_split(default_model_path, tmp_path_factory) -> tuple[Path, list[Path]]:
    """The default model through one quantize call, as one file and as 3 parts."""
    folder = tmp_path_factory.mktemp("split")
    common = dict(type="Q4_1", allow_requantize=True, error_rows=0)
    whole = quantize_model(QuantizeConfig(default_model_path, folder / "whole.gguf", **common))
    split = quantize_model(QuantizeConfig(default_model_path, folder / "model.gguf", **common,
                                          split=SplitLimits(max_bytes=MAX_BYTES)))
    first = Path(split.output)
    assert first.name == "model-00001-of-00003.gguf"
    assert split.file_bytes == sum(p.stat().st_size for p in parts_of(first))
    return Path(whole.output), parts_of(first)


def _field(reader: GGUFReader, key: str):
    field = reader.fields[key]
    return field.types[0], field.parts[field.data[0]][0]


def test_parts_are_laid_out_as_gguf_split_does(whole_and_split):
    whole, parts = whole_and_split
    assert [p.name for p in parts] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    readers = [GGUFReader(p) for p in parts]
    whole_reader = GGUFReader(whole)
    n_tensors = len(whole_reader.tensors)
    for no, reader in enumerate(readers):
        assert _field(reader, "split.no") == (GGUFValueType.UINT16, no)
        assert _field(reader, "split.count") == (GGUFValueType.UINT16, 3)
        assert _field(reader, "split.tensors.count") == (GGUFValueType.INT32, n_tensors)
        model_keys = [k for k in reader.fields if not k.startswith(("GGUF.", "split."))]
        assert bool(model_keys) == (no == 0)  # the model's metadata in the first part only
    # gguf-split's rule: a new part when the next tensor would pass the limit
    sizes = [[-(-int(t.n_bytes) // 32) * 32 for t in r.tensors] for r in readers]
    for part, following in zip(sizes, sizes[1:]):
        assert sum(part) <= MAX_BYTES < sum(part) + following[0]
    # the same tensors, in the same order, with the same bytes as the single file
    split_tensors = [t for r in readers for t in r.tensors]
    assert [t.name for t in split_tensors] == [t.name for t in whole_reader.tensors]
    for a, b in zip(split_tensors, whole_reader.tensors):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name


def llama_cpp_logits(path: Path) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=len(TOKENS), n_batch=len(TOKENS), logits_all=True,
                          n_threads=2, verbose=False)
    llm.eval(TOKENS)
    return llm.scores[:len(TOKENS)].copy()


def our_logits(path: Path) -> torch.Tensor:
    model = LlamaModel(load_gguf(path))
    tokens = torch.tensor([TOKENS])
    return model(tokens, model.new_cache(len(TOKENS)))[0].float()


def test_llama_cpp_loads_the_split_model_like_the_single_file(whole_and_split):
    whole, parts = whole_and_split
    assert np.array_equal(llama_cpp_logits(parts[0]), llama_cpp_logits(whole))


def test_llmpress_loads_the_split_model_bit_identically(whole_and_split):
    whole, parts = whole_and_split
    expected = our_logits(whole)
    assert torch.equal(our_logits(parts[0]), expected)
    from_middle = load_gguf(parts[1])  # any part names the whole set
    assert from_middle.path == parts[0] and from_middle.parts == tuple(parts)
    assert not any(k.startswith("split.") for k in from_middle.metadata)
    assert list(from_middle.tensors) == list(load_gguf(whole).tensors)


def test_info_on_any_part(whole_and_split, capsys):
    _, parts = whole_and_split
    assert main(["info", str(parts[2])]) == 0
    assert "(split: 3 parts)" in capsys.readouterr().out
    assert main(["info", "--json", str(parts[1])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(parts[0]) and info["parts"] == 3
    assert info["file_bytes"] == sum(p.stat().st_size for p in parts)


def test_cli_splits_by_tensor_count_and_requantizes_a_split_input(whole_and_split, tmp_path,
                                                                   capsys):
    whole, parts = whole_and_split
    out = tmp_path / "by-count.gguf"
    assert main(["quantize", str(parts[0]), str(out), "Q4_1", "--split-max-tensors", "100",
                 "--summary"]) == 0
    written = parts_of(tmp_path / "by-count-00001-of-00003.gguf")
    assert [len(GGUFReader(p).tensors) for p in written] == [100, 100, 72]
    again, reference = load_gguf(written[0]), load_gguf(whole)
    for name, ref in reference.tensors.items():
        assert torch.equal(again.tensors[name].read_bytes(), ref.read_bytes()), name
    # back to one file: the split keys are not carried over
    single = tmp_path / "single.gguf"
    assert main(["quantize", str(written[1]), str(single), "Q4_1", "--summary"]) == 0
    assert "split.count" not in GGUFReader(single).fields


def test_plan_split_limits():
    slots = [TensorSlot(f"t{i}.weight", T.F32, (n, 8)) for i, n in enumerate((4, 4, 100, 4, 4))]
    def groups(limits):  # tensor bytes: 128, 128, 3200, 128, 128 (padded to 32)
        return [[t.name[1] for t in layout.tensors] for layout in plan_split({}, slots, limits)]
    assert groups(SplitLimits(max_bytes=256)) == [["0", "1"], ["2"], ["3", "4"]]  # 2 alone
    assert groups(SplitLimits(max_tensors=2)) == [["0", "1"], ["2", "3"], ["4"]]
    assert groups(SplitLimits(max_bytes=4000, max_tensors=3)) == [["0", "1", "2"], ["3", "4"]]
    with pytest.raises(LlmpressError, match="give --split-max-size or --split-max-tensors"):
        SplitLimits()


# --- bad sets ------------------------------------------------------------------------------
def one_error_line(path: Path, capsys) -> str:
    assert main(["info", str(path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def copy_set(parts: list[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    return [Path(shutil.copy(p, folder / p.name)) for p in parts]


def patch_u16(path: Path, key: str, value: int) -> None:
    """Set a u16 KV in place (key string, type UINT16, then the value)."""
    raw = bytearray(path.read_bytes())
    needle = key.encode() + struct.pack("<I", GGUFValueType.UINT16)
    at = raw.index(needle) + len(needle)
    raw[at:at + 2] = struct.pack("<H", value)
    path.write_bytes(bytes(raw))


def test_a_missing_part(whole_and_split, tmp_path, capsys):
    parts = copy_set(whole_and_split[1], tmp_path / "set")
    parts[1].unlink()
    line = one_error_line(parts[0], capsys)
    assert "part" in line and "model-00002-of-00003.gguf is missing" in line


def test_a_mismatched_count(whole_and_split, tmp_path, capsys):
    parts = copy_set(whole_and_split[1], tmp_path / "set")
    patch_u16(parts[1], "split.count", 4)
    line = one_error_line(parts[0], capsys)
    assert "model-00002-of-00003.gguf: split.count 4 in a set of 3 parts" in line
    # given the odd part itself, its name and its keys disagree
    assert "should be named ...-00002-of-00004.gguf" in one_error_line(parts[1], capsys)


def test_numbering_that_disagrees_with_the_names(whole_and_split, tmp_path, capsys):
    parts = copy_set(whole_and_split[1], tmp_path / "set")
    patch_u16(parts[2], "split.no", 1)
    assert "split.no 1 in the file, its name says part 3" in one_error_line(parts[0], capsys)
    patch_u16(parts[0], "split.count", 0)
    assert "split.count 0 is not a number of parts" in one_error_line(parts[0], capsys)


def test_a_part_of_another_split_of_the_model(whole_and_split, tmp_path, capsys):
    """Same count, same tensor total, other boundaries: tensors missing (or twice)."""
    _, parts = whole_and_split
    folder = tmp_path / "other"
    folder.mkdir()
    assert main(["quantize", str(parts[0]), str(folder / "model.gguf"), "Q4_1",
                 "--split-max-tensors", "100", "--summary"]) == 0
    capsys.readouterr()
    mixed = copy_set(parts, tmp_path / "mixed")
    shutil.copy(folder / "model-00002-of-00003.gguf", mixed[1])
    line = one_error_line(mixed[0], capsys)
    assert "3 parts hold 210 tensors, split.tensors.count says 272" in line
    assert "belongs to another split" in line


def small_part(path: Path, no: int, count: int, total: int, names: list[str],
               model_metadata: bool) -> Path:
    metadata = {"general.architecture": "llama", "llama.block_count": 1} if model_metadata else {}
    metadata |= {"split.no": MetadataValue(GGUFValueType.UINT16, no),
                 "split.count": MetadataValue(GGUFValueType.UINT16, count),
                 "split.tensors.count": MetadataValue(GGUFValueType.INT32, total)}
    write_gguf(path, metadata, [(TensorSlot(n, T.F32, (4, 32)), np.zeros((4, 32), np.float32))
                                for n in names])
    return path


def test_a_tensor_in_two_parts_and_a_part_of_another_model(tmp_path):
    a = small_part(tmp_path / "m-00001-of-00002.gguf", 0, 2, 3, ["a.weight", "b.weight"], True)
    small_part(tmp_path / "m-00002-of-00002.gguf", 1, 2, 3, ["b.weight", "c.weight"], False)
    with pytest.raises(LlmpressError, match=r"tensor b.weight is duplicated \(also in .*m-00001"):
        load_gguf(a)
    small_part(tmp_path / "m-00002-of-00002.gguf", 1, 2, 5, ["x.weight", "y.weight"], False)
    with pytest.raises(LlmpressError, match="split.tensors.count 5, the first part says 3"):
        load_gguf(a)
    small_part(tmp_path / "m-00002-of-00002.gguf", 1, 2, 3, [], False)
    with pytest.raises(LlmpressError, match="parts hold 2 tensors, split.tensors.count says 3"):
        load_gguf(a)
    small_part(tmp_path / "m-00002-of-00002.gguf", 1, 2, 3, ["c.weight"], False)
    assert list(load_gguf(a).tensors) == ["a.weight", "b.weight", "c.weight"]


def test_a_one_part_split_is_a_plain_file(tmp_path):
    """llama.cpp only looks for more parts when split.count > 1, whatever the name."""
    path = small_part(tmp_path / "plain.gguf", 0, 1, 2, ["a.weight", "b.weight"], True)
    source = load_gguf(path)
    assert list(source.tensors) == ["a.weight", "b.weight"] and source.parts == ()
    assert "split.count" not in source.metadata


def test_bad_split_options_are_one_line(default_model_path, tmp_path, capsys):
    for extra, message in ((["--split-max-size", "5X"], "--split-max-size 5X: write a size"),
                           (["--split-max-tensors", "0"], "--split-max-tensors 0: must be "
                                                          "positive")):
        assert main(["quantize", str(default_model_path), str(tmp_path / "x.gguf"), "Q4_1",
                     "--allow-requantize", *extra]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_mutated_parts_load_or_fail_in_one_line(tmp_path):
    """The fuzz harness's GGUF mutator (tests/fuzz) on one part of a 3-part set at a time:
    the set loads or is refused with an LlmpressError, nothing else."""
    import random

    from fuzz import gguf_layout
    from fuzz.mutate import mutate_gguf

    names = [f"blk.{i}.w.weight" for i in range(6)]
    paths = [small_part(tmp_path / f"m-0000{no + 1}-of-00003.gguf", no, 3, 6,
                        names[2 * no:2 * no + 2], no == 0) for no in range(3)]
    seeds = [p.read_bytes() for p in paths]
    refused = 0
    for case in range(150):
        rng = random.Random(case)
        k = rng.randrange(3)
        paths[k].write_bytes(mutate_gguf(seeds[k], gguf_layout.parse(seeds[k]), rng,
                                         lambda r: "{{ x }}"))
        try:
            load_gguf(paths[rng.randrange(3)])
        except LlmpressError as exc:
            assert "\n" not in str(exc)
            refused += 1
        paths[k].write_bytes(seeds[k])
    assert refused > 50  # the mutations do reach the checks


def test_a_failed_split_write_leaves_no_part(tmp_path):
    from llmpress.io.gguf_write import GGUFSplitWriter

    slots = [TensorSlot(f"t{i}.weight", T.F32, (4, 8)) for i in range(4)]
    parts = plan_split({"general.architecture": "llama"}, slots, SplitLimits(max_tensors=2))
    with pytest.raises(LlmpressError, match="t3.weight never came"):
        with GGUFSplitWriter(tmp_path / "m.gguf", parts) as writer:
            for slot in slots[:3]:
                writer.write_tensor(slot.name, np.zeros((4, 8), np.float32))
    assert list(tmp_path.iterdir()) == []
    with GGUFSplitWriter(tmp_path / "m.gguf", parts) as writer:
        for slot in slots:
            writer.write_tensor(slot.name, np.full((4, 8), 1.5, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-00001-of-00002.gguf",
                                                          "m-00002-of-00002.gguf"]
    loaded = load_gguf(tmp_path / "m-00002-of-00002.gguf")
    assert list(loaded.tensors) == [s.name for s in slots]
    assert loaded.tensors["t3.weight"].read_bytes().view(torch.float32).eq(1.5).all()
