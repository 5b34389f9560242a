"""Build of the optional fused CPU kernel (``adopt._kernels._adopt_cpu``).

All package metadata lives in pyproject.toml; this file only adds the C extension. The
extension is optional: when no compiler is available or the build fails, ``pip install``
still succeeds and ``adopt`` falls back to the foreach path with a one-time warning.

Compiler flags are probed rather than assumed, so one build works with GCC, Clang and
compilers without OpenMP:

* ``-O3 -fno-math-errno -fno-trapping-math`` let the element loops vectorise (sqrt without
  errno, selects instead of branches); ``-ffp-contract=off`` keeps rounding identical on
  every instruction set.
* ``-fopenmp`` when it compiles and links (else ``-fopenmp-simd``: vectorised, one thread).
  On Linux the kernel then shares PyTorch's bundled ``libgomp.so.1`` (same soname, already
  loaded when ``adopt`` imports the kernel), so there is one OpenMP thread pool.
* ``-g0`` and a stripped link (``-Wl,-s``), and no RUNPATH of the build machine's Python:
  the shipped module is ~140 KB instead of ~500 KB and points nowhere it should not.
* No ``-march=native``: on x86-64 Linux with glibc the kernel is compiled for AVX-512,
  AVX2 and baseline SSE2 at once (``target_clones``) and the dynamic loader picks the best
  for the CPU it runs on, so a wheel built on one machine is fast and safe on another.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL_DIR = os.path.join("src", "adopt", "_kernels")

_CLONES_PROBE = """
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
int probe(int x) { return x + 1; }
int main(void) { return probe(-1); }
"""
_OPENMP_PROBE = """
#include <omp.h>
int main(void) {
    int n = 0;
#pragma omp parallel reduction(+ : n)
    n += omp_get_num_threads() > 0;
    return n > 0 ? 0 : 1;
}
"""
_EMPTY_PROBE = "int main(void) { return 0; }\n"


class BuildExt(build_ext):
    """build_ext that picks the kernel's compiler flags by trying them."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "adopt._kernels._adopt_cpu":
            # Python's own link line may carry -Wl,-rpath,<its lib dir> (pyenv, conda): an
            # extension loaded into that Python needs no search path of its own.
            linker = getattr(self.compiler, "linker_so", None)
            if isinstance(linker, list):
                self.compiler.linker_so = [a for a in linker if not a.startswith(("-Wl,-rpath", "-Wl,--enable-new-dtags"))]
            compile_args, link_args, macros = self._kernel_flags()
            ext.extra_compile_args = [*ext.extra_compile_args, *compile_args]
            ext.extra_link_args = [*ext.extra_link_args, *link_args]
            ext.define_macros = [*ext.define_macros, *macros]
        super().build_extension(ext)

    def _kernel_flags(self) -> tuple[list[str], list[str], list[tuple[str, Any]]]:
        if self.compiler.compiler_type == "msvc":
            return ["/O2", "/openmp", "/fp:precise"], [], []
        compile_args = ["-O3"]
        for flag in ("-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fvisibility=hidden"):
            if self._try(_EMPTY_PROBE, [flag]):
                compile_args.append(flag)
        # Debug information off unless asked for (ADOPT_DEBUG=1, e.g. for the sanitizer build).
        debug = os.environ.get("ADOPT_DEBUG") == "1"
        if not debug and self._try(_EMPTY_PROBE, ["-g0"]):
            compile_args.append("-g0")
        link_args: list[str] = []
        if not debug and sys.platform.startswith("linux") and self._try(_EMPTY_PROBE, [], ["-Wl,-s"]):
            link_args.append("-Wl,-s")
        if os.environ.get("ADOPT_NO_OPENMP") != "1" and self._try(_OPENMP_PROBE, ["-fopenmp"], ["-fopenmp"]):
            compile_args.append("-fopenmp")
            link_args.append("-fopenmp")
        elif self._try(_EMPTY_PROBE, ["-fopenmp-simd"]):
            compile_args.append("-fopenmp-simd")
        macros: list[tuple[str, Any]] = []
        x86_64 = platform.machine().lower() in ("x86_64", "amd64")
        glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
        if x86_64 and glibc and self._try(_CLONES_PROBE, ["-O2"]):
            macros.append(("ADOPT_TARGET_CLONES", "1"))
        return compile_args, link_args, macros

    def _try(self, source: str, compile_args: list[str], link_args: list[str] | None = None) -> bool:
        """Whether `source` compiles (with -Werror, so unknown flags fail) and links."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.c")
            with open(path, "w") as f:
                f.write(source)
            try:
                objects = self.compiler.compile([path], output_dir=tmp, extra_postargs=[*compile_args, "-Werror"])
                self.compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=link_args or [])
            except Exception:  # any compiler or linker failure means "not supported"
                return False
        return True


setup(
    ext_modules=[
        Extension(
            "adopt._kernels._adopt_cpu",
            sources=[os.path.join(KERNEL_DIR, "adopt_cpu.c"), os.path.join(KERNEL_DIR, "adopt_cpu_module.c")],
            depends=[os.path.join(KERNEL_DIR, "adopt_cpu.h"), os.path.join(KERNEL_DIR, "adopt_cpu_avx512.h")],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
