"""The fuzzing campaign: makes each case from a seed, runs it in a reusable sandboxed
worker process (tests/fuzz/worker.py) with a timeout, and tallies the outcomes.

Outcomes: ran, error (a clean LlmpressError), exception (any other Python exception),
memory (MemoryError under the address-space limit), crash:<signal> (the worker died
natively; crash:asan when AddressSanitizer reported why, with --asan), hang (no answer
within the timeout), alloc>2x (it ran or failed cleanly but its peak resident memory grew
by more than twice the input's size plus ALLOC_FLOOR). Only ran and error are acceptable
(and ok: an HTTP request answered 2xx, tests/fuzz/http.py).
"""

from __future__ import annotations

import json
import os
import queue
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import gguf_layout as g
from .mutate import hostile_template, mutate_gguf, mutate_hf_dir
from .seeds import Seeds

REPO = Path(__file__).resolve().parents[2]
ACCEPTABLE = ("ran", "ok", "error")  # ok: an HTTP request answered 2xx (tests/fuzz/http.py)
KINDS = ("gguf", "hf", "template", "http")  # the table's columns
REAL_MODEL_SHARE = 0.1  # GGUF cases mutating the real default model (slower: ~100 MB each)
# A case may grow the worker's resident memory by twice its input's size (the real
# default model takes 1.1-1.25x: its mapped file plus the KV cache and activations) plus
# this floor: what a small input costs whatever its size (the tokenizer's tables, the
# interpreter's and torch's transient buffers; the tiny seeds take under 2 MiB once the
# worker is warm, see Worker.warm_up, the hostile templates' output caps a few MiB).
ALLOC_FLOOR = 32 << 20
OVER_ALLOCATION = "alloc>2x"


@dataclass
class Result:
    case: int
    kind: str
    seed: str
    outcome: str
    detail: dict = field(default_factory=dict)
    seconds: float = 0.0
    size: int = 0  # bytes of the input: file, directory total, or template text


def input_size(case: dict) -> int:
    if case["kind"] == "template":
        return len(case["template"].encode("utf-8", "surrogatepass"))
    path = Path(case["path"])
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def judge_allocation(outcome: str, detail: dict, size: int) -> str:
    """A clean outcome that took more memory than its input justifies is a defect."""
    if outcome in ACCEPTABLE and detail.get("grew", 0) > 2 * size + ALLOC_FLOOR:
        return OVER_ALLOCATION
    return outcome


def plan(n_gguf: int, n_hf: int, n_templates: int) -> list[str]:
    kinds = ["gguf"] * n_gguf + ["hf"] * n_hf + ["template"] * n_templates
    random.Random(0).shuffle(kinds)  # mix slow and fast cases over the workers
    return kinds


class Maker:
    """Builds case i's input on disk (or as text): the same every run for the same seed."""

    def __init__(self, seeds: Seeds, work: Path, seed: int):
        self.seeds, self.work, self.seed = seeds, work, seed
        self.tiny = [(p.name, p.read_bytes()) for p in seeds.tiny_ggufs]
        self.tiny_layouts = [g.parse(data) for _, data in self.tiny]
        self._real: tuple[bytes, g.Layout] | None = None
        self._lock = threading.Lock()

    def real(self) -> tuple[bytes, g.Layout]:
        with self._lock:
            if self._real is None:
                data = self.seeds.real_gguf.read_bytes()
                self._real = (data, g.parse(data[:1 << 24]))
            return self._real

    def make(self, i: int, kind: str) -> tuple[dict, str, Path | None]:
        rng = random.Random(f"{self.seed}:{i}")
        if kind == "template":
            return {"kind": "template", "template": hostile_template(rng)}, "template", None
        if kind == "hf":
            seed_dir = rng.choice(self.seeds.hf_dirs)
            target = self.work / f"case-{i}"
            mutate_hf_dir(seed_dir, target, rng, hostile_template)
            return {"kind": "hf", "path": str(target)}, seed_dir.name, target
        if self.seeds.real_gguf is not None and rng.random() < REAL_MODEL_SHARE:
            (data, layout), name = self.real(), self.seeds.real_gguf.name
        else:
            k = rng.randrange(len(self.tiny))
            (name, data), layout = self.tiny[k], self.tiny_layouts[k]
        target = self.work / f"case-{i}.gguf"
        target.write_bytes(mutate_gguf(data, layout, rng, hostile_template))
        return {"kind": "gguf", "path": str(target)}, name, target


