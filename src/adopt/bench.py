"""``adopt bench``: time one optimizer step of every ADOPT path against torch's AdamW.

For each case ("N parameters split into T tensors") it measures, in one run and on the
same tensors' sizes:

* ``adopt-single``, ``adopt-foreach``, ``adopt-fused``: ``ADOPT(...).step()`` with
  ``foreach=False``, ``foreach=True`` and ``fused=True``;
* ``adopt-fused-sr``: ``fused=True, stochastic_rounding=True``, the cost of stochastic
  rounding; it differs from ``adopt-fused`` only for bfloat16/float16 (``--dtype``);
* ``adamw-foreach``, ``adamw-fused``: ``torch.optim.AdamW`` the same two ways;
* the memory-bandwidth roofline: a minimal optimizer step reads p, g, m, v and writes p,
  m, v (7 values per element, 28 bytes in float32). The bandwidth is measured with an
  in-place add ``x.add_(y)`` over one flat tensor of the same total size (3 values per
  element moved), so ``roofline = t_add * 7 / 3``.

Every path gets its own tensors and takes warm-up steps (ADOPT's first step only
initialises its state, so it is never timed). The paths and the in-place add are then
timed in interleaved rounds: each round gives every one of them untimed steps (at least
``--warmup`` and at least 25 ms of them: the others' steps have pushed its data out of
cache, and a working set that fits in the last-level cache takes several passes to settle
there again) and its share of
``--repeats`` timed steps, so a change in the machine's load during the run affects all
of them alike. The table reports the median
(and min) with ratios to the roofline and to ``AdamW(fused=True)``. All paths of a case
are alive together: about 16 bytes per parameter per path (5 paths: 4 GB at 50M).

Warm and cold cache (``--cache``): the warm figures above are a step whose data the
previous step left in cache. In training, forward and backward stream other memory between
two steps, so the step starts with its data in main memory. The cold figures model that:
before every cold timed step of every path, and before every cold timed add, the benchmark
reads and writes a buffer several times the last-level cache (``--flush-mib``; default
96 MiB, or 3x the largest cache ``/sys`` or CUDA reports when that is larger). The flush is
not timed. Cold steps are timed in the same interleaved rounds as warm ones, right after a
path's warm share, and the cold roofline is the cold in-place add's time times 7/3, so
every cold ratio compares cold with cold.

Optimizer state precision (``--state-precision full,bf16,8bit``): the ADOPT paths are timed
once per precision, ``ADOPT(..., state_precision=P)``, as rows ``adopt-fused/8bit`` and so
on (default: ``adopt-foreach`` and ``adopt-fused``), next to AdamW and, when installed, the
8-bit optimizers of bitsandbytes (``bnb-adam8bit``: ``bnb.optim.Adam8bit``) and torchao
(``torchao-adamw8bit``: ``torchao.optim.AdamW8bit``); a peer that is not installed is a
skipped row. Every row also reports the bytes of optimizer state per parameter element,
measured from ``optimizer.state`` (every tensor but step counts and seeds, each storage once;
a tensor subclass by the tensors it wraps) after the warm-up, and its own roofline: the
bytes a step must move per element are 3 for the parameter (read, write) and gradient plus
what the state moves: 28 in all in float32 for full precision, 20 for bf16 (2 + 2 bytes per
moment, read and write), 16 for 8bit (1 + 1 per moment; the block scales are left out).
Both peers keep full-precision state for small tensors (under 4096 elements), and torchao
also for tensors whose size is not a multiple of its block (256): the measured bytes show it.

JSON: each case holds the warm figures in ``roofline`` and ``results`` (as before cold
figures existed) and the cold ones in ``cold`` (``flush_bytes``, ``roofline``,
``results``); every row also says its ``cache``. With ``--cache cold`` a case has only
``cold``, with ``--cache warm`` no ``cold``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from ._argtypes import device_type
from .info import cpu_name

PATHS = ("adopt-single", "adopt-foreach", "adopt-fused", "adopt-fused-sr", "adamw-foreach", "adamw-fused")
# The fused step with one option on, timed when named in --paths (what each option costs).
OPTION_PATHS: dict[str, dict[str, Any]] = {
    "adopt-fused-nesterov": dict(nesterov=True),
    "adopt-fused-caution": dict(caution=True),
    "adopt-fused-caution-nesterov": dict(caution=True, nesterov=True),
}
# Third-party 8-bit optimizers timed next to ADOPT's state precisions when installed.
PEER_PATHS: dict[str, tuple[str, str]] = {
    "bnb-adam8bit": ("bitsandbytes", "bitsandbytes.optim.Adam8bit"),
    "torchao-adamw8bit": ("torchao", "torchao.optim.AdamW8bit"),
}
STATE_PRECISIONS = ("full", "bf16", "8bit")
# The ADOPT paths timed per state precision by default (--paths chooses others).
STATE_DEFAULT_PATHS = ("adopt-foreach", "adopt-fused", "adamw-foreach", "adamw-fused", *PEER_PATHS)
DEFAULT_SIZES = "1M:200,50M:10"
# With --state-precision: every tensor a multiple of 256 elements and at least 4096, so the
# 8-bit peers (which keep other tensors in full precision) are 8-bit too.
STATE_DEFAULT_SIZES = "1024000:200,10240000:10"
STATE_QUICK_SIZES = "204800:50,2048000:4"
QUICK_SIZES = "200k:50,2M:4"
QUICK_REPEATS = 15  # enough for a median that means something, still seconds
# adopt-fused-sr times the same step as adopt-fused except for 16-bit parameters, so the
# default runs it only for those.
SR_DTYPES = ("bfloat16", "float16")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9}
ROUNDS = 5  # interleaved timing rounds per case
WARM_UP_SECONDS = 0.025  # least untimed time per path at the start of each round
CACHE_CHOICES = {"warm": ("warm",), "cold": ("cold",), "both": ("warm", "cold")}
DEFAULT_FLUSH_MIB = 96  # at least this much is streamed before every cold timed call
FLUSH_CACHE_FACTOR = 3  # ... or this many times the largest cache the system reports

DESCRIPTION = """\
Time one optimizer step of every ADOPT path (single-tensor, foreach, fused) and of
torch.optim.AdamW (foreach, fused) on this machine, next to the memory-bandwidth roofline.
adopt-fused-sr is fused=True with stochastic_rounding=True; it differs from adopt-fused only
for --dtype bfloat16 or float16 (the default runs it only then).

