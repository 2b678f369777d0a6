"""Alpaca instruction data: reading records and reporting the malformed ones (the template: minigpt.prompts)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its network errors are not OSErrors
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from minigpt.hub import cache_snapshot, network_problem, redownload
from minigpt.prompts import alpaca_prompt

DEFAULT_DATA = "yahma/alpaca-cleaned/alpaca_data_cleaned.json"



@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        return alpaca_prompt(self.instruction, self.input)


def parse_records(raw: list) -> tuple[list[Record], list[str]]:
    """Valid records, and one line per skipped record naming its index (0-based) and the problem."""
    records, problems = [], []
    for i, item in enumerate(raw):
        problem = _problem(item)
        if problem:
            problems.append(f"record {i}: {problem}")
        else:
            records.append(Record(item["instruction"], item.get("input", ""), item["output"]))
    return records, problems


def _problem(item: object) -> str | None:
    if isinstance(item, ValueError):
        return str(item)
    if not isinstance(item, dict):
        return f"expected an object with instruction/input/output, got {type(item).__name__}"
    for key in ("instruction", "output"):
        if key not in item:
            return f"missing field {key!r}"
    for key in ("instruction", "input", "output"):
        if key in item and not isinstance(item[key], str):
            return f"field {key!r} is {type(item[key]).__name__}, expected a string"
    if not item["output"].strip():
        return "empty output: nothing to learn"
    return None


class DamagedDataError(ValueError):
    """A data file whose bytes do not decode (not UTF-8, not JSON): from the Hub cache, it is fetched again."""


def read_raw(path: Path) -> list:
    """The items of a .json array or a .jsonl file (one object per line, blank lines ignored).

    A .jsonl line that is not UTF-8 or not JSON, or is nested too deeply, becomes a ValueError item:
    reported and skipped like any malformed record. A .json file must be whole."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if path.suffix == ".jsonl":
        items = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line.decode("utf-8")))
                except UnicodeDecodeError as e:
                    items.append(ValueError(f"line {n} is not UTF-8 (byte {e.start + 1})"))
                except json.JSONDecodeError as e:
                    items.append(ValueError(f"line {n} is not valid JSON: {e.msg}"))
                except RecursionError:
                    items.append(ValueError(f"line {n} is nested too deeply"))
        return items
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DamagedDataError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DamagedDataError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a list of records") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON array of records, found {type(data).__name__}")
    return data


def resolve_data(spec: str) -> Path:
    """A local .json/.jsonl file, or a Hub dataset repo: `owner/name/file.json`, or `owner/name` when the
    repo holds exactly one .json/.jsonl file. Hub files are downloaded once, then read from the cache."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"{path}: expected a .json or .jsonl file")
        return path
    if local_problem := _not_a_file(spec, path):
        raise ValueError(f"--data {spec}: {local_problem}")
    parts = spec.split("/", 2)
    repo_id = "/".join(parts[:2])
    try:
        filename = parts[2] if len(parts) == 3 else _only_json_file(repo_id)
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except LocalEntryNotFoundError as e:
        problem = network_problem(e.__cause__) if e.__cause__ is not None else "offline"
        if problem == "offline":
            raise ValueError(f"cannot download dataset {repo_id}: downloads are off (HF_HUB_OFFLINE=1) and it is not "
                             "cached; pass a local file with --data path/to/alpaca.json") from None
        raise ValueError(f"cannot download dataset {repo_id}: {problem or str(e).splitlines()[0]}, and it is not "
                         "cached; try again later, or pass a local file with --data path/to/alpaca.json") from None
    except EntryNotFoundError:
        raise ValueError(f"dataset {repo_id} has no file {filename!r}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"no dataset file or Hub dataset repository named {repo_id!r}") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        problem = network_problem(e) or str(e).splitlines()[0]
        if problem == "offline":
            problem = "downloads are off (HF_HUB_OFFLINE=1) and it is not cached"
        raise ValueError(f"cannot download dataset {repo_id}: {problem}; nothing partial was kept: run again to "
                         "retry, or pass a local file with --data path/to/alpaca.json") from None


def _not_a_file(spec: str, path: Path) -> str | None:
    """Why a --data that names something on this machine is not a data file, or None when it names a Hub dataset.

    It names a local path when something is there (a folder, a pipe, a dangling link), when it is written as
    one (/, ./, ../, ~, or a single name like data.json) or when it is not owner/name[/file.json]."""
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    if path.is_dir():
        return "a folder: name the .json or .jsonl file in it"
    if path.exists():
        return "not a regular file (a pipe, a device or a socket): name a .json or .jsonl file"
    parts = spec.split("/", 2)
    if spec.startswith(("/", "./", "../", "~", ".\\")) or os.sep != "/" and os.sep in spec or len(parts) < 2 or \
            not all(parts[:2]) or len(parts) == 3 and not parts[2].endswith((".json", ".jsonl")):
        return "no such file (a Hub dataset is named owner/name or owner/name/file.json)"
    return None


def _only_json_file(repo_id: str) -> str:
    """The one .json/.jsonl file of a Hub dataset: listed on the Hub, or, offline, in its cached snapshot."""
    try:
        listed = HfApi().list_repo_files(repo_id, repo_type="dataset")
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        if isinstance(e, RepositoryNotFoundError):
            raise
        try:  # offline or unreachable: what was downloaded before
            snapshot = Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
        except (LocalEntryNotFoundError, OSError):
            raise e from None
        listed = [f.relative_to(snapshot).as_posix() for f in snapshot.rglob("*") if f.is_file()]
    files = [f for f in listed if f.endswith((".json", ".jsonl"))]
    if len(files) != 1:
        raise ValueError(f"dataset {repo_id} has {len(files)} .json/.jsonl files ({', '.join(files[:5])}); "
                         f"name one: --data {repo_id}/FILE")
    return files[0]


def load_records(spec: str) -> tuple[list[Record], list[str]]:
    """Records of a file or Hub dataset. A Hub file in the cache that no longer reads (damaged on disk) is
    downloaded again, once, rather than trusted on every run."""
    path = resolve_data(spec)
    try:
        raw = read_raw(path)
    except DamagedDataError as e:
        if (cached := cache_snapshot(path)) is None:
            raise
        redownload(*cached, "dataset", ValueError, str(e).removeprefix(f"{path} "))
        raw = read_raw(path)
    return parse_records(raw)