class Worker:
    """One sandboxed process, reused case after case until it dies or hangs."""

    def __init__(self, as_bytes: int, warm_up: dict | None = None, asan: Asan | None = None):
        # RUST_BACKTRACE=0: with backtraces on, the tokenizers engine's first panic (a
        # malformed tokenizer.json, reported as one line) symbolizes its stack: ~50 MiB
        env = dict(os.environ, LLMPRESS_FUZZ_AS_BYTES=str(as_bytes), OMP_NUM_THREADS="1",
                   RUST_BACKTRACE="0",
                   PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO),
                                               os.environ.get("PYTHONPATH", "")]))
        self.asan = asan
        if asan is not None:
            env.update(asan.environment())
            env["LLMPRESS_FUZZ_AS_BYTES"] = "0"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, text=True)
        ready = self._answer(120)
        if ready != {"ready": True}:
            raise RuntimeError(f"fuzz worker did not start: {ready}")
        if warm_up is not None:  # the first load imports and initializes libraries lazily
            # (about 19 MiB): paid here, not charged to the first measured case
            outcome, detail = self.run(warm_up, 120)
            if outcome != "ran":
                raise RuntimeError(f"fuzz worker's warm-up failed: {outcome} {detail}")

    def _answer(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {}

    def run(self, case: dict, timeout: float) -> tuple[str, dict]:
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        answer = self._answer(timeout)
        if answer is None:
            self.kill()
            return "hang", {}
        if not answer:  # EOF: the process died
            status = self.proc.wait()
            name = signal.Signals(-status).name if status < 0 else f"exit {status}"
            report = self.asan.report(self.proc.pid) if self.asan else None
            if report is not None:
                return "crash:asan", {"asan": report}
            return f"crash:{name}", {}
        return answer.pop("outcome"), answer

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass(frozen=True)
class Asan:
    """Workers whose C extensions are the AddressSanitizer build in `lib`; each report
    goes to log_dir/asan.<pid> and makes the case a native crash (crash:asan)."""
    lib: Path
    log_dir: Path

    @classmethod
    def build(cls, work: Path) -> Asan:
        lib, log_dir = work / "asan-lib", work / "asan-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        if not list(lib.rglob("_qmatmul*.so")):
            subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib",
                            str(lib), "--build-temp", str(work / "asan-tmp")], cwd=REPO,
                           check=True, env=dict(os.environ, LLMPRESS_SANITIZE="address"))
        return cls(lib, log_dir)

    def prove(self, as_bytes: int) -> None:
        """A deliberate overflow in the C code must come back as crash:asan."""
        worker = Worker(as_bytes, None, self)
        outcome, detail = worker.run({"kind": "asan-canary"}, 120)
        worker.kill()
        if outcome != "crash:asan":
            raise RuntimeError(f"the ASAN build did not report a heap overflow: {outcome}")
        print(f"ASAN canary: {detail['asan'][:160]}", file=sys.stderr)

    def environment(self) -> dict[str, str]:
        runtime = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        # python itself is not instrumented: the runtime must come first (LD_PRELOAD);
        # a giant allocation returns NULL (MemoryError) as without ASAN
        return {"LD_PRELOAD": runtime, "LLMPRESS_FUZZ_ASAN_LIB": str(self.lib),
                "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:"
                                f"handle_abort=0:log_path={self.log_dir / 'asan'}"}

    def report(self, pid: int) -> str | None:
        """The first lines of worker pid's ASAN report, if it wrote one."""
        path = self.log_dir / f"asan.{pid}"
        if not path.exists():
            return None
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
        return " | ".join(lines[1:4])[:600]


