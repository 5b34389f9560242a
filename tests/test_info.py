"""adopt info / adopt.environment_info(): what a bug report needs."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

import adopt
from adopt import _fused, cli, info


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


def test_info_prints_versions_kernel_and_devices() -> None:
    code, text = _run(["info"])
    assert code == 0
    for line in (f"adopt: {adopt.__version__}", f"torch: {torch.__version__}",
                 f"built: {_fused.fused_cpu_available()}", "cuda:", "triton:", "torch_threads:"):
        assert line in text, line


def test_info_json_matches_the_public_function() -> None:
    code, text = _run(["info", "--json"])
    assert code == 0
    printed = json.loads(text)
    assert printed == json.loads(json.dumps(adopt.environment_info()))
    kernel = printed["fused_cpu_kernel"]
    if kernel["built"]:
        assert kernel["openmp"] in (True, False) and kernel["tensor_access"] in ("inline", "cdata")
        assert kernel["avx512_state_step"] in (True, False)
        assert kernel["neg_view_detection"] in ("bit", "is_neg")


def test_info_says_why_the_kernel_is_missing_and_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "_CPU_KERNEL", None)
    monkeypatch.setattr(_fused, "_CPU_KERNEL_ERROR", "No module named 'adopt._kernels._adopt_cpu'")
    kernel = adopt.environment_info()["fused_cpu_kernel"]
    assert kernel == {"built": False, "why_not": "No module named 'adopt._kernels._adopt_cpu'",
                      "fix": kernel["fix"]}
    assert "C compiler" in kernel["fix"]


@pytest.mark.parametrize(
    "flags,level",
    [
        ({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe",
          "abm"}, "x86-64-v4 (AVX-512)"),
        ({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "avx512f"}, "x86-64-v3 (AVX2, FMA)"),
        ({"sse2", "avx"}, "baseline x86-64 (SSE2)"),
    ],
)
def test_simd_level_is_the_clone_the_loader_picks(monkeypatch: pytest.MonkeyPatch, flags: set[str], level: str) -> None:
    monkeypatch.setattr(info.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(info.sys, "platform", "linux")
    monkeypatch.setattr(info, "_cpu_flags", lambda: flags)
    assert info._simd_level() == level
