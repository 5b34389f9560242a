"""What a wheel and an sdist of the package contain, and how the C extension is linked."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from adopt import _fused

ROOT = Path(__file__).resolve().parents[1]


def _elf_dynamic_tags(path: Path) -> str:
    return subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs Linux and readelf")
@pytest.mark.skipif(not _fused.fused_cpu_available(), reason="the C kernel was not built")
def test_kernel_has_no_debug_info_and_no_runpath() -> None:
    kernel = _fused._CPU_KERNEL
    assert kernel is not None and kernel.__file__ is not None
    so = Path(kernel.__file__)
    sections = subprocess.run(["readelf", "-S", str(so)], capture_output=True, text=True, check=True).stdout
    if ".debug_info" in sections:
        pytest.skip("built with debug information on purpose (ADOPT_DEBUG=1, e.g. the sanitizer build)")
    tags = _elf_dynamic_tags(so)
    assert "RUNPATH" not in tags and "RPATH" not in tags, tags
    # Stripped, the kernel is a few hundred KB (each loop in three instruction-set clones,
    # the cautious step's two passes, the low-memory state step's block workers and the
    # 16-bit stochastic-rounding pair loops included: ~560 KB); debug information would add
    # megabytes.
    assert so.stat().st_size < 700_000


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler")
def test_wheel_holds_the_compiled_kernel_and_license_but_no_c_sources(tmp_path: Path) -> None:
    src = tmp_path / "src-copy"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name.endswith(".so") or not (ROOT / name).is_file():
            continue
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("adopt/_kernels/_adopt_cpu") for n in names), names
    assert any(n.endswith("licenses/LICENSE") for n in names), names
    assert not [n for n in names if n.endswith((".c", ".h"))], names
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Project-URL: Paper, https://arxiv.org/abs/2411.02853" in text and "License-File: LICENSE" in text
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=src, check=True,
                   capture_output=True, text=True, timeout=300)
    (sdist,) = out.glob("*.tar.gz")
    import tarfile

    members = [m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m]
    for needed in ("LICENSE", "src/adopt/_kernels/adopt_cpu.c", "src/adopt/_kernels/adopt_cpu.h",
                   "src/adopt/_kernels/adopt_cpu_module.c"):
        assert needed in members, needed