def run_campaign(seeds: Seeds, work: Path, kinds: list[str], seed: int = 0, jobs: int = 2,
                 timeout: float = 60.0, as_bytes: int = 4 << 30, keep: Path | None = None,
                 progress=None, asan: Asan | None = None) -> list[Result]:
    work.mkdir(parents=True, exist_ok=True)
    maker = Maker(seeds, work, seed)
    todo: queue.Queue = queue.Queue()
    for i, kind in enumerate(kinds):
        todo.put((i, kind))
    results: list[Result] = []
    lock = threading.Lock()

    warm_up = {"kind": "gguf", "path": str(seeds.tiny_ggufs[0])}

    def loop() -> None:
        worker = Worker(as_bytes, warm_up, asan)
        try:
            while True:
                try:
                    i, kind = todo.get_nowait()
                except queue.Empty:
                    return
                case, seed_name, path = maker.make(i, kind)
                size = input_size(case)
                start = time.perf_counter()
                outcome, detail = worker.run(case, timeout)
                if asan is None:  # ASAN's shadow memory and quarantine inflate the RSS
                    outcome = judge_allocation(outcome, detail, size)
                result = Result(i, kind, seed_name, outcome, detail, time.perf_counter() - start,
                                size)
                if outcome not in ACCEPTABLE and keep is not None and path is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    (shutil.copytree if path.is_dir() else shutil.copy)(path, keep / path.name)
                if outcome not in ACCEPTABLE and kind == "template" and keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"case-{i}.jinja").write_text(case["template"][:1_000_000])
                if path is not None:
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                with lock:
                    results.append(result)
                    if progress:
                        progress(result, len(results), len(kinds))
                if not worker.alive:
                    worker = Worker(as_bytes, warm_up, asan)
        finally:
            worker.kill()

    threads = [threading.Thread(target=loop) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r.case)


def table(results: list[Result]) -> str:
    """Outcomes per kind of input, as a Markdown table."""
    kinds = [k for k in KINDS if any(r.kind == k for r in results)]
    outcomes = sorted({r.outcome for r in results},
                      key=lambda o: (o not in ACCEPTABLE, ACCEPTABLE.index(o)
                                     if o in ACCEPTABLE else 0, o))
    counts = Counter((r.kind, r.outcome) for r in results)
    lines = ["| outcome | " + " | ".join(kinds) + " |",
             "|---|" + "---:|" * len(kinds)]
    for o in outcomes:
        lines.append(f"| {o} | " + " | ".join(str(counts[k, o]) for k in kinds) + " |")
    lines.append("| total | " + " | ".join(str(sum(r.kind == k for r in results))
                                           for k in kinds) + " |")
    return "\n".join(lines)


def memory_summary(results: list[Result]) -> str:
    """Per kind: the case whose memory growth came closest to its allowance."""
    lines = []
    for kind in [k for k in KINDS if k != "http" and any(r.kind == k for r in results)]:
        worst = max((r for r in results if r.kind == kind),
                    key=lambda r: r.detail.get("grew", 0) / (2 * r.size + ALLOC_FLOOR))
        grew, allowed = worst.detail.get("grew", 0), 2 * worst.size + ALLOC_FLOOR
        lines.append(f"{kind}: most memory: case {worst.case}, grew {grew / 2**20:.1f} MiB for "
                     f"a {worst.size / 2**20:.1f} MiB input ({grew / allowed:.0%} of the "
                     "allowance)")
    return "\n".join(lines)


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if r.outcome not in ACCEPTABLE or (
        r.outcome == "error" and not r.detail.get("one_line", True))]
