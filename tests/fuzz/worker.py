"""The sandboxed side of the fuzzer: a process that runs one case after another, each
read as a JSON line on stdin, and answers one JSON line per case on stdout.

It runs under an address-space limit (RLIMIT_AS), so a size field that drives a giant
allocation shows as MemoryError instead of swapping the machine. A native crash or a hang
kills only this process: the runner sees the signal or the timeout and starts another.
Run as `python -m tests.fuzz.worker`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


def run_case(case: dict) -> None:
    """What a user does with the input: load the model, render its chat template, ask for
    two tokens; a template alone is rendered."""
    if case["kind"] == "asan-canary":  # a heap overflow in the C code, on purpose
        overflow_in_c()
        return
    if case["kind"] == "template":
        from llmpress.io.chat_template import render_chat
        render_chat(case["template"], MESSAGES)
        return
    import llmpress
    lm = llmpress.load(case["path"], ctx=64, device="cpu")
    prompt = lm.chat_prompt(MESSAGES)
    lm.generate(prompt, max_tokens=2, temperature=0)
    lm.generate("Hello", max_tokens=2, temperature=0.8, seed=1)


def _status_kib(name: str) -> int:
    return int(re.search(rf"^{name}:\s+(\d+) kB", open("/proc/self/status").read(), re.M)[1])


def measured(case: dict) -> dict:
    """classify(case), with `grew`: the case's peak resident memory above what the
    process held before it, in bytes. The kernel's high-water mark (VmHWM) is reset first
    (clear_refs 5), so a reused worker measures each case from its own start; resident
    pages count what was really touched (a reserved but unused range costs nothing), and
    the model file's mapped pages count once they are read."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    result = classify(case)
    result["grew"] = max(0, _status_kib("VmHWM") - before) * 1024
    return result


def overflow_in_c() -> None:
    """Quantize 4 rows into a buffer for 1 (the length the C code is given is a lie):
    proves that --asan reports a bad write inside the extensions."""
    import ctypes

    import numpy as np

    from llmpress.formats import cquant
    values, out = np.ones((4, 32), np.float32), np.empty(34, np.uint8)  # Q8_0: 34 bytes a row
    cquant._library().llmpress_quantize(8, values.ctypes.data, out.ctypes.data, 4, 32, None,
                                        1, ctypes.byref(ctypes.c_int64(-1)))


def classify(case: dict) -> dict:
    from llmpress.errors import LlmpressError
    try:
        run_case(case)
        return {"outcome": "ran"}
    except LlmpressError as exc:
        message = str(exc)
        return {"outcome": "error", "message": message[:300],
                "one_line": "\n" not in message and bool(message)}
    except MemoryError:
        return {"outcome": "memory"}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # what the CLI would call an internal error
        import traceback
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return {"outcome": "exception", "type": type(exc).__name__,
                "message": str(exc)[:300], "where": f"{where.filename}:{where.lineno}"}


def use_asan_build(lib: str) -> None:
    """Load the C extensions from the AddressSanitizer build under lib (setup.py with
    LLMPRESS_SANITIZE=address) instead of the normal ones."""
    import importlib.util

    import llmpress.formats
    import llmpress.kernels
    for package in (llmpress.kernels, llmpress.formats):
        package.__path__.insert(0, os.path.join(lib, *package.__name__.split(".")))
    for name in ("llmpress.kernels._qmatmul", "llmpress.formats._quantize"):
        origin = importlib.util.find_spec(name).origin
        if not origin.startswith(lib):
            raise SystemExit(f"{name} is not the ASAN build: {origin}")


def main() -> None:
    limit = int(os.environ.get("LLMPRESS_FUZZ_AS_BYTES", 4 << 30))
    if limit:  # 0 under ASAN, whose shadow memory reserves terabytes of address space
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if os.environ.get("LLMPRESS_FUZZ_ASAN_LIB"):
        use_asan_build(os.environ["LLMPRESS_FUZZ_ASAN_LIB"])
    import torch
    torch.set_num_threads(1)
    import llmpress.api  # noqa: F401 (imported once, before the first case's clock starts)
    out = sys.stdout
    sys.stdout = sys.stderr  # whatever a case prints must not mix with the answers
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        result = measured(json.loads(line))
        print(json.dumps(result), file=out, flush=True)


if __name__ == "__main__":
    main()
