"""``adopt bench --cache``: the cache-cold timings, their table rows and their JSON.

The runs are in-process, on a tiny case with a small flush buffer, so each takes well under
a second; they check the output's shape, not the figures (those depend on the machine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from adopt import bench

# adopt-foreach and adamw-fused need no compiled kernel and give the "x AdamW fused" column.
TINY = ["--sizes", "4k:4", "--repeats", "5", "--warmup", "1", "--paths", "adopt-foreach,adamw-fused"]


def _bench(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, dict[str, Any]]:
    """Run ``python -m adopt.bench`` in-process; returns (the printed table, the JSON)."""
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, "--flush-mib", "1", "--out", str(out), *extra]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def _row_caches(table: str) -> list[str]:
    """The cache column of the table's rows for the case 4k/4, in order."""
    return [line.split()[1] for line in table.splitlines() if line.startswith("4k/4 ")]


def _check_rows(part: dict[str, Any], cache: str) -> None:
    rows = {row["path"]: row for row in part["results"]}
    assert set(rows) == {"adopt-foreach", "adamw-fused"}
    for row in rows.values():
        assert row["cache"] == cache and len(row["times_ms"]) == 5
        assert row["median_ms"] > 0 and row["vs_roofline"] > 0
        assert row["vs_roofline"] == pytest.approx(row["median_ms"] / part["roofline"]["roofline_ms"])
        assert row["vs_adamw_fused"] == pytest.approx(row["median_ms"] / rows["adamw-fused"]["median_ms"])
    assert rows["adamw-fused"]["vs_adamw_fused"] == 1.0
    roof = part["roofline"]
    assert roof["bytes_per_element"] == 28 and roof["roofline_ms"] == pytest.approx(roof["add_ms"] * 7 / 3)


def test_default_runs_warm_and_cold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table, report = _bench(tmp_path, capsys)
    assert report["config"]["cache"] == "both" and report["config"]["flush_bytes"] == 2**20
    (case,) = report["cases"]
    _check_rows(case, "warm")  # the warm figures stay at the top level of a case
    assert case["cold"]["flush_bytes"] == 2**20
    _check_rows(case["cold"], "cold")
    assert "warm roofline" in table and "cold roofline" in table and "1 MiB streamed" in table
    assert _row_caches(table) == ["warm"] * 2 + ["cold"] * 2
    for cache in ("warm", "cold"):
        for path in ("adopt-foreach", "adamw-fused"):
            assert sum(line.split()[:3] == ["4k/4", cache, path] for line in table.splitlines()) == 1


def test_cold_only_and_warm_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table, report = _bench(tmp_path, capsys, "--cache", "cold")
    (case,) = report["cases"]
    assert "results" not in case and "roofline" not in case
    _check_rows(case["cold"], "cold")
    assert "cold roofline" in table and "warm roofline" not in table and _row_caches(table) == ["cold"] * 2
    table, report = _bench(tmp_path, capsys, "--cache", "warm", "--dtype", "float64")
    (case,) = report["cases"]
    assert "cold" not in case and "flush_bytes" not in report["config"]
    assert case["roofline"]["bytes_per_element"] == 56
    assert "cold roofline" not in table and _row_caches(table) == ["warm"] * 2


def test_a_flush_comes_right_before_every_cold_timed_call() -> None:
    events: list[str] = []

    class Timer:
        def sync(self) -> None:
            events.append("sync")

        def __call__(self, fn: Callable[[], Any]) -> float:
            events.append("timed")
            fn()
            return 1.0

    steps = {"a": lambda: events.append("a"), "add": lambda: events.append("add")}
    progress = bench._Progress(0)
    progress.start = lambda label: None  # type: ignore[method-assign]
    times = bench._interleaved(
        steps, 10, 1, Timer(), progress, "x", ("warm", "cold"), lambda: events.append("flush")  # type: ignore[arg-type]
    )
    assert {mode: {name: len(t) for name, t in by_name.items()} for mode, by_name in times.items()} == {
        "warm": {"a": 10, "add": 10}, "cold": {"a": 10, "add": 10}
    }
    timed = [i for i, event in enumerate(events) if event == "timed"]
    cold = [i for i in timed if events[i - 2] == "flush"]
    assert len(cold) == 20 and all(events[i - 1] == "sync" and events[i + 1] in steps for i in cold)
    assert events.count("flush") == 20  # no flush anywhere else


def test_default_flush_exceeds_the_largest_cache() -> None:
    cache = bench.largest_cache_bytes(torch.device("cpu"))
    flush = bench.default_flush_bytes(torch.device("cpu"))
    assert flush >= bench.DEFAULT_FLUSH_MIB * 2**20
    if cache is not None:
        assert cache > 0 and flush >= 3 * cache


def test_help_explains_the_cache_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--cache {warm,cold,both}" in text and "--flush-mib" in text
    assert "cold roofline" in text and "The flush is not timed" in text