An optimizer step is memory-bound: it reads params, grads and both moments and writes
params and moments, 7 values per element (28 bytes in float32). The roofline is that
traffic at the bandwidth of an in-place add over one flat tensor of the same size,
measured in the same run. A ratio of 1.0 to the roofline is as fast as memory allows.

Default cases: 1M parameters in 200 tensors (fixed per-step cost dominates) and 50M
parameters in 10 tensors (bandwidth dominates). --quick runs two small cases in seconds.

Each path warms up, then all paths and the add are timed in interleaved rounds so that
other load on the machine affects them alike; the table shows the median and min step
time, "x roofline" and "x AdamW fused" (below 1.0: faster). Every path of a case stays in
memory during its rounds: about 16 bytes per parameter per path (4 GB for 50M, 5 paths).
The JSON file holds every timing and a description of the machine.
A run that other load made unreliable (a median far above its min, a roofline below any
plausible bandwidth, a path faster than the roofline) gets warnings under its table and in
the JSON ("warnings"), with what to try instead.

Warm or cold cache (--cache, default both): "warm" rows time a step right after other
steps of the same path, so data that fits in cache is found there. In a training loop the
forward and backward passes stream other memory between two steps, so the step's data is
in main memory instead: "cold" rows model that by streaming a large buffer (--flush-mib,
default 96 MiB or 3x the last-level cache if larger) before every timed step and before
every timed add of the cold roofline. The flush is not timed. Cold rows are compared with
the cold roofline and cold AdamW fused. Small cases, whose data fits in cache, are where
the two differ most. The flush buffer stays in memory for the whole run.

Optimizer state precision (--state-precision full,bf16,8bit): the ADOPT paths once per
precision (rows adopt-fused/8bit, ...), each with the bytes of optimizer state per parameter
measured from optimizer.state and its own roofline (28, 20 and 16 bytes per element moved
for float32 parameters), "x full" against the same path in full precision, next to AdamW
and, when installed, bitsandbytes' Adam8bit and torchao's AdamW8bit (skipped otherwise).
"""

EPILOG = """\
examples:
  python -m adopt bench                       the two default cases on the CPU
  python -m adopt bench --threads 2           limit torch (and the fused kernel) to 2 threads
  python -m adopt bench --sizes 10M:100       one case: 10M parameters in 100 tensors
  python -m adopt bench --device cuda         on the GPU (needs triton for adopt-fused)
  python -m adopt bench --quick --out b.json  a quick smoke run, results in b.json
  python -m adopt bench --cache cold          only the cache-cold steps (data in main memory)
  python -m adopt bench --state-precision full,bf16,8bit --sizes 1024000:200
                                              ADOPT with each optimizer state precision, its state
                                              bytes per parameter, AdamW and installed 8-bit peers
