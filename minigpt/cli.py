"""What the command lines share: --help that shows defaults, and leaving promptly after Ctrl-C."""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

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


def exit_cli(code: int) -> NoReturn:
    """sys.exit(code); after Ctrl-C (code 130), leave at once instead: a download thread blocked on a
    stalled connection would otherwise hold the exit for minutes. huggingface_hub downloads into a
    uniquely named temporary file and renames it only when complete, so nothing half-written is trusted."""
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
