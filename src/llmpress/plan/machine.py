"""The machine a plan is made for: RAM (/proc/meminfo), GPU memory (torch.cuda), memory
bandwidth (a stated default or a few-second probe), and a helper that measures the peak
RSS of a command, for checking the estimates."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmpress.errors import LlmpressError

GB = 10**9
# Read bandwidth of this project's development machines (2 threads), measured for
# tests/data/README.md; used when no probe is run.
DEFAULT_RAM_BANDWIDTH = 25.8 * GB
# Sequential reads of a model file that is not in the page cache: a typical NVMe SSD.
DEFAULT_DISK_BANDWIDTH = 2.0 * GB
# Peak memory bandwidth of common GPUs (vendor data sheets), by a substring of the name
# torch reports; the probe (--measure) replaces it.
GPU_BANDWIDTH = {
    "H200": 4800 * GB, "H100 PCIe": 2000 * GB, "H100": 3350 * GB, "A100": 2039 * GB,
    "L40S": 864 * GB, "A10": 600 * GB, "L4": 300 * GB, "T4": 320 * GB, "V100": 900 * GB,
    "RTX 4090": 1008 * GB, "RTX 4080": 717 * GB, "RTX 3090": 936 * GB, "RTX 3080": 760 * GB,
}  # fmt: skip
DEFAULT_GPU_BANDWIDTH = 300 * GB  # an unknown GPU: a modest card

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Machine:
    ram_total: int
    ram_available: int
    vram_total: int  # 0: no GPU
    vram_free: int
    gpu_name: str
    ram_bandwidth: float  # bytes/s
    gpu_bandwidth: float
    disk_bandwidth: float
    bandwidth_source: str  # "default (...)" or "measured"
    overridden: bool = False  # --ram / --vram: planning for another machine

    @property
    def has_gpu(self) -> bool:
        return self.vram_total > 0


def parse_size(text: str, what: str = "size") -> int:
    """"16GB", "16G", "15.5GiB", "16" (GB) -> bytes. Units are binary (16GB = 16 GiB), as
    RAM and VRAM are sold and as llama.cpp reports them."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise LlmpressError(f"{what} {text!r}: write a size like 16GB, 24GiB or 512MB")
    value, unit = float(match.group(1)), match.group(2).lower() or "g"
    return int(value * 1024 ** ("kmgt".index(unit) + 1))


def meminfo(path: str = "/proc/meminfo") -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes."""
    values = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" not in values:
        raise LlmpressError(f"cannot read the RAM size from {path}; give it with --ram, "
                            "e.g. --ram 16GB")
    return values["MemTotal"], values.get("MemAvailable", values["MemTotal"])


def detect_gpu() -> tuple[int, int, str]:
    """(total, free, name) of GPU 0 through torch.cuda; zeros without a GPU."""
    try:
        import torch
        if not torch.cuda.is_available():
            return 0, 0, ""
        free, total = torch.cuda.mem_get_info(0)
        return int(total), int(free), torch.cuda.get_device_name(0)
    except Exception:  # a broken driver is "no GPU" for planning
        return 0, 0, ""


def gpu_bandwidth(name: str) -> float:
    for key, value in GPU_BANDWIDTH.items():
        if key.lower() in name.lower():
            return value
    return DEFAULT_GPU_BANDWIDTH


def detect_machine(ram: str | int | None = None, vram: str | int | None = None,
                   measure: bool = False) -> Machine:
    """This machine, or another one: `ram` / `vram` (sizes, "0" for no GPU) replace what
    is detected. measure=True runs the bandwidth probes (a few seconds)."""
    if ram is not None:
        ram_total = ram_available = ram if isinstance(ram, int) else parse_size(ram, "--ram")
    else:
        ram_total, ram_available = meminfo()
    if vram is not None:
        vram_total = vram if isinstance(vram, int) else parse_size(vram, "--vram")
        vram_free, gpu_name = vram_total, "GPU" if vram_total else ""
    else:
        vram_total, vram_free, gpu_name = detect_gpu()
    ram_bw, gpu_bw = DEFAULT_RAM_BANDWIDTH, gpu_bandwidth(gpu_name)
    source = f"default ({DEFAULT_RAM_BANDWIDTH / GB:.1f} GB/s RAM"
    source += f", {gpu_bw / GB:.0f} GB/s GPU)" if vram_total else ")"
    if measure:
        ram_bw = measure_bandwidth()
        if vram is None and vram_total:
            gpu_bw = measure_bandwidth(device="cuda")
        source = "measured"
    return Machine(ram_total, ram_available, vram_total, vram_free, gpu_name, ram_bw, gpu_bw,
                   DEFAULT_DISK_BANDWIDTH, source, ram is not None or vram is not None)


def measure_bandwidth(seconds: float = 2.0, n_bytes: int | None = None,
                      device: str = "cpu") -> float:
    """Read bandwidth in bytes/s: sum a buffer larger than the caches for `seconds`,
    keeping the best pass (what token generation streams through: reads)."""
    import torch
    if n_bytes is None:  # far beyond the caches; a GPU pass must outlast a kernel launch
        n_bytes = 2**30 if device.startswith("cuda") else 256 * 2**20
    buffer = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    buffer.sum()  # first touch and warm-up
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        buffer.sum()
        sync()
        best = max(best, n_bytes / (time.perf_counter() - start))
    return best


# --- measuring a command -----------------------------------------------------------------
def peak_rss_bytes(pid: int | None = None) -> int:
    """The high-water mark of this process, or of process `pid`. getrusage's ru_maxrss
    survives fork + exec on Linux (a child of a big parent reports the parent's size);
    VmHWM belongs to the current address space alone."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux: the best the OS offers, for this process only
        if pid is not None:
            raise
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_PEAK_WRAPPER = (
    "import runpy, sys\n"
    "from llmpress.plan.machine import peak_rss_bytes\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    "    sys.stderr.write(f'\\nLLMPRESS_PEAK_RSS_KIB {peak_rss_bytes() // 1024}\\n')\n"
)


@dataclass(frozen=True)
class PeakRun:
    returncode: int
    peak_rss: int  # bytes
    seconds: float
    stderr: str


def peak_rss_of_module(module: str, args: list[str], stdin_text: str = "",
                       env: dict[str, str] | None = None) -> PeakRun:
    """Run `python -m module args` in a fresh process and report its peak RSS
    (VmHWM of that process's own address space)."""
    with tempfile.TemporaryFile("w+") as stdin, tempfile.TemporaryFile("w+") as err:
        stdin.write(stdin_text)
        stdin.seek(0)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, module, *args], stdin=stdin,
                              stdout=subprocess.DEVNULL, stderr=err, env=env or os.environ.copy())
        seconds = time.perf_counter() - start
        err.seek(0)
        stderr = err.read()
    peaks = re.findall(r"LLMPRESS_PEAK_RSS_KIB (\d+)", stderr)
    if not peaks:
        raise LlmpressError(f"python -m {module} reported no peak RSS: {stderr[-500:]}")
    return PeakRun(done.returncode, int(peaks[-1]) * 1024, seconds, stderr)
