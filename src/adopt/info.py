"""What a bug report needs to know about this installation: ``adopt info`` and
:func:`environment_info`.

Versions (package, torch, Python), whether the fused CPU kernel is built and how it runs
(the instruction set its loader picks, OpenMP and the runtime it uses, how it reads tensors),
torch's thread count, and whether Triton and CUDA are there, with the devices.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

import torch

from . import _fused

# The target_clones the kernel is built with, widest first, and the CPU flags each needs
# (GCC's x86-64 micro-architecture levels, as /proc/cpuinfo names the flags).
_X86_LEVELS = (
    ("x86-64-v4 (AVX-512)", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3 (AVX2, FMA)", {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}),  # abm: LZCNT
)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _simd_level() -> str:
    """The kernel clone the dynamic loader picks on this CPU (x86-64 Linux), else the build's."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return "compiler default for this platform (no target clones)"
    flags = _cpu_flags()
    for name, needed in _X86_LEVELS:
        if needed <= flags:
            return name
    return "baseline x86-64 (SSE2)"


def _openmp_runtime() -> str:
    """The OpenMP library mapped into this process (Linux), which the kernel shares with torch."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "omp" in line.rsplit("/", 1)[-1] and "/" in line})
    except OSError:
        return "unknown"
    return ", ".join(libs) or "none mapped"


def _triton() -> dict[str, Any]:
    try:
        import triton
    except ImportError:
        return {"installed": False}
    return {"installed": True, "version": triton.__version__}


def environment_info() -> dict[str, Any]:
    """Everything ``adopt info`` prints, as a JSON-serialisable dict."""
    from . import __version__  # set by the package's __init__, which imports this module
    kernel = _fused._CPU_KERNEL
    cpu: dict[str, Any] = {"built": kernel is not None}
    if kernel is None:
        cpu["why_not"] = _fused._CPU_KERNEL_ERROR or "unknown"
        cpu["fix"] = "reinstall with a C compiler available (Debian/Ubuntu: apt install gcc python3-dev)"
    else:
        cpu.update(
            file=kernel.__file__,
            simd=_simd_level(),
            avx512_state_step=bool(kernel.avx512_available()),
            openmp=bool(kernel.has_openmp()),
            openmp_runtime=_openmp_runtime(),
            tensor_access=kernel.tensor_access(),
            neg_view_detection=kernel.neg_view_detection(),
        )
    cuda: dict[str, Any] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if cuda["available"]:
        cuda["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "adopt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "fused_cpu_kernel": cpu,
        "triton": _triton(),
        "cuda": cuda,
    }


def format_info(info: dict[str, Any], indent: int = 0) -> str:
    """``info`` as indented ``key: value`` lines."""
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{' ' * indent}{key}:")
            lines.append(format_info(value, indent + 2))
        else:
            lines.append(f"{' ' * indent}{key}: {value}")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the same as JSON")


def run(args: argparse.Namespace) -> int:
    info = environment_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
