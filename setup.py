"""Builds the optional CPU matmul kernel. If no C compiler is present the install still
succeeds and llmpress falls back to exact dequantize-then-multiply (slower)."""

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


kernel = Extension(
    "llmpress.kernels._qmatmul",
    sources=["src/llmpress/kernels/qmatmul.c", "src/llmpress/kernels/decode.c"],
    # native: the kernel is built on the machine that runs it; fast-math lets the
    # compiler vectorize the per-block reductions (the sums' order is ours to choose).
    extra_compile_args=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
    extra_link_args=["-fopenmp", "-lm"],  # -lm: the vectorized expf of -ffast-math
)

# The block quantizers (formats/quantize.c): byte-identical with ggml only if every float
# operation is the one ggml does, so no -ffast-math, no FMA contraction, no -march=native
# (ggml's libggml-base is built for baseline x86-64). -fno-math-errno / -fno-trapping-math
# change no result, they only let sqrtf inline and branches vectorize.
quantizer = Extension(
    "llmpress.formats._quantize",
    sources=["src/llmpress/formats/quantize.c"],
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                        "-fopenmp"],
    extra_link_args=["-fopenmp", "-lm"],
)
setup(ext_modules=[kernel, quantizer], cmdclass={"build_ext": OptionalBuildExt})
