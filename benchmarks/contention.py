"""The fused CPU step on busy cores: torch's default thread count against one thread.

    python benchmarks/contention.py [--busy 0,2,4,8] [--steps 400] [--out contention.json]

For each number of busy processes (plain Python loops, started here and killed at the end
of their round), times ``ADOPT(fused=True).step()`` over 1M float32 parameters in 200 tensors
with torch's default number of threads and with one thread, interleaved, and prints the
median and mean step time of each and the ratio of the medians (default / one thread; the
goal is at most 1.5 under contention, and below 1 on an idle machine). A statically split
OpenMP step waits for its slowest thread, and on busy cores a thread can wait a time slice
(milliseconds) before it runs at all; the kernel notices such a late start and runs on one
thread for a second before it tries the full team again (src/adopt/_kernels/adopt_cpu.c).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adopt import ADOPT  # noqa: E402


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated process counts, got {text!r}") from None
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated process counts >= 0, got {text!r}")
    return counts


def _optimizer() -> ADOPT:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5000)) for _ in range(200)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ADOPT(params, fused=True)
    for _ in range(3):
        opt.step()
    return opt


def _time(opt: ADOPT, threads: int, steps: int) -> list[float]:
    torch.set_num_threads(threads)
    for _ in range(10):
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(busy: int, steps: int, default_threads: int) -> dict[str, Any]:
    """Median and mean step times (ms) with the default and with one thread, ``busy`` loops running."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5)
        opt = _optimizer()
        times: dict[int, list[float]] = {default_threads: [], 1: []}
        for _ in range(2):  # interleaved halves
            for threads in times:
                times[threads] += _time(opt, threads, steps // 2)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    row: dict[str, Any] = {"busy_processes": busy}
    for threads, samples in times.items():
        key = "default" if threads == default_threads else "one"
        row[f"{key}_median_ms"] = statistics.median(samples)
        row[f"{key}_mean_ms"] = statistics.mean(samples)
    row["median_ratio"] = row["default_median_ms"] / row["one_median_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="The table and the JSON give medians and means in ms.")
    parser.add_argument("--busy", type=_counts, default=[0, 2, 4, 8],
                        help="numbers of busy processes to run beside the step, one round each (default: 0,2,4,8)")
    parser.add_argument("--steps", type=int, default=400, help="timed steps per thread count and round (default: 400)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    print(f"fused ADOPT step, 1M float32 params in 200 tensors; default threads = {default_threads}")
    print(f"{'busy':>5}{'default median':>16}{'mean':>9}{'1-thread median':>17}{'mean':>9}{'ratio':>8}")
    rows = []
    for busy in args.busy:
        row = measure(busy, args.steps, default_threads)
        rows.append(row)
        print(f"{busy:>5}{row['default_median_ms']:>16.3f}{row['default_mean_ms']:>9.3f}"
              f"{row['one_median_ms']:>17.3f}{row['one_mean_ms']:>9.3f}{row['median_ratio']:>8.2f}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"torch": torch.__version__, "default_threads": default_threads,
                                        "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
