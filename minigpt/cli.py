"""What the command lines share: --help that shows defaults, the precision option, and leaving promptly
after Ctrl-C."""
from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from .inference import PRECISIONS

INTERRUPTED = 130  # the shell's convention: 128 + SIGINT


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to every option that has a real default (not None, "", [] or a False flag) and
    does not already say its default in its own words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if default is None or default is False or default == "" or default == [] or default is argparse.SUPPRESS \
                or "default" in help:
            return help
        return super()._get_help_string(action)


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    """--precision (alias --dtype), and --compile, which is accepted and ignored: the fastest decode
    step is now chosen at load time (docs/speed.md says why the compiled step was removed)."""
    p.add_argument("--precision", "--dtype", dest="precision", default="float32", choices=PRECISIONS,
                   help="float32 is exact; int8 (int8 weights) is fast on CPU; int4 (4-bit weights, int8 lm_head) is "
                        "the smallest, at a measured quality cost (docs/speed.md) (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)


def warn_if_compile(args: argparse.Namespace) -> None:
    if args.compile:
        print("note: --compile is no longer needed and is ignored: the fastest decode step is chosen at load time",
              file=sys.stderr)


def exit_cli(code: int) -> NoReturn:
    """sys.exit(code); after Ctrl-C (code 130), leave at once instead: a download thread blocked on a
    stalled connection, or a server thread waiting for work that will never come, would otherwise hold the
    exit for minutes or for ever. huggingface_hub downloads into a uniquely named temporary file and renames
    it only when complete, so nothing half-written is trusted. The atexit cleanups (the app's export folder)
    still run: they remove files and wait for no thread."""
    if code == INTERRUPTED:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


@contextmanager
def ctrl_c_exits_now(message: str = "interrupted") -> Iterator[None]:
    """While loading (downloads included), Ctrl-C prints `message` and exits 130 at once.

    A KeyboardInterrupt cannot stop a download: huggingface_hub downloads in worker threads and waits for
    them, so a stalled connection would hold Ctrl-C for minutes. This process's own partial downloads
    (huggingface_hub's uniquely named *.incomplete files) are removed first; complete files are only ever
    renamed into the cache whole, so the next run trusts nothing half-written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame) -> None:
        print(f"\n{message}", file=sys.stderr)
        remove_own_partial_downloads()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)

    previous = signal.signal(signal.SIGINT, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def remove_own_partial_downloads() -> None:
    """Delete the *.incomplete files this process has open (Linux: /proc/self/fd); elsewhere, nothing."""
    try:
        fds = list(Path("/proc/self/fd").iterdir())
    except OSError:
        return
    for fd in fds:
        try:
            target = os.readlink(fd)  # fails for the listing's own, already closed, descriptor
            if target.endswith(".incomplete"):
                os.unlink(target)
        except OSError:
            pass
