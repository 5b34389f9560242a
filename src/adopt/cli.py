"""The ``adopt`` command line: ``adopt demo``, ``adopt bench`` and ``adopt info``.

Each subcommand lives in its own module exposing ``configure_parser(parser)`` and
``run(args) -> int``. The module is imported only once its subcommand is chosen, so
``adopt --help`` stays fast and needs none of the optional dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

# Subcommand -> (module, one-line help for the overview).
COMMANDS = {
    "demo": (
        "adopt.demo",
        "reproduce the ADOPT paper's evidence: its toy counterexample (Adam goes the wrong way, "
        "ADOPT does not) and a small MLP on scikit-learn's digits; ~30 s on 2 CPU cores, "
        "writes a figure and JSON to ./adopt-demo",
    ),
    "bench": (
        "adopt.bench",
        "time one optimizer step of each ADOPT implementation (single-tensor, foreach, fused) "
        "against torch.optim.AdamW and the memory-bandwidth limit; prints a table and writes "
        "JSON to ./adopt-bench (--quick: seconds)",
    ),
    "info": (
        "adopt.info",
        "print what a bug report needs: versions, whether the fused CPU kernel is built (and its "
        "SIMD level and OpenMP runtime), threads, Triton and CUDA",
    ),
}

DESCRIPTION = """\
ADOPT: an Adam variant that converges for any beta2 (Taniguchi et al., NeurIPS 2024).
Use it in code as `from adopt import ADOPT`; this command runs demonstrations and benchmarks.
"""

EPILOG = """\
start here:
  adopt demo            run the demo (about 30 seconds), results in ./adopt-demo/
  adopt demo --quick    the same in under 10 seconds
  adopt demo --help     all demo options

Demo dependencies: pip install ".[demo]" (in a clone of the repository)
"""


def _version() -> str:
    try:
        return version("adopt-optim")
    except PackageNotFoundError:  # running from a source tree without an install
        return "unknown (adopt-optim is not installed)"


def _overview_parser(prog: str) -> argparse.ArgumentParser:
    """The top-level parser: lists subcommands without importing them."""
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, summary) in COMMANDS.items():
        # add_help=False: the subcommand's own parser answers --help with its full options.
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None, prog: str = "adopt") -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen subcommand, return its exit code.

    Bad arguments print a usage error and give exit code 2, as argparse does.
    """
    overview = _overview_parser(prog)
    try:  # argparse exits on --help, --version and bad arguments; return its code instead
        known, rest = overview.parse_known_args(sys.argv[1:] if argv is None else argv)
        if known.command is None:
            overview.print_help(sys.stderr)
            return 2
        module_name, summary = COMMANDS[known.command]
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"{prog} {known.command}", description=summary)
        module.configure_parser(parser)
        args = parser.parse_args(rest)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return int(module.run(args))
    except BrokenPipeError:  # stdout closed early, e.g. `adopt demo | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
