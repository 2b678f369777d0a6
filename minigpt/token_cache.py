"""A text file tokenized once into a flat file of int32 token ids, memory-mapped by every run and rank.

As nanoGPT's prepare step writes train.bin, the first pre-training run on a text streams it through
the tokenizer a chunk at a time and writes the ids to the cache; later runs, and the other ranks of a
torchrun job, map that file instead of tokenizing again. Neither the text nor its tokens are ever
held in memory whole: training reads windows out of the mapped file, and the OS pages them in.

The cache lives in $MINIGPT_CACHE/tokens (default ~/.cache/minigpt/tokens), one file per (text path,
size, modification time, tokenizer files), so an edited text or another tokenizer gets its own.
"""
from __future__ import annotations

import hashlib
import os
import re
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import tiktoken
import torch

from .atomic import atomic_write

CHUNK_CHARS = 1 << 20  # characters read and tokenized at a time
# Where a text can be cut without changing its tokens: after a newline that follows a non-space and precedes
# one. GPT-2's pre-tokenizer then always makes that newline a piece of its own (whitespace pieces hold only
# whitespace, and only a space, never a newline, joins the following word), so the pieces, and the tokens,
# on either side are those of the whole text.
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
TOKEN_BYTES = 4  # int32


def cache_folder() -> Path:
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt")) / "tokens"


def cache_path(text: Path, tokenizer_folder: Path) -> Path:
    stat = text.stat()
    key = hashlib.sha256(f"{text.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    for name in ("vocab.json", "merges.txt"):
        key.update((tokenizer_folder / name).read_bytes())
    return cache_folder() / f"{text.stem[:40]}-{key.hexdigest()[:16]}.int32"


def chunks(text: Path, size: int = CHUNK_CHARS) -> Iterator[str]:
    """The text in pieces of about `size` characters, each cut where tokenizing the pieces one by one gives
    the tokens of the whole."""
    carry = ""
    with text.open(encoding="utf-8") as f:
        while block := f.read(size):
            carry += block
            cut = None
            for cut in SAFE_CUT.finditer(carry, max(0, len(carry) - size)):
                pass
            if cut is not None and cut.start() > 0:
                yield carry[:cut.start()]
                carry = carry[cut.start():]
    if carry:
        yield carry


def write_tokens(text: Path, tokenizer: tiktoken.Encoding, path: Path, chunk_chars: int = CHUNK_CHARS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, tmp.open("wb") as out:
        for piece in chunks(text, chunk_chars):
            out.write(array("i", tokenizer.encode_ordinary(piece)).tobytes())


def map_tokens(path: Path) -> torch.Tensor:
    """The cached ids as a read-only-in-spirit int32 tensor over the mapped file (copy-on-write, never written)."""
    n = path.stat().st_size // TOKEN_BYTES
    if n == 0:
        return torch.zeros(0, dtype=torch.int32)
    return torch.from_file(str(path), shared=False, size=n, dtype=torch.int32)


def cached_tokens(text: Path, tokenizer: tiktoken.Encoding, tokenizer_folder: Path, build: bool,
                  wait: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, bool]:
    """(the text's token ids, mapped from the cache; whether this call tokenized it). `build`: this process
    writes a missing cache (rank 0); `wait`: where the others wait for it (a barrier)."""
    try:
        path = cache_path(text, tokenizer_folder)
        made = build and not path.exists()
        if made:
            write_tokens(text, tokenizer, path)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --text {text}: {e}") from None
    wait()
    return map_tokens(path), made
