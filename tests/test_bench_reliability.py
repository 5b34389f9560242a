"""adopt bench flags figures a busy machine made meaningless, instead of printing them plain."""

from __future__ import annotations

from typing import Any

from adopt import bench


def _part(add_ms: float = 1.0, add_min_ms: float = 0.9, gb_s: float = 50.0, **rows: tuple[float, float]) -> dict[str, Any]:
    roofline = {"add_ms": add_ms, "add_min_ms": add_min_ms, "bandwidth_gb_s": gb_s, "roofline_ms": add_ms * 7 / 3,
                "bytes_per_element": 28}
    results = [{"path": path, "median_ms": med, "min_ms": low, "vs_roofline": med / roofline["roofline_ms"]}
               for path, (med, low) in rows.items()]
    return {"roofline": roofline, "results": results}


def test_steady_figures_get_no_warning() -> None:
    assert bench.reliability_warnings(_part(**{"adopt-fused": (2.5, 2.3), "adamw-fused": (3.0, 2.8)})) == []


def test_a_median_far_above_its_min_is_flagged() -> None:
    """The case from a busy machine: median 7.98 ms, min 0.109 ms."""
    (warning,) = bench.reliability_warnings(_part(**{"adopt-fused": (7.98, 0.109)}))
    assert warning == "adopt-fused: median 7.980 ms is 73.2x its min 0.109 ms"


def test_an_implausible_roofline_and_a_path_faster_than_it_are_flagged() -> None:
    warnings = bench.reliability_warnings(_part(add_ms=40.0, add_min_ms=39.0, gb_s=0.2, **{"adopt-fused": (30.0, 29.0)}))
    assert warnings == [
        "roofline at 0.2 GB/s is below any plausible memory bandwidth",
        "adopt-fused: 0.32x the roofline, faster than memory allows",
    ]


def test_an_unsteady_roofline_is_flagged() -> None:
    assert bench.reliability_warnings(_part(add_ms=2.0, add_min_ms=1.0)) == [
        "roofline add: median 2.000 ms is 2.0x its min 1.000 ms"
    ]


def test_the_table_prints_warnings_and_advice_only_when_there_are_some() -> None:
    steady = _part(**{"adopt-fused": (2.5, 2.3)})
    busy = _part(**{"adopt-fused": (7.98, 0.109)})
    for part in (steady, busy):
        part["warnings"] = bench.reliability_warnings(part)
    case = {"params": 1000, "tensors": 2, "repeats": 15, **steady, "cold": {"flush_bytes": 2**20, **busy}}
    table = bench.format_table([case])
    assert "warning (cold): adopt-fused: median 7.980 ms is 73.2x its min 0.109 ms" in table
    assert "warning (warm)" not in table
    assert bench.ADVICE in table
    calm = {"params": 1000, "tensors": 2, "repeats": 15, **steady}
    assert "warning" not in bench.format_table([calm]) and bench.ADVICE not in bench.format_table([calm])


def test_quick_runs_enough_steps_for_a_median() -> None:
    assert bench.QUICK_REPEATS >= 10
