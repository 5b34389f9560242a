"""``adopt bench --state-precision``: rows per state precision, measured state bytes, rooflines.

In-process runs on a tiny case (well under a second of timing each); they check the output's
shape and the measured state bytes, not the timings (those depend on the machine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adopt import bench

TINY = ["--sizes", "8192:2", "--repeats", "3", "--warmup", "1", "--cache", "warm", "--paths", "adopt-foreach,adamw-fused"]


def _bench(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, "--out", str(out), *extra]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_each_precision_gets_its_rows_state_bytes_and_roofline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table, report = _bench(tmp_path, capsys, "--state-precision", "8bit,full,bf16", "--min-8bit-size", "0")
    assert report["config"]["state_precisions"] == ["full", "bf16", "8bit"] and report["config"]["min_8bit_size"] == 0
    (case,) = report["cases"]
    rows = {row["path"]: row for row in case["results"]}
    assert list(rows) == ["adopt-foreach/full", "adopt-foreach/bf16", "adopt-foreach/8bit", "adamw-fused"]
    expected = {"adopt-foreach/full": (8.0, 28), "adopt-foreach/bf16": (4.0, 20),
                "adopt-foreach/8bit": (2 + 8 / 256, 16), "adamw-fused": (8.0, 28)}
    add_ms = case["roofline"]["add_ms"]
    for path, (state_bytes, moved) in expected.items():
        row = rows[path]
        assert row["state_bytes_per_param"] == pytest.approx(state_bytes)
        assert row["roofline_bytes_per_element"] == moved
        assert row["vs_roofline"] == pytest.approx(row["median_ms"] / (add_ms * moved / 12))
    assert rows["adopt-foreach/full"]["vs_full"] == 1.0
    assert rows["adopt-foreach/8bit"]["vs_full"] == pytest.approx(
        rows["adopt-foreach/8bit"]["median_ms"] / rows["adopt-foreach/full"]["median_ms"])
    assert "vs_full" not in rows["adamw-fused"]
    assert "state B/param" in table and "x full" in table and "adopt-foreach/8bit" in table and "2.031" in table


def test_small_tensors_keep_full_state_under_the_default_min_8bit_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """8192:2 is two tensors of 4096 elements: 8-bit at the default 4096, full above it."""
    _, report = _bench(tmp_path, capsys, "--state-precision", "8bit")
    assert report["config"]["min_8bit_size"] == 4096
    (row,) = [r for r in report["cases"][0]["results"] if r["path"] == "adopt-foreach/8bit"]
    assert row["state_bytes_per_param"] == pytest.approx(2 + 8 / 256)
    _, report = _bench(tmp_path, capsys, "--state-precision", "8bit", "--min-8bit-size", "4097")
    (row,) = [r for r in report["cases"][0]["results"] if r["path"] == "adopt-foreach/8bit"]
    assert row["state_bytes_per_param"] == 8.0


def test_a_peer_that_is_not_installed_is_a_skipped_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.PEER_PATHS, "bnb-adam8bit", ("adopt_no_such_package", "adopt_no_such_package.Adam8bit"))
    table, report = _bench(tmp_path, capsys, "--state-precision", "8bit", "--paths", "adopt-foreach,bnb-adam8bit")
    rows = {row["path"]: row for row in report["cases"][0]["results"]}
    assert rows["bnb-adam8bit"] == {"path": "bnb-adam8bit", "skipped": "adopt_no_such_package is not installed",
                                    "cache": "warm"}
    assert "median_ms" in rows["adopt-foreach/8bit"]
    assert "skipped: adopt_no_such_package is not installed" in table


@pytest.mark.parametrize("argv", [["--state-precision", "4bit"], ["--state-precision", ""], ["--min-8bit-size", "-1"],
                                  ["--paths", "bnb-adam4bit"]])
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_roofline_bytes_and_path_names() -> None:
    assert [bench.row_bytes_per_element(p, 4) for p in ("adopt-fused/full", "adopt-fused/bf16", "adopt-fused/8bit",
                                                          "adamw-fused", "bnb-adam8bit", "torchao-adamw8bit")] == [
        28, 20, 16, 28, 16, 16]
    assert bench.row_bytes_per_element("adopt-fused/8bit", 2) == 10
    assert bench.state_paths(("adopt-fused", "adamw-fused", "bnb-adam8bit"), ("full", "8bit")) == (
        "adopt-fused/full", "adopt-fused/8bit", "adamw-fused", "bnb-adam8bit")
    assert bench.split_path("adopt-fused/bf16") == ("adopt-fused", "bf16") and bench.split_path("adamw-fused") == (
        "adamw-fused", None)


def test_state_bytes_count_every_storage_once_and_skip_steps_and_seeds() -> None:
    p = torch.nn.Parameter(torch.zeros(100))
    q = torch.nn.Parameter(torch.zeros(50))
    optimizer = torch.optim.SGD([p, q], lr=0.1)
    table = torch.zeros(256)
    optimizer.state[p] = {"step": torch.zeros(()), "seed": torch.zeros((), dtype=torch.int64),
                          "codes": torch.zeros(100, dtype=torch.uint8), "qmap": table}
    optimizer.state[q] = {"step": 3, "codes": torch.zeros(50, dtype=torch.uint8), "qmap": table}
    assert bench.state_nbytes(optimizer) == 150 + 1024
    assert bench.state_bytes_per_parameter(optimizer) == pytest.approx(1174 / 150)


def test_help_explains_the_state_precision_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert "--state-precision" in out and "--min-8bit-size" in out and "Adam8bit" in out and "16 bytes" in out
