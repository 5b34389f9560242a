"""The command line and ``adopt demo --quick``: results, outputs, help and argument errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import adopt
from adopt import cli

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _python_m_adopt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m adopt ARGS`` in a fresh interpreter that imports this checkout's adopt."""
    env = dict(os.environ)
    src = str(Path(adopt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return subprocess.run(
        [sys.executable, "-m", "adopt", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One in-process ``adopt demo --quick`` shared by the tests that read its results."""
    out_dir = tmp_path_factory.mktemp("demo")
    code, stdout, stderr = _run_cli(["demo", "--quick", "--out", str(out_dir)])
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out_dir}


def _final(results: dict[str, Any], optimizer: str, beta2: float) -> float:
    return results["toy"]["optimizers"][optimizer][str(beta2)]["final_mean"]


def test_quick_run_succeeds_and_writes_png_and_json(quick_run: dict[str, Any]) -> None:
    assert quick_run["code"] == 0, quick_run["stderr"]
    png = (quick_run["out"] / "demo.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    results = json.loads((quick_run["out"] / "demo.json").read_text())
    assert results["quick"] is True
    assert set(results) >= {"toy", "digits", "reading", "seconds"}
    assert results["toy"]["setup"]["steps"] == 3000
    for setting in results["digits"]["settings"]:
        for name, r in results["digits"]["results"][setting].items():
            assert 0.5 < r["test_accuracy_mean"] <= 1.0, (setting, name)
            assert len(r["train_loss_mean"]) == results["digits"]["setup"]["epochs"] + 1


def test_quick_run_shows_the_papers_toy_result(quick_run: dict[str, Any]) -> None:
    results = json.loads((quick_run["out"] / "demo.json").read_text())
    # Adam drifts to the wrong end at small beta2 ...
    assert _final(results, "Adam", 0.1) > 0.25
    # ... while unclipped ADOPT heads for the optimum -1 at every beta2 (3000 steps only get
    # part of the way; the full run ends below -0.75) and below Adam.
    for beta2 in (0.1, 0.5, 0.9, 0.999):
        assert _final(results, "ADOPT (no clip)", beta2) < -0.2, beta2
        assert _final(results, "ADOPT (no clip)", beta2) < _final(results, "Adam", beta2), beta2


def test_quick_run_prints_table_and_a_reading_consistent_with_the_numbers(quick_run: dict[str, Any]) -> None:
    stdout = quick_run["stdout"]
    results = json.loads((quick_run["out"] / "demo.json").read_text())
    assert "Toy problem: final theta after 3000 steps" in stdout
    assert "Digits MLP: test accuracy" in stdout
    assert "What this run shows" in stdout
    assert "\n".join(results["reading"]) in stdout
    adam_line = next(line for line in results["reading"] if line.strip().startswith("Adam:"))
    expected = "near +1 (the wrong end) at beta2 = 0.1" if _final(results, "Adam", 0.1) > 0.5 else "in between"
    assert expected in adam_line
    assert str(quick_run["out"] / "demo.png") in stdout


def test_python_m_adopt_demo_quick(tmp_path: Path) -> None:
    proc = _python_m_adopt("demo", "--quick", "--out", "results", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "results" / "demo.png").read_bytes().startswith(PNG_SIGNATURE)
    json.loads((tmp_path / "results" / "demo.json").read_text())
    assert "What this run shows" in proc.stdout


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--steps", "-5", "must be a positive integer, got '-5'"),
        ("--steps", "ten", "expected a positive integer, got 'ten'"),
        ("--seeds", "0", "must be a positive integer, got '0'"),
        ("--epochs", "-1", "must be a positive integer, got '-1'"),
        ("--device", "tpu", "unknown device 'tpu'"),
        ("--device", "meta", "unsupported device 'meta'"),
        ("--experiments", "toy,mnist", "unknown experiment 'mnist'"),
        ("--experiments", ",", "unknown experiment"),
        ("--lm-steps", "0", "must be a positive integer, got '0'"),
    ],
)
def test_bad_arguments_give_a_clear_error_and_exit_code_2(flag: str, value: str, message: str, tmp_path: Path) -> None:
    code, stdout, stderr = _run_cli(["demo", flag, value, "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"argument {flag}: {message}" in stderr
    assert "usage: adopt demo" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["demo", "bench"])
def test_cuda_without_cuda_is_a_clear_error(command: str) -> None:
    """demo and bench word a missing device alike (one argument type, adopt._argtypes)."""
    code, _, stderr = _run_cli([command, "--device", "cuda"])
    assert code == 2
    assert "argument --device: 'cuda' requested but CUDA is not available here; use cpu" in stderr
    assert f"usage: adopt {command}" in stderr


def test_bench_refuses_a_device_kind_it_cannot_time() -> None:
    code, _, stderr = _run_cli(["bench", "--device", "mps"])
    assert code == 2
    assert "argument --device: unsupported device 'mps'; use cpu, cuda, cuda:N" in stderr


def test_out_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    existing = tmp_path / "file.txt"
    existing.write_text("not a folder")
    code, _, stderr = _run_cli(["demo", "--quick", "--out", str(existing)])
    assert code == 2
    assert "argument --out:" in stderr and "is not a directory" in stderr


def test_unknown_command_and_no_command(tmp_path: Path) -> None:
    code, _, stderr = _run_cli(["frobnicate"])
    assert code == 2 and "invalid choice: 'frobnicate'" in stderr
    code, _, stderr = _run_cli([])
    assert code == 2 and "demo" in stderr and "bench" in stderr


@pytest.mark.parametrize(
    ("module", "dist"), [("matplotlib", "matplotlib"), ("tqdm", "tqdm"), ("sklearn", "scikit-learn")]
)
def test_missing_demo_dependency_says_what_to_install(
    module: str, dist: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    code, stdout, stderr = _run_cli(["demo", "--quick", "--out", str(tmp_path / "out")])
    assert code == 2
    assert dist in stderr and 'pip install ".[demo]" (in a clone of the repository)' in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not (tmp_path / "out").exists()


def test_help_texts() -> None:
    code, stdout, _ = _run_cli(["--help"])
    assert code == 0
    assert "demo" in stdout and "bench" in stdout and "info" in stdout and "adopt demo --quick" in stdout
    code, stdout, _ = _run_cli(["demo", "--help"])
    assert code == 0
    for flag in ("--steps", "--seeds", "--epochs", "--device", "--out", "--quick", "--experiments", "--lm-steps"):
        assert flag in stdout
    assert "about 30 seconds" in stdout and "demo.png" in stdout and "precision" in stdout


def test_version() -> None:
    code, stdout, _ = _run_cli(["--version"])
    assert code == 0
    assert stdout.startswith("adopt ") and stdout.strip() != "adopt"


def test_python_m_adopt_help(tmp_path: Path) -> None:
    proc = _python_m_adopt("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m adopt" in proc.stdout and "demo" in proc.stdout
    proc = _python_m_adopt("demo", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout


def _toy(steps: int, adam: float, adopt: float) -> dict:
    from adopt.demo.toy import BETA2S

    cells = lambda v: {str(b): {"final_mean": v} for b in BETA2S}  # noqa: E731
    return {"setup": {"steps": steps, "seeds": 4}, "optimizers": {"Adam": cells(adam), "ADOPT (no clip)": cells(adopt)}}


def _digits(epochs: int, adam_curve: list[float]) -> dict:
    result = lambda acc, curve: {"test_accuracy_mean": acc, "test_accuracy_std": 0.01, "train_loss_mean": curve}  # noqa: E731
    steady = [2.0, 1.0, 0.5]
    return {"setup": {"epochs": epochs, "seeds": 4}, "settings": ["default beta2", "beta2 = 0.5"],
            "results": {"default beta2": {"ADOPT": result(0.95, steady), "Adam": result(0.95, steady)},
                        "beta2 = 0.5": {"ADOPT": result(0.95, steady), "Adam": result(0.90, adam_curve)}}}


def test_a_short_run_says_what_it_cannot_show() -> None:
    from adopt.demo import report

    short = {"toy": _toy(3000, 0.9, -0.9), "digits": _digits(3, [2.0, 1.0, 0.5])}
    limits = report.run_limits(short)
    assert len(limits) == 2 and "6561" in limits[0] and "3 epochs" in limits[1]
    assert "a short run" in report.finding(short)
    # long enough, or the instability already visible: nothing to excuse
    assert report.run_limits({"toy": _toy(20000, 0.9, -0.9), "digits": _digits(30, [2.0, 1.0, 0.5])}) == []
    assert report.run_limits({"digits": _digits(3, [2.0, 0.1, 1.9])}) == []


def test_the_figure_title_states_the_finding_from_the_numbers() -> None:
    from adopt.demo import report

    title = report.finding({"toy": _toy(20000, 0.9, -0.9), "digits": _digits(30, [2.0, 1.0, 0.5])})
    assert "Adam ends near the wrong end (+1) at β$_2$ = 0.1, 0.5, 0.9, 0.999" in title
    assert "unclipped ADOPT near the optimum (−1) at β$_2$ = 0.1, 0.5, 0.9, 0.999" in title
    assert "ADOPT +0.0, Adam -5.0 points" in title and "short run" not in title
    assert "at β$_2$ = none" in report.finding({"toy": _toy(20000, 0.0, 0.0)})


def test_quick_precision_run_writes_png_json_and_prints_the_table(tmp_path: Path) -> None:
    code, stdout, stderr = _run_cli(["demo", "--quick", "--experiments", "precision", "--out", str(tmp_path)])
    assert code == 0, stderr
    assert (tmp_path / "demo.png").read_bytes().startswith(PNG_SIGNATURE)
    results = json.loads((tmp_path / "demo.json").read_text())
    assert "toy" not in results and "digits" not in results
    precision = results["precision"]
    assert precision["setup"]["seeds"] == 3
    setup = precision["tasks"]["charlm"]["setup"]
    assert setup["steps"] == 30 and setup["characters"] > 100_000 and "textwrap.py" in setup["files"]
    assert setup["val_characters"] > 0.05 * setup["characters"]
    for task in ("digits", "charlm"):
        summary = precision["tasks"][task]["summary"]
        assert list(summary) == ["float32", "bfloat16, nearest", "bfloat16, stochastic"]
        for cell in summary.values():
            assert all(0 < cell[split]["mean"] < 10 and cell[split]["std"] >= 0 for split in ("train", "val"))
    assert "Pure bfloat16 training with ADOPT: final loss" in stdout
    assert "bfloat16, stochastic" in stdout and "\n".join(results["reading"]) in stdout


def test_stochastic_rounding_keeps_the_progress_that_nearest_rounding_loses() -> None:
    """At a learning rate whose updates are mostly below half a bfloat16 ulp, measured at a
    fixed seed: stochastic rounding lowers the training loss as much as float32 does (0.98 to
    1.01 of it measured, 0.9 required), round-to-nearest far less (0.28 to 0.40 of it measured,
    below 0.6 required)."""
    from adopt.demo import charlm
    from adopt.demo.precision import VARIANTS, train_digits

    corpus = charlm.load_corpus()
    tiny = charlm.CharLMConfig(width=32, layers=1, batch_size=8, eval_windows=32)
    tasks = {
        "digits": lambda kw, dtype: train_digits(kw, dtype, 1, 2, torch.device("cpu")),
        "charlm": lambda kw, dtype: charlm.train_charlm(kw, dtype, 20, 2, corpus, tiny, evaluations=1),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for task, train in tasks.items():
            drop = {}
            for name, (dtype, rounding) in VARIANTS.items():
                curves = train({"lr": 1e-4, "stochastic_rounding": rounding}, dtype)["train_loss"]
                drop[name] = [curve[0] - curve[-1] for curve in curves]
            for ref, nearest, sr in zip(drop["float32"], drop["bfloat16, nearest"], drop["bfloat16, stochastic"]):
                assert ref > 0, task
                assert sr > 0.9 * ref, (task, drop)
                assert nearest < 0.6 * sr, (task, drop)
    finally:
        torch.set_num_threads(threads)
