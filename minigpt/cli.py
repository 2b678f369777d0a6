"""Command-line pieces shared by every MiniGPT command (python -m minigpt.generate, python app.py, ...)."""
from __future__ import annotations

import argparse
import sys

from .inference import PRECISIONS


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    """--precision (alias --dtype), and --compile, which is accepted and ignored: the fastest decode
    step is now chosen at load time (docs/speed.md says why the compiled step was removed)."""
    p.add_argument("--precision", "--dtype", dest="precision", default="float32", choices=PRECISIONS,
                   help="float32 is exact; int8 (int8 weights) is the fastest on CPU (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)


def warn_if_compile(args: argparse.Namespace) -> None:
    if args.compile:
        print("note: --compile is no longer needed and is ignored: the fastest decode step is chosen at load time",
              file=sys.stderr)
