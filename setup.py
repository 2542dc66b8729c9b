"""Builds the optional CPU matmul kernel. If no C compiler is present the install still
succeeds and llmpress falls back to exact dequantize-then-multiply (slower).

LLMPRESS_SANITIZE=address builds both extensions with AddressSanitizer, for the fuzzer
(`python -m tests.fuzz --asan` builds them so itself); give it its own --build-lib so
the normal build stays as it is:
    LLMPRESS_SANITIZE=address python setup.py build_ext --build-lib build/asan \
        --build-temp build/asan-tmp
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler: the pure-torch path still works
            print(f"warning: llmpress CPU kernel not built ({exc}); using the torch fallback")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"warning: llmpress CPU kernel not built ({exc}); using the torch fallback")


KERNEL_DIR = "src/llmpress/kernels/"
kernel = Extension(
    "llmpress.kernels._qmatmul",
    sources=[KERNEL_DIR + name for name in
             ("qmatmul.c", "qdot_portable.c", "qdot_avx2.c", "decode.c")],
    depends=[KERNEL_DIR + "qdot.h", KERNEL_DIR + "qmatmul.h"],
    # No -march=native: the AVX2 kernels are compiled for AVX2 in their own file and
    # chosen at run time from the CPU's flags, so one build runs on any x86-64.
    # fast-math lets the compiler vectorize the float reductions (their order is ours).
    extra_compile_args=["-O3", "-ffast-math", "-fopenmp"],
    extra_link_args=["-fopenmp", "-lm"],  # -lm: the vectorized expf of -ffast-math
)

# The block quantizers (formats/quantize.c): byte-identical with ggml only if every float
# operation is the one ggml does, so no -ffast-math, no FMA contraction, no -march=native
# (ggml's libggml-base is built for baseline x86-64). -fno-math-errno / -fno-trapping-math
# change no result, they only let sqrtf inline and branches vectorize.
quantizer = Extension(
    "llmpress.formats._quantize",
    sources=["src/llmpress/formats/" + name
             for name in ("quantize.c", "quantize_iq2.c", "quantize_iq3.c")],
    depends=["src/llmpress/formats/quantize.h"],
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                        "-fopenmp"],
    extra_link_args=["-fopenmp", "-lm"],
)
if os.environ.get("LLMPRESS_SANITIZE") == "address":  # checked, not fast: for the fuzzer
    for extension in (kernel, quantizer):
        extension.extra_compile_args += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
        extension.extra_link_args += ["-fsanitize=address"]
setup(ext_modules=[kernel, quantizer], cmdclass={"build_ext": OptionalBuildExt})
