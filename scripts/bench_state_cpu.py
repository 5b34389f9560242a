#!/usr/bin/env python3
"""Time the fused CPU step with low-memory state against full precision (issue 9).

50M float32 parameters in 10 tensors (by default), on 2 threads and on 1: the existing
fused full-precision step (float32 moments), the 8-bit state step and the bf16 state step,
in interleaved rounds (each round times every variant once, so drifts of a shared machine
hit all alike), medians reported. The roofline is measured, not assumed: an in-place
``torch.add_`` over the same tensors gives the machine's streaming bandwidth (12 bytes per
element: two reads, one write), and each step's roofline is its own bytes per element over
that bandwidth: full 28 (p r+w 8, g 4, m and v r+w 8 each), 8bit 16 (p 8, g 4, codes r+w
1 + 1 each; scales 0.03), bf16 20. From the steps' compute alone (one cache-resident tensor)
it also prints the bandwidth per thread up to which each low-precision step can reach its
target speed-up over the memory-bound full step (8bit 1.4x, bf16 1.2x). Where the kernel
runs its AVX-512 state step, the 8bit and bf16 steps are timed a second time with its
portable loops ("8bit-portable", "bf16-portable") in the same rounds.

usage: PYTHONPATH=src python3 scripts/bench_state_cpu.py [--numel N] [--tensors K]
       [--rounds R] [--threads 2,1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from adopt import _fused
from adopt._fused_state import fused_state_cpu
from adopt._random import param_seed
from adopt.schedules import PowerClip

BYTES = {"full": 28.0, "8bit": 16.0 + 8.0 / 256, "bf16": 20.0}
# Issue 9's speed targets: how much faster than the full-precision step each format must be.
TARGETS = {"8bit": 1.4, "bf16": 1.2}
ROOF_BYTES = 12.0  # in-place add: read a, read b, write a
CACHED_NUMEL = 65_536  # one tensor whose whole step fits in L2: the steps' compute cost alone
CACHED_REPEATS = 200


def build(numel: int, tensors: int) -> dict[str, Any]:
    size = numel // tensors
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(size, generator=gen) for _ in range(tensors)]
    grads = [torch.randn(size, generator=gen) * 1e-3 for _ in range(tensors)]
    blocks = -(-size // 256)
    d: dict[str, Any] = {
        "params": params,
        "grads": grads,
        "full_m": [torch.zeros(size) for _ in range(tensors)],
        "full_v": [torch.full((size,), 1e-6) for _ in range(tensors)],
        "full_steps": [torch.tensor(1.0) for _ in range(tensors)],
        "codes_m": [torch.zeros(size, dtype=torch.uint8) for _ in range(tensors)],
        "codes_v": [torch.full((size,), 200, dtype=torch.uint8) for _ in range(tensors)],
        "scales_m": [torch.zeros(blocks) for _ in range(tensors)],
        "scales_v": [torch.full((blocks,), 2.0**-20) for _ in range(tensors)],
        "bf_m": [torch.zeros(size, dtype=torch.bfloat16) for _ in range(tensors)],
        "bf_v": [torch.full((size,), 1e-6, dtype=torch.bfloat16) for _ in range(tensors)],
        "state_steps8": [torch.tensor(1.0) for _ in range(tensors)],
        "state_stepsbf": [torch.tensor(1.0) for _ in range(tensors)],
        "seeds": [torch.tensor(param_seed(i), dtype=torch.int64) for i in range(tensors)],
    }
    return d


HYPER = dict(beta1=0.9, beta2=0.9999, lr=1e-6, clip_lambda=PowerClip(0.25), weight_decay=0.0, decouple=False,
             eps=1e-6, maximize=False, nesterov=False, caution=False)


def steps(d: dict[str, Any]) -> dict[str, Callable[[], None]]:
    from adopt.functional import adopt

    def full() -> None:
        adopt(d["params"], d["grads"], d["full_m"], d["full_v"], d["full_steps"], fused=True, **HYPER)

    def eight() -> None:
        fused_state_cpu(d["params"], d["grads"], d["codes_m"], d["codes_v"], d["scales_m"], d["scales_v"],
                        d["state_steps8"], d["seeds"], None, None, fmt="8bit", stochastic_rounding=False,
                        lr_max=None, **HYPER)

    def bf16() -> None:
        fused_state_cpu(d["params"], d["grads"], d["bf_m"], d["bf_v"], None, None, d["state_stepsbf"], d["seeds"],
                        None, None, fmt="bf16", stochastic_rounding=False, lr_max=None, **HYPER)

    def roof() -> None:
        for p, g in zip(d["params"], d["grads"]):
            p.add_(g)

    return with_portable({"full": full, "8bit": eight, "bf16": bf16, "roofline_add": roof})


def with_portable(fns: dict[str, Callable[[], None]]) -> dict[str, Callable[[], None]]:
    """Where the kernel runs its AVX-512 state step, the 8bit and bf16 steps once more with
    its portable loops ("8bit-portable", "bf16-portable"), in the same rounds."""
    k = _fused._cpu_kernel()
    if k is None or not k.avx512_available():
        return fns

    def portable(fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            previous = k.use_avx512(False)
            try:
                fn()
            finally:
                k.use_avx512(previous)

        return call

    out = dict(fns)
    for name in ("8bit", "bf16"):
        out[f"{name}-portable"] = portable(fns[name])
    return out


def kinds(results: dict[str, Any]) -> list[str]:
    """The steps timed, in table order."""
    return [k for k in ("full", "8bit", "8bit-portable", "bf16", "bf16-portable") if k in results]


def direct_calls(d: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """The three steps as bare C calls (no Python glue, no validation dry run)."""
    k = _fused._cpu_kernel()
    assert k is not None
    h = (HYPER["lr"], HYPER["beta1"], HYPER["beta2"], 0.0, HYPER["eps"], 0.25, k.CLIP_POWER, False, False, False,
         False, 0.0)
    nt = torch.get_num_threads()
    full = (d["params"], d["grads"], d["full_m"], d["full_v"], d["full_steps"], None, None, None, *h, nt, False, None)
    eight = (d["params"], d["grads"], d["codes_m"], d["codes_v"], d["scales_m"], d["scales_v"], d["state_steps8"],
             d["seeds"], None, None, None, k.STATE_8BIT, *h, False, nt, False)
    bf16 = (d["params"], d["grads"], d["bf_m"], d["bf_v"], None, None, d["state_stepsbf"], d["seeds"], None, None,
            None, k.STATE_BF16, *h, False, nt, False)
    return with_portable({"full": lambda: k.step(*full), "8bit": lambda: k.step_state(*eight),
                          "bf16": lambda: k.step_state(*bf16)})


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=50_000_000)
    ap.add_argument("--tensors", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--json", default="bench_state_cpu.json")
    args = ap.parse_args(argv)
    if not _fused.fused_cpu_available():
        print("the fused CPU kernel is not built", file=sys.stderr)
        return 2
    d = build(args.numel, args.tensors)
    n = (args.numel // args.tensors) * args.tensors
    results: dict[str, Any] = {"numel": n, "tensors": args.tensors, "rounds": args.rounds, "bytes_per_element": BYTES,
                               "threads": {}}
    old = torch.get_num_threads()
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            fns = steps(d)
            for fn in fns.values():  # warm-up: page faults, first-step paths
                fn()
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            bandwidth = ROOF_BYTES * n / med["roofline_add"]
            row: dict[str, Any] = {"median_s": med, "min_s": {k: min(v) for k, v in times.items()},
                                   "bandwidth_GBps": bandwidth / 1e9}
            for k in kinds(med):
                roof = BYTES[k.split("-")[0]] * n / bandwidth
                row[f"{k}_roofline_s"] = roof
                row[f"{k}_over_roofline"] = med[k] / roof
            # Compute cost: the same steps on one small tensor that stays in cache, calling the
            # C entries directly (the Python glue's per-call cost would dominate otherwise).
            small = build(CACHED_NUMEL, 1)
            cached: dict[str, float] = {}
            for k, fn in direct_calls(small).items():
                fn()
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(CACHED_REPEATS):
                        fn()
                    best = min(best, (time.perf_counter() - t0) / CACHED_REPEATS)
                cached[k] = best / CACHED_NUMEL * 1e9
            row["cache_resident_ns_per_element"] = cached
            # Where the targets hold: while the full step is memory bound (28 B per element at
            # the bandwidth), a step whose compute takes c ns per element and thread is R times
            # faster only if c <= 28 B / (R * bandwidth per thread), i.e. on machines with at
            # most that bandwidth per thread (and if its own bytes fit: 16 and 20 <= 28 / R).
            per_thread = {k: cached[k] * threads for k in cached}
            row["compute_ns_per_element_per_thread"] = per_thread
            row["bandwidth_per_thread_GBps"] = bandwidth / threads / 1e9
            row["target_bandwidth_per_thread_GBps"] = {
                k: BYTES["full"] / (r * per_thread[k]) for k, r in TARGETS.items()}
            row["speedup_8bit"] = med["full"] / med["8bit"]
            row["speedup_bf16"] = med["full"] / med["bf16"]
            results["threads"][str(threads)] = row
    finally:
        torch.set_num_threads(old)

    print(f"{n / 1e6:.0f}M float32 params in {args.tensors} tensors, {args.rounds} interleaved rounds (medians)")
    print(f"{'threads':>7} {'step':>13} {'ms':>9} {'GB/s':>7} {'roofline ms':>12} {'x roofline':>11} {'vs full':>8}")
    for threads, row in results["threads"].items():
        for k in kinds(row["median_s"]):
            ms = row["median_s"][k] * 1e3
            gbs = BYTES[k.split("-")[0]] * n / row["median_s"][k] / 1e9
            speed = row["median_s"]["full"] / row["median_s"][k]
            print(f"{threads:>7} {k:>13} {ms:9.1f} {gbs:7.1f} {row[f'{k}_roofline_s'] * 1e3:12.1f} "
                  f"{row[f'{k}_over_roofline']:11.2f} {speed:7.2f}x")
        c = row["cache_resident_ns_per_element"]
        compute = "  ".join(f"{k} {c[k]:.2f}" for k in kinds(c))
        print(f"{threads:>7} cache-resident compute, ns/element: {compute}  "
              f"(streaming full: {row['median_s']['full'] / n * 1e9:.2f})")
        print(f"{threads:>7} {'add_':>13} {row['median_s']['roofline_add'] * 1e3:9.1f} {row['bandwidth_GBps']:7.1f}"
              "  (in-place add, 12 B/elem: the measured bandwidth)")
        for k, r in TARGETS.items():
            need = row["target_bandwidth_per_thread_GBps"][k]
            have = row["bandwidth_per_thread_GBps"]
            print(f"{threads:>7} {k} {r}x faster than full needs <= {need:.1f} GB/s per thread "
                  f"(its compute: {row['compute_ns_per_element_per_thread'][k]:.2f} ns/element/thread); "
                  f"this machine: {have:.1f}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