"""


def _size(text: str) -> int:
    text = text.strip().lower()
    scale = _SUFFIXES.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in _SUFFIXES else text
    value = float(number) * scale
    if value < 1 or value != int(value):
        raise ValueError(text)
    return int(value)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1M:200,50M:10"`` -> ``[(1_000_000, 200), (50_000_000, 10)]``."""
    cases = []
    for item in text.split(","):
        try:
            total, tensors = (_size(part) for part in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad case {item!r}: expected PARAMS:TENSORS such as 1M:200 (suffixes k, M, G)"
            ) from None
        if tensors > total:
            raise argparse.ArgumentTypeError(f"bad case {item!r}: more tensors than parameters")
        cases.append((total, tensors))
    return cases


def _paths(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    known = (*PATHS, *OPTION_PATHS, *PEER_PATHS)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown path(s) {unknown or text!r}; choose from {', '.join(known)}")
    return names


def _state_precisions(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in STATE_PRECISIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown state precision(s) {unknown or text!r}; choose from {', '.join(STATE_PRECISIONS)}"
        )
    return tuple(p for p in STATE_PRECISIONS if p in names)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def split_path(path: str) -> tuple[str, Optional[str]]:
    """``"adopt-fused/8bit"`` -> ``("adopt-fused", "8bit")``; a path without one -> ``(path, None)``."""
    base, _, precision = path.partition("/")
    return base, precision or None


def is_adopt_path(path: str) -> bool:
    """An ADOPT path (timed once per state precision with --state-precision)."""
    return path.startswith("adopt-")


def state_paths(paths: Iterable[str], precisions: Iterable[str]) -> tuple[str, ...]:
    """Every ADOPT path once per precision (``adopt-fused/8bit``), then the other paths."""
    paths, precisions = tuple(paths), tuple(precisions)
    adopt = [f"{path}/{p}" for p in precisions for path in paths if is_adopt_path(path)]
    return (*adopt, *(path for path in paths if not is_adopt_path(path)))


def row_bytes_per_element(path: str, itemsize: int) -> int:
    """Bytes a step of ``path`` must move per parameter element (its roofline): the parameter
    read and written and the gradient read (3 x itemsize) and both moments read and written:
    4 x itemsize in full precision, 8 in bf16, 4 in 8 bits (block scales left out)."""
    base, precision = split_path(path)
    if base in PEER_PATHS:
        precision = "8bit"
    state = {None: 4 * itemsize, "full": 4 * itemsize, "bf16": 8, "8bit": 4}[precision]
    return 3 * itemsize + state


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (used by ``adopt bench``)."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--device", type=device_type(("cpu", "cuda")), default="cpu",
                        help="where the tensors live: cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument(
        "--threads", type=_positive_int, default=None,
        help="CPU threads for torch and the fused kernel (torch.set_num_threads; default: torch's default)",
    )
    parser.add_argument(
        "--sizes", type=parse_sizes, default=None, metavar="PARAMS:TENSORS[,...]",
        help=f"cases to run, total parameters and number of equal tensors (default: {DEFAULT_SIZES}; "
        f"--quick: {QUICK_SIZES})",
    )
    parser.add_argument(
        "--repeats", type=_positive_int, default=None,
        help="timed steps per path (and per cache mode, see --cache); the median is reported (default: 50 for cases up to 10M "
        f"parameters, 20 above; --quick: {QUICK_REPEATS})",
    )
    parser.add_argument(
        "--warmup", type=_positive_int, default=3, help="untimed steps of each path before timing starts and again at the start of every round "
        "of timing (default: 3)",
    )
    parser.add_argument(
        "--paths", type=_paths, default=None, metavar="NAME[,...]",
        help=f"which optimizers to time (default: all of {', '.join(PATHS)}; adopt-fused-sr only with a "
        f"16-bit --dtype, since for wider dtypes it is the adopt-fused step; also {', '.join(OPTION_PATHS)}: "
        "the fused step with that option on)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="parameter dtype (default: float32)")
    parser.add_argument(
        "--state-precision", type=_state_precisions, default=None, metavar="P[,...]",
        help="time the ADOPT paths once per optimizer state precision (full, bf16, 8bit; e.g. full,bf16,8bit), "
        "as rows adopt-fused/8bit ..., with the state bytes per parameter measured from optimizer.state and "
        "each row's own roofline (28/20/16 B per element in float32); default paths then: "
        f"{', '.join(STATE_DEFAULT_PATHS)} (the last two only when installed), default sizes then: "
        f"{STATE_DEFAULT_SIZES} (--quick: {STATE_QUICK_SIZES}; tensors of a multiple of 256 elements, at least 4096, "
        "so the peers' state is 8-bit too)",
    )
    parser.add_argument(
        "--min-8bit-size", type=_non_negative_int, default=None, metavar="N",
        help="ADOPT's min_8bit_size for the 8bit rows: tensors with fewer elements keep full-precision state "
        "(default: the optimizer's, 4096)",
    )
    parser.add_argument(
        "--cache", choices=tuple(CACHE_CHOICES), default="both",
        help="time steps with their data in cache (warm: the previous step of the same path left it there), "
        "with it in main memory (cold: a large buffer is streamed before every timed step, as forward and "
        "backward do in training), or both (default: both)",
    )
    parser.add_argument(
        "--flush-mib", type=_positive_int, default=None, metavar="MIB",
        help=f"MiB (2**20 bytes) read and written before every cold timed call, untimed; it must exceed the "
        f"last-level cache (default: {DEFAULT_FLUSH_MIB}, or {FLUSH_CACHE_FACTOR}x the largest cache the "
        f"system reports if that is more; for this CPU: {default_flush_bytes(torch.device('cpu')) // 2**20})",
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"small cases and {QUICK_REPEATS} repeats: a quick run in seconds")
    parser.add_argument(
        "--out", type=Path, default=Path("adopt-bench") / "bench.json",
        help="where to write the JSON results (default: adopt-bench/bench.json)",
    )


class _Timer:
    """Wall time of a callable on the CPU, or CUDA event time on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Milliseconds ``fn`` takes."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def _tensor_sizes(total: int, tensors: int) -> list[int]:
    base, extra = divmod(total, tensors)
    return [base + (i < extra) for i in range(tensors)]


class PathSkipped(Exception):
    """A path that cannot run because an optional package is not installed."""


def _make_peer(path: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    package, name = PEER_PATHS[path]
    try:
        importlib.import_module(package)
    except ImportError:
        raise PathSkipped(f"{package} is not installed") from None
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module), cls)(params)  # type: ignore[no-any-return]


def _adopt_options(path: str) -> dict[str, Any]:
    """ADOPT's keyword arguments for an ADOPT path (without a state precision)."""
    if path == "adopt-single":
        return dict(foreach=False)
    if path == "adopt-foreach":
        return dict(foreach=True)
    if path == "adopt-fused":
        return dict(fused=True)
    if path == "adopt-fused-sr":  # the same step as adopt-fused unless the dtype is 16-bit
        return dict(fused=True, stochastic_rounding=True)
    if path in OPTION_PATHS:
        return dict(fused=True, **OPTION_PATHS[path])
    raise ValueError(f"unknown ADOPT path {path!r}")


def _make_optimizer(
    path: str, params: list[torch.nn.Parameter], min_8bit_size: Optional[int] = None
) -> torch.optim.Optimizer:
    """The optimizer a path times; ``adopt-.../P`` with ``state_precision=P``."""
    from adopt import ADOPT

    base, precision = split_path(path)
    if is_adopt_path(base):
        options = _adopt_options(base)
        if precision is not None:
            options["state_precision"] = precision
            if min_8bit_size is not None:
                options["min_8bit_size"] = min_8bit_size
        return ADOPT(params, **options)
    if precision is not None:
        raise ValueError(f"{base} has no state precision")
    if path in PEER_PATHS:
        return _make_peer(path, params)
    if path == "adamw-foreach":
        return torch.optim.AdamW(params, foreach=True)
    return torch.optim.AdamW(params, fused=True)


def _setup_path(
    path: str, sizes: list[int], device: torch.device, dtype: torch.dtype, warmup: int,
    min_8bit_size: Optional[int] = None, info: Optional[dict[str, Any]] = None,
) -> Callable[[], Any]:
    """A warmed-up optimizer for fresh tensors of these sizes; returns its step. ``info``
    receives ``state_bytes_per_param``, measured after the warm-up."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(device, dtype)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
    optimizer = _make_optimizer(path, params, min_8bit_size)
    for _ in range(warmup + 1):  # +1: ADOPT's first step only initialises v
        optimizer.step()
    if info is not None:
        info["state_bytes_per_param"] = state_bytes_per_parameter(optimizer)
    return optimizer.step


def _tensors_in(value: Any) -> Iterable[torch.Tensor]:
    """The plain tensors that hold ``value``'s data: a tensor subclass that wraps others
    (torchao's quantized optimizer states report their dequantized size as ``nbytes``) by
    its inner tensors, containers by their items."""
    if isinstance(value, torch.Tensor):
        flatten = getattr(value, "__tensor_flatten__", None)
        if type(value) not in (torch.Tensor, torch.nn.Parameter) and flatten is not None:
            for name in flatten()[0]:
                yield from _tensors_in(getattr(value, name))
        else:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


STATE_KEYS_NOT_COUNTED = ("step", "seed")


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` but the step counts and seeds
    (:data:`STATE_KEYS_NOT_COUNTED`), each storage counted once (a table that several
    parameters share, such as a quantization map, is stored once)."""
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key in STATE_KEYS_NOT_COUNTED:
                continue
            for tensor in _tensors_in(value):
                ident = (str(tensor.device), tensor.data_ptr(), tensor.nbytes)
                if ident not in seen:
                    seen.add(ident)
                    total += tensor.nbytes
    return total


def state_bytes_per_parameter(optimizer: torch.optim.Optimizer) -> float:
    """:func:`state_nbytes` divided by the number of parameter elements of every group."""
    elements = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return state_nbytes(optimizer) / elements


def _setup_add(total: int, device: torch.device, dtype: torch.dtype, warmup: int) -> Callable[[], Any]:
    """The roofline's in-place add over one flat tensor of ``total`` elements."""
    x = torch.ones(total, device=device, dtype=dtype)
    y = torch.ones(total, device=device, dtype=dtype)

    def add() -> None:
        x.add_(y)

    for _ in range(warmup):
        add()
    return add


def largest_cache_bytes(device: torch.device) -> Optional[int]:
    """The largest cache the system reports for ``device`` (CPU: cpu0's caches in /sys;
    CUDA: the L2), or None when it reports none."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or None
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=None)


def default_flush_bytes(device: torch.device) -> int:
    """``DEFAULT_FLUSH_MIB``, or ``FLUSH_CACHE_FACTOR`` times the largest cache if that is more."""
    cache = largest_cache_bytes(device) or 0
    return max(DEFAULT_FLUSH_MIB * 2**20, FLUSH_CACHE_FACTOR * cache)


def _setup_flush(nbytes: int, device: torch.device) -> Callable[[], Any]:
    """A call that reads and writes ``nbytes`` of memory (in place, on ``device``), which
    evicts whatever an earlier call left in cache, as forward and backward do in training.

    Reads and writes, not writes alone: a large write-only fill can use non-temporal stores
    that bypass the cache and would leave it as it was."""
    buffer = torch.ones(max(nbytes // 4, 1), device=device, dtype=torch.float32)  # float32: 4 bytes

    def flush() -> None:
        buffer.neg_()

    flush()
    return flush


# A run is flagged unreliable (in the table and the JSON's "warnings") when a timing's median
# is more than SPREAD_LIMIT times its min (the machine's load changed during the run), the
# roofline's bandwidth is below MIN_PLAUSIBLE_GB_S (the add was descheduled), or a path is
# faster than FASTER_THAN_ROOFLINE times the roofline (the roofline itself was slowed down).
SPREAD_LIMIT = 1.5
MIN_PLAUSIBLE_GB_S = 1.0
FASTER_THAN_ROOFLINE = 0.7
ADVICE = ("the figures above are unreliable: rerun on an idle machine, with more --repeats, "
          "or with fewer --threads than cores")


def reliability_warnings(part: dict[str, Any]) -> list[str]:
    """What makes one cache mode's figures (``{"roofline": ..., "results": ...}``) unreliable."""
    warnings = []
    roof = part["roofline"]
    if roof["add_ms"] > SPREAD_LIMIT * roof["add_min_ms"]:
        warnings.append(f"roofline add: median {roof['add_ms']:.3f} ms is {roof['add_ms'] / roof['add_min_ms']:.1f}x "
                        f"its min {roof['add_min_ms']:.3f} ms")
    if roof["bandwidth_gb_s"] < MIN_PLAUSIBLE_GB_S:
        warnings.append(f"roofline at {roof['bandwidth_gb_s']:.2g} GB/s is below any plausible memory bandwidth")
    for row in part["results"]:
        if "error" in row or "skipped" in row:
            continue
        if row["median_ms"] > SPREAD_LIMIT * row["min_ms"]:
            warnings.append(f"{row['path']}: median {row['median_ms']:.3f} ms is "
                            f"{row['median_ms'] / row['min_ms']:.1f}x its min {row['min_ms']:.3f} ms")
        if row["vs_roofline"] < FASTER_THAN_ROOFLINE:
            warnings.append(f"{row['path']}: {row['vs_roofline']:.2f}x the roofline, faster than memory allows")
    return warnings


def _roofline(add_ms: list[float], total: int, itemsize: int) -> dict[str, Any]:
    """Bandwidth of the in-place add (3 values per element) and the step time it implies."""
    median = statistics.median(add_ms)
    return {
        "add_ms": median,
        "add_min_ms": min(add_ms),
        "bandwidth_gb_s": 3 * itemsize * total / (median * 1e-3) / 1e9,
        "roofline_ms": median * 7 / 3,
        "bytes_per_element": 7 * itemsize,
    }


class _Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else one line per measurement."""

    def __init__(self, total: int) -> None:
        self.total, self.count = total, 0
        self.bar: Any = None
        if sys.stderr.isatty():
            try:
                tqdm = importlib.import_module("tqdm").tqdm  # optional dependency
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="run", file=sys.stderr, leave=False)

    def start(self, label: str) -> None:
        """Announce the measurement about to run."""
        self.count += 1
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.count}/{self.total}] {label}", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update()
            if self.bar.n == self.total:
                self.bar.close()


def _machine(device: torch.device) -> dict[str, Any]:
    from adopt._fused import _cpu_kernel

    kernel = _cpu_kernel()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_cpu_kernel": kernel is not None,
        "fused_cpu_kernel_openmp": kernel is not None and kernel.has_openmp(),
        "largest_cache_bytes": largest_cache_bytes(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_cases(
    cases: list[tuple[int, int]],
    paths: Iterable[str],
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: Optional[int],
    quick: bool,
    cache: str = "warm",
    flush_bytes: Optional[int] = None,
    min_8bit_size: Optional[int] = None,
) -> list[dict[str, Any]]:
    """Measure every path and the roofline for each case; errors are recorded, not raised.

    ``cache`` is "warm", "cold" or "both" (see the module docstring); cold timings stream
    ``flush_bytes`` (default: ``default_flush_bytes(device)``) before every timed call."""
    paths = tuple(paths)
    modes = CACHE_CHOICES[cache]
    timer = _Timer(device)
    flush_bytes = flush_bytes or default_flush_bytes(device)
    flush = _setup_flush(flush_bytes, device) if "cold" in modes else None
    progress = _Progress(len(cases) * (len(paths) + ROUNDS))
    results = []
    for total, tensors in cases:
        reps = repeats or (QUICK_REPEATS if quick else 50 if total <= 10_000_000 else 20)
        label = f"{_fmt(total)}/{tensors}"
        steps: dict[str, Callable[[], Any]] = {}
        rows: dict[str, dict[str, Any]] = {path: {"path": path} for path in paths}
        for path in paths:
            progress.start(f"{label} {path}: warm-up")
            try:
                steps[path] = _setup_path(
                    path, _tensor_sizes(total, tensors), device, dtype, warmup, min_8bit_size, rows[path]
                )
            except PathSkipped as exc:  # an optional peer that is not installed
                rows[path] = {"path": path, "skipped": str(exc)}
            except Exception as exc:  # a path that cannot run here (no triton, ...) is reported
                rows[path]["error"] = f"{type(exc).__name__}: {exc}"
            progress.done()
        steps["add"] = _setup_add(total, device, dtype, warmup)
        times = _interleaved(steps, reps, warmup, timer, progress, label, modes, flush)
        del steps
        case: dict[str, Any] = {"params": total, "tensors": tensors, "repeats": reps}
        for mode in modes:
            summary = _summarise(times[mode], rows, mode, total, dtype.itemsize)
            summary["warnings"] = reliability_warnings(summary)
            if mode == "warm":  # the warm figures stay where they were before cold ones existed
                case.update(summary)
            else:
                case["cold"] = {"flush_bytes": flush_bytes, **summary}
        results.append(case)
    return results


def _summarise(
    times: dict[str, list[float]], rows: dict[str, dict[str, Any]], mode: str, total: int, itemsize: int
) -> dict[str, Any]:
    """The roofline and one row per path (median, min, ratios) from one cache mode's timings."""
    times = dict(times)
    roofline = _roofline(times.pop("add"), total, itemsize)
    out = {path: {**row, "cache": mode} for path, row in rows.items()}
    own_roofline = any(split_path(path)[1] is not None or path in PEER_PATHS for path in rows)
    for path, samples in times.items():
        out[path].update(median_ms=statistics.median(samples), min_ms=min(samples), times_ms=samples)
        row_roofline = roofline["roofline_ms"]
        if own_roofline:  # each row against the traffic its state precision needs
            moved = row_bytes_per_element(path, itemsize)
            row_roofline = roofline["add_ms"] * moved / (3 * itemsize)
            out[path].update(roofline_bytes_per_element=moved, roofline_ms=row_roofline)
        out[path]["vs_roofline"] = out[path]["median_ms"] / row_roofline
        base, precision = split_path(path)
        full = times.get(f"{base}/full")
        if precision is not None and full is not None:
            out[path]["vs_full"] = out[path]["median_ms"] / statistics.median(full)
    reference = times.get("adamw-fused")
    if reference is not None:
        for path in times:
            out[path]["vs_adamw_fused"] = out[path]["median_ms"] / statistics.median(reference)
    return {"roofline": roofline, "results": list(out.values())}


def _interleaved(
    steps: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    timer: _Timer,
    progress: _Progress,
    label: str,
    modes: tuple[str, ...] = ("warm",),
    flush: Optional[Callable[[], Any]] = None,
) -> dict[str, dict[str, list[float]]]:
    """``repeats`` timings of each callable per cache mode (``times[mode][name]``), taken in
    ``ROUNDS`` interleaved rounds. In each round a callable gets its warm share after a
    warm-up (``_warm_up``), then its cold share, each cold call after an untimed ``flush``."""
    times: dict[str, dict[str, list[float]]] = {mode: {name: [] for name in steps} for mode in modes}
    for r in range(ROUNDS):
        progress.start(f"{label} round {r + 1}/{ROUNDS}")
        share = repeats * (r + 1) // ROUNDS - repeats * r // ROUNDS
        for name, step in steps.items():
            if share == 0:
                continue
            if "warm" in modes:
                _warm_up(step, warmup, timer)
                times["warm"][name].extend(timer(step) for _ in range(share))
            if "cold" in modes:
                assert flush is not None
                for _ in range(share):
                    flush()
                    timer.sync()  # on a GPU, the flush must be done before the step's kernels start
                    times["cold"][name].append(timer(step))
        progress.done()
    return times


def _warm_up(step: Callable[[], Any], calls: int, timer: _Timer) -> None:
    """Untimed calls, at least ``calls`` and at least ``WARM_UP_SECONDS`` of them: the other
    paths' steps have pushed this one's data out of cache, and a working set that fits in
    the last-level cache takes several passes to settle there again."""
    begin = time.perf_counter()
    done = 0
    while done < calls or time.perf_counter() - begin < WARM_UP_SECONDS:
        step()
        timer.sync()
        done += 1


def _fmt(n: int) -> str:
    """1000000 -> "1M", 200000 -> "200k"."""
    for suffix, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:g}{suffix}"
    return str(n)


def case_modes(case: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(cache mode, {"roofline": ..., "results": ...}), ...]`` for one case of the JSON."""
    modes = []
    if "results" in case:
        modes.append(("warm", case))
    if "cold" in case:
        modes.append(("cold", case["cold"]))
    return modes


def _is_state_case(modes: list[tuple[str, dict[str, Any]]]) -> bool:
    """A case run with --state-precision (its rows carry their own roofline)."""
    return any("roofline_bytes_per_element" in row for _, part in modes for row in part["results"])


def format_table(cases: list[dict[str, Any]]) -> str:
    """The human-readable summary printed after a run: per case, one line per roofline and
    one row per path and cache mode; each row's ratios are to the same mode's figures.
    With --state-precision, also each row's roofline bytes, its state bytes per parameter
    (measured) and its time against the same path with full-precision state."""
    lines = []
    for case in cases:
        label = f"{_fmt(case['params'])}/{case['tensors']}"
        modes = case_modes(case)
        state = _is_state_case(modes)
        width = 26 if state else 16
        header = (
            f"{'case':<14}{'cache':<7}{'path':<{width}}{'median ms':>11}{'min ms':>10}{'x roofline':>12}{'x AdamW fused':>15}"
        )
        if state:
            header += f"{'x full':>8}{'roofline B':>12}{'state B/param':>15}"
        bytes_per_element = modes[0][1]["roofline"]["bytes_per_element"]
        if state:
            lines.append(f"{label}: roofline bytes per element per row (full {bytes_per_element}), median of"
                         f" {case['repeats']} steps; state bytes measured from optimizer.state")
        else:
            lines.append(f"{label}: {bytes_per_element} B/element, median of {case['repeats']} steps")
        for mode, part in modes:
            roof = part["roofline"]
            how = (
                "data left in cache by the previous step"
                if mode == "warm"
                else f"{_fmt_bytes(part['flush_bytes'])} streamed, untimed, before every timed call"
            )
            lines.append(
                f"  {mode} roofline {roof['roofline_ms']:.3f} ms (in-place add {roof['add_ms']:.3f} ms, "
                f"{roof['bandwidth_gb_s']:.1f} GB/s; {how})"
            )
        lines.append(header)
        for mode, part in modes:
            for row in part["results"]:
                start = f"{label:<14}{mode:<7}{row['path']:<{width}}"
                if "error" in row:
                    lines.append(f"{start}  failed: {row['error']}")
                    continue
                if "skipped" in row:
                    lines.append(f"{start}  skipped: {row['skipped']}")
                    continue
                vs_adamw = f"{row['vs_adamw_fused']:.2f}" if "vs_adamw_fused" in row else "-"
                line = f"{start}{row['median_ms']:>11.3f}{row['min_ms']:>10.3f}{row['vs_roofline']:>12.2f}{vs_adamw:>15}"
                if state:
                    vs_full = f"{row['vs_full']:.2f}" if "vs_full" in row else "-"
                    state_bytes = row.get("state_bytes_per_param")
                    line += (f"{vs_full:>8}{row.get('roofline_bytes_per_element', '-'):>12}"
                             f"{'-' if state_bytes is None else f'{state_bytes:.3f}':>15}")
                lines.append(line)
        warned = [(mode, w) for mode, part in modes for w in part.get("warnings", [])]
        lines.extend(f"  warning ({mode}): {w}" for mode, w in warned)
        if warned:
            lines.append(f"  {ADVICE}")
        lines.append("")
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    """100663296 -> "96 MiB", 1000000 -> "0.9537 MiB"."""
    return f"{n / 2**20:.4g} MiB"


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; prints the table, writes JSON, returns 0."""
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if getattr(args, "state_precision", None):
        cases = args.sizes or parse_sizes(STATE_QUICK_SIZES if args.quick else STATE_DEFAULT_SIZES)
    else:
        cases = args.sizes or parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    dtype = DTYPES[args.dtype]
    flush_bytes = args.flush_mib * 2**20 if args.flush_mib is not None else default_flush_bytes(device)
    precisions = getattr(args, "state_precision", None)
    min_8bit_size = getattr(args, "min_8bit_size", None)
    if precisions:
        paths = state_paths(args.paths or STATE_DEFAULT_PATHS, precisions)
    else:
        paths = args.paths or tuple(p for p in PATHS if p != "adopt-fused-sr" or args.dtype in SR_DTYPES)
    results = run_cases(
        cases, paths, device, dtype, args.warmup, args.repeats, args.quick, args.cache, flush_bytes, min_8bit_size
    )
    config = {"device": str(device), "dtype": args.dtype, "warmup": args.warmup, "quick": args.quick,
              "cache": args.cache}
    if precisions:
        from ._state_formats import MIN_8BIT_SIZE

        config["state_precisions"] = list(precisions)
        config["min_8bit_size"] = MIN_8BIT_SIZE if min_8bit_size is None else min_8bit_size
    if args.cache != "warm":
        config["flush_bytes"] = flush_bytes
    report = {"machine": _machine(device), "config": config, "cases": results}
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m adopt.bench``: the same options as ``adopt bench``."""
    parser = argparse.ArgumentParser(prog="python -m adopt.bench")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
