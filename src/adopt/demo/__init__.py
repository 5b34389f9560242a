"""``adopt demo``: reproduce the ADOPT paper's evidence on this machine in about 30 seconds.

Experiments, chosen with ``--experiments`` (the default runs the first two):

* ``toy``: the paper's synthetic counterexample (its Figure 1), see :mod:`adopt.demo.toy`.
* ``digits``: a small MLP on scikit-learn's digits, see :mod:`adopt.demo.digits`.
* ``precision``: pure bfloat16 training with and without stochastic rounding against
  float32, see :mod:`adopt.demo.precision`.
* ``state``: low-memory optimizer state (``state_precision`` full, bf16, 8bit and an 8-bit
  round-to-nearest control), see :mod:`adopt.demo.state_precision`.

Writes ``demo.png`` and ``demo.json`` to ``--out`` and prints a table and a reading of the
numbers. Needs the ``demo`` extra: ``pip install ".[demo]"`` in a clone of the repository.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from .._argtypes import device_type

EXPERIMENTS = ("toy", "digits", "precision", "state")
DEFAULT_EXPERIMENTS = ("toy", "digits")
# Defaults of the full run and of --quick; explicit flags override either.
DEFAULTS = {"steps": 20_000, "epochs": 30, "seeds": 32}
QUICK = {"steps": 3_000, "epochs": 3, "seeds": 16}
# The precision experiment's own (it trains every seed three times, one a language model).
PRECISION_DEFAULTS = {"lm_steps": 600, "epochs": 30, "seeds": 3}
PRECISION_QUICK = {"lm_steps": 30, "epochs": 3, "seeds": 3}
# The state experiment's (four state formats; its toy problem runs unclipped ADOPT only).
STATE_DEFAULTS = {"lm_steps": 600, "epochs": 30, "seeds": 3, "steps": 10_000, "toy_seeds": 32}
STATE_QUICK = {"lm_steps": 30, "epochs": 3, "seeds": 3, "steps": 1_000, "toy_seeds": 32}
INSTALL_HINT = 'pip install ".[demo]" (in a clone of the repository)'

DESCRIPTION = """\
Reproduce the evidence of the ADOPT paper (Taniguchi et al., NeurIPS 2024) on this machine.

  toy     The paper's counterexample: minimise f(theta) = theta on [-1, 1] from gradients
          that are 100 with probability 1/10 and -10 otherwise. Adam drifts to the wrong
          end (+1) for small beta2; ADOPT converges to -1 for every beta2. Compares Adam,
          AMSGrad, ADOPT without clipping and ADOPT with its default clip.
  digits  A small MLP on scikit-learn's built-in digits (no download), trained with
          ADOPT, Adam and AdamW at their default beta2 and at beta2 = 0.5.
  precision  (only when chosen) Pure bfloat16 training: the digits MLP and a small
          character-level transformer language model on this Python's own standard
          library sources, each with float32 parameters, bfloat16 parameters with
          round-to-nearest, and bfloat16 with ADOPT(stochastic_rounding=True), over 3
          seeds. About 2-3 minutes, --quick under 30 seconds.
  state   (only when chosen) Low-memory optimizer state: the digits MLP, the
          character-level LM and the toy problem (unclipped ADOPT, 10000 steps), with
          float32 parameters and ADOPT(state_precision=...) "full", "bf16", "8bit"
          (min_8bit_size=0, so every tensor's state is 8-bit) and an 8-bit
          round-to-nearest control, over 3 seeds; prints the final losses, whether each is
          within max(2 %, 2 sigma) of full, and the measured state bytes per parameter.
          About 4 minutes on 2 CPU cores with the fused CPU kernel (15 minutes on
          the torch-op path), --quick under a minute.

The default run (toy, digits) takes about 30 seconds on 2 CPU cores, --quick under 10
seconds. Results go to --out: demo.png (figure), demo.json (all numbers); a table and a
plain reading of the numbers are printed.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _experiments(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown experiment {', '.join(map(repr, unknown)) or repr(text)}; choose from {', '.join(EXPERIMENTS)}"
        )
    return tuple(n for n in EXPERIMENTS if n in names)


_device = device_type(("cpu", "cuda", "mps"))


def _out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (its description and help texts included)."""
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  adopt demo                         full run (~30 s), writes ./adopt-demo/\n"
        "  adopt demo --quick                 smoke run (a few seconds)\n"
        "  adopt demo --experiments toy --steps 50000 --seeds 64 --out runs/toy\n"
        "  adopt demo --experiments precision   bfloat16 with and without stochastic rounding (~2-3 min)\n"
        "  adopt demo --experiments state       full, bf16 and 8-bit optimizer state (~4 min)"
    )
    parser.add_argument(
        "--experiments", type=_experiments, default=DEFAULT_EXPERIMENTS, metavar="LIST",
        help="comma-separated experiments to run: toy, digits, precision, state (default: toy,digits)",
    )
    parser.add_argument(
        "--steps", type=_positive_int, metavar="N",
        help=f"optimizer steps of the toy problem (default: {DEFAULTS['steps']}; --quick: {QUICK['steps']};"
        f" state: {STATE_DEFAULTS['steps']}, --quick {STATE_QUICK['steps']})",
    )
    parser.add_argument(
        "--epochs", type=_positive_int, metavar="N",
        help=f"training epochs of the digits MLP (default: {DEFAULTS['epochs']}; --quick: {QUICK['epochs']};"
        " the same for precision)",
    )
    parser.add_argument(
        "--lm-steps", type=_positive_int, metavar="N",
        help=f"optimizer steps of the precision and state experiments' language model (default:"
        f" {PRECISION_DEFAULTS['lm_steps']}; --quick: {PRECISION_QUICK['lm_steps']})",
    )
    parser.add_argument(
        "--seeds", type=_positive_int, metavar="N",
        help=f"independent runs per optimizer and beta2, batched together (default: {DEFAULTS['seeds']};"
        f" precision and state: {PRECISION_DEFAULTS['seeds']}; the state experiment's toy problem:"
        f" {STATE_DEFAULTS['toy_seeds']})",
    )
    parser.add_argument(
        "--device", type=_device, default="cpu", metavar="DEV",
        help="torch device: cpu (default), cuda, cuda:N or mps",
    )
    parser.add_argument(
        "--out", type=_out_dir, default=Path("adopt-demo"), metavar="DIR",
        help="output folder for demo.png and demo.json, created if needed (default: ./adopt-demo)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a few-second smoke run: {QUICK['steps']} toy steps, {QUICK['epochs']} digits epochs",
    )


def _missing_packages(experiments: tuple[str, ...]) -> list[str]:
    """Distribution names of the demo dependencies that cannot be imported."""
    needed = {"matplotlib": "matplotlib", "tqdm": "tqdm"}
    if {"digits", "precision", "state"} & set(experiments):
        needed["sklearn"] = "scikit-learn"
    missing = []
    for module, dist in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    return missing


def _progress(total: int, description: str, unit: str) -> Any:
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, desc=description, unit=unit, disable=None, mininterval=0.25, dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    """Run the chosen experiments, print the table and reading, write the figure and JSON."""
    missing = _missing_packages(args.experiments)
    if missing:
        print(
            f"adopt demo needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed.\n"
            f"Install the demo extra with:  {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2

    import torch

    preset = QUICK if args.quick else DEFAULTS
    steps, epochs, seeds = (getattr(args, k) or preset[k] for k in ("steps", "epochs", "seeds"))
    device = args.device
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"adopt demo: error: argument --out: cannot create {str(args.out)!r}: {error.strerror}", file=sys.stderr)
        return 2

    # The tensors are tiny: extra intra-op threads only add synchronisation, and on a busy
    # machine they slow the run down several-fold. Restored afterwards for in-process callers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args, steps, epochs, seeds, device)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, steps: int, epochs: int, seeds: int, device: Any) -> int:
    """The body of :func:`run`, after checking dependencies and resolving the settings."""
    import torch

    import adopt

    from . import report

    started = time.perf_counter()
    results: dict[str, Any] = {
        "adopt_version": adopt.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "quick": bool(args.quick),
    }
    if "toy" in args.experiments:
        from .toy import OPTIMIZERS, run_toy

        print(
            f"[toy] {len(OPTIMIZERS)} optimizers x 4 beta2, {steps} steps,"
            f" {seeds} seeds as one tensor each, on {device}",
            flush=True,
        )
        t0 = time.perf_counter()
        results["toy"] = run_toy(steps, seeds, device, lambda n, d: _progress(n, d, "step"))
        results["toy"]["seconds"] = round(time.perf_counter() - t0, 1)
    if "digits" in args.experiments:
        from .digits import run_digits

        print(
            f"[digits] ADOPT, Adam, AdamW x 2 beta2 settings, {epochs} epochs, {seeds} seeds, on {device}",
            flush=True,
        )
        t0 = time.perf_counter()
        results["digits"] = run_digits(epochs, seeds, device, lambda n, d: _progress(n, d, "epoch"))
        results["digits"]["seconds"] = round(time.perf_counter() - t0, 1)
    if "precision" in args.experiments:
        from .precision import VARIANTS, run_precision

        preset = PRECISION_QUICK if args.quick else PRECISION_DEFAULTS
        lm_steps, p_epochs, p_seeds = (getattr(args, k) or preset[k] for k in ("lm_steps", "epochs", "seeds"))
        print(
            f"[precision] digits MLP ({p_epochs} epochs) and char-level LM ({lm_steps} steps) x"
            f" {len(VARIANTS)} parameter precisions, {p_seeds} seeds, on {device}",
            flush=True,
        )
        t0 = time.perf_counter()
        results["precision"] = run_precision(lm_steps, p_epochs, p_seeds, device, lambda n, d: _progress(n, d, "step"))
        results["precision"]["seconds"] = round(time.perf_counter() - t0, 1)
    if "state" in args.experiments:
        from .state_precision import VARIANTS as STATE_VARIANTS, run_state_precision

        preset = STATE_QUICK if args.quick else STATE_DEFAULTS
        lm_steps, s_epochs, s_seeds, toy_steps = (
            getattr(args, k) or preset[k] for k in ("lm_steps", "epochs", "seeds", "steps")
        )
        print(
            f"[state] digits MLP ({s_epochs} epochs), char-level LM ({lm_steps} steps) and toy problem"
            f" ({toy_steps} steps) x {len(STATE_VARIANTS)} state precisions, {s_seeds} seeds, on {device}",
            flush=True,
        )
        t0 = time.perf_counter()
        results["state"] = run_state_precision(
            lm_steps, s_epochs, s_seeds, toy_steps, preset["toy_seeds"], device,
            lambda n, d: _progress(n, d, "step"),
        )
        results["state"]["seconds"] = round(time.perf_counter() - t0, 1)

    tables, reading = [], []
    if "toy" in results:
        tables.append(report.toy_table(results["toy"]))
        reading += report.toy_reading(results["toy"])
    if "digits" in results:
        tables.append(report.digits_table(results["digits"]))
        reading += report.digits_reading(results["digits"])
    if "precision" in results:
        tables.append(report.precision_table(results["precision"]))
        reading += report.precision_reading(results["precision"])
    if "state" in results:
        tables.append(report.state_table(results["state"]))
        reading += report.state_reading(results["state"])
    results["reading"] = reading
    limits = report.run_limits(results)
    results["limits"] = limits

    figure, numbers = args.out / "demo.png", args.out / "demo.json"
    report.save_figure(results, figure)
    results["seconds"] = round(time.perf_counter() - started, 1)
    numbers.write_text(json.dumps(results, indent=1) + "\n")

    print()
    print("\n\n".join(tables))
    if limits:
        print("\nWhat a run this short cannot show")
        print("\n".join(limits))
    print("\nWhat this run shows")
    print("\n".join(reading))
    print(f"\nWrote {figure} and {numbers} in {results['seconds']:.0f} s.")
    return 0
