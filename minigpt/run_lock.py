"""One training run per --out folder: a second run naming a folder that a run is using is refused at once,
instead of both writing checkpoints, the result and log.jsonl into it (and one losing its work)."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"  # left in the folder; what counts is the lock on it, which ends with the process


class FolderInUse(ValueError):
    """Another process holds the folder's lock; the message says which and what to do."""


@contextmanager
def only_run_in(folder: Path) -> Iterator[None]:
    """Hold folder's lock (creating the folder) while the block runs; FolderInUse if another process has it.

    An flock, so the system releases it whenever the holder ends, killed or not: no stale lock to clean up."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode(errors="replace").strip()
            by = f" (process {holder})" if holder.isdigit() else ""
            raise FolderInUse(f"{folder} is in use by another training run{by}: wait for it to end, or pick "
                              "another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # and with it the lock
