"""GPT-2's byte-level BPE as a tiktoken Encoding, built from a snapshot's vocab.json and merges.txt.

Nothing is downloaded: a cached model folder is enough. User text is encoded with encode_ordinary,
so a typed "<|endoftext|>" stays text; only code that means the special token uses it.
"""
from __future__ import annotations

import json
from pathlib import Path

import tiktoken

from .errors import CheckpointError

EOT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenizer split (as in tiktoken's own "gpt2" encoding).
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as used in vocab.json and merges.txt.

    Insertion order is GPT-2's base-token order: printable bytes first, then the rest.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def mergeable_ranks(vocab_path: Path, merges_path: Path) -> dict[bytes, int]:
    """Token bytes -> rank: the 256 single bytes, then each merge in file order; checked against vocab.json."""
    to_byte = {c: b for b, c in byte_to_unicode().items()}

    def as_bytes(token: str) -> bytes:
        return bytes(to_byte[c] for c in token)

    ranks = {bytes([b]): i for i, b in enumerate(byte_to_unicode())}
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    for line in lines[1:] if lines and lines[0].startswith("#version") else lines:
        if line.strip():
            left, right = line.split()
            ranks[as_bytes(left) + as_bytes(right)] = len(ranks)

    vocab = {as_bytes(tok): i for tok, i in json.loads(vocab_path.read_text(encoding="utf-8")).items() if tok != EOT}
    if vocab != ranks:
        raise CheckpointError(f"{vocab_path} and {merges_path.name} disagree: they are not one GPT-2 tokenizer")
    return ranks


def load_tokenizer(folder: str | Path) -> tiktoken.Encoding:
    folder = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise CheckpointError(f"missing tokenizer file {name} in {folder}")
    try:
        ranks = mergeable_ranks(folder / "vocab.json", folder / "merges.txt")
    except (ValueError, KeyError, UnicodeDecodeError) as e:  # bad JSON, a malformed merge line, a foreign character
        raise CheckpointError(f"unreadable tokenizer files in {folder}: {e!r}") from None
    return tiktoken.Encoding(name=f"gpt2@{folder}", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})  # 50256 for GPT-2
