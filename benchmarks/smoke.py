"""`--smoke`: each benchmark's whole path on a tiny checkpoint, in seconds (`make bench-smoke`).

A smoke run builds, quantizes and loads the same kind of checkpoint, starts the same servers
and prints the same tables as the real run, so a change that breaks a benchmark shows at once.
Its figures time a model of a few MB for a handful of tokens: they mean nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NOTE = "(smoke: not a measurement)"
# Beside the checkpoints (git-ignored), never among the measured results in benchmarks/results.
RESULTS = Path(__file__).resolve().parent / "cache" / "smoke-results"
REPEATS = 1
NEW_TOKENS = 8
TURNS = 2


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check that the benchmark runs: a tiny checkpoint, one repeat, few tokens (the figures mean nothing)",
    )


def results_folder(args: argparse.Namespace, measured: Path) -> Path:
    """Where the JSON goes: --results when given, else the measured or the smoke folder."""
    if args.results is not None:
        return args.results
    return RESULTS if args.smoke else measured
