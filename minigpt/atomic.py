"""Write a file so that readers (and a crash, or a full disk) see either the old version or the complete new one."""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

HEADER_BYTES_PER_TENSOR = 256  # safetensors' JSON header: name, dtype, shape and offsets, generously


class DiskFull(OSError):
    """Not enough room for a file: nothing of it was kept, the previous version (if any) is intact."""

    def __init__(self, path: Path, needed: int | None, free: int):
        need = f"needs {size_text(needed)}" if needed is not None else "did not fit"
        super().__init__(errno.ENOSPC, f"the disk is full: writing {path.name} {need}, {size_text(free)} free "
                                       f"in {path.parent}")
        self.path, self.needed, self.free = path, needed, free

    def __str__(self) -> str:
        return self.strerror


def size_text(n: int) -> str:
    """12.3 MB, 45.6 kB or 789 bytes."""
    if n >= 1e6:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} bytes"


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def is_disk_full(e: BaseException) -> bool:
    """An OSError for ENOSPC (or EDQUOT), or safetensors' error for one, which carries Rust's io::Error as text
    ("I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, SafetensorError) and any(f"os error {n})" in str(e) for n in (errno.ENOSPC, errno.EDQUOT))


@contextmanager
def atomic_write(path: str | Path, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in path's folder; on success it is fsynced and renamed over path.

    size: the bytes about to be written, when known: refused beforehand (DiskFull) if the disk has less
    room. A disk that fills up anyway (ENOSPC) is DiskFull too; either way the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if size is not None and (free := free_bytes(path.parent)) < size:
        raise DiskFull(path, size, free)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        if not is_disk_full(e):
            raise
        tmp.unlink(missing_ok=True)  # first: the free space reported below counts it as free again
        raise DiskFull(path, size, free_bytes(path.parent)) from None
    finally:
        tmp.unlink(missing_ok=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, atomically, refused up front (DiskFull) when the disk lacks the file's size."""
    size = sum(t.numel() * t.element_size() + HEADER_BYTES_PER_TENSOR for t in tensors.values()) + \
        sum(len(k) + len(v) for k, v in (metadata or {}).items())
    with atomic_write(path, size) as tmp:
        save_file(tensors, tmp, metadata=metadata)
