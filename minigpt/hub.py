"""Where model and adapter files come from: a local folder, or a Hub repo fetched into the Hub cache."""
from __future__ import annotations

import os
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its network errors are not OSErrors
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from .errors import CheckpointError


def local_folder(name_or_path: str | Path) -> Path | None:
    """The folder a name points to, or None when it names no folder (a Hub repo id, say)."""
    try:
        path = Path(name_or_path).expanduser()
        return path if path.is_dir() else None
    except (OSError, RuntimeError):  # a name too long for a path, or an unknown ~user
        return None


def network_problem(error: BaseException) -> str | None:
    """What went wrong on the network, in a few words, from an error or the errors that caused it;
    None when nothing in the chain is a network problem."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OfflineModeIsEnabled):
            return "offline"
        if isinstance(error, HfHubHTTPError) and getattr(error, "response", None) is not None:
            return f"the Hub answered HTTP {error.response.status_code}"
        if isinstance(error, httpx2.TimeoutException):
            return (f"the Hub stopped answering (timed out after {os.environ.get('HF_HUB_DOWNLOAD_TIMEOUT', '10')} s; "
                    "HF_HUB_DOWNLOAD_TIMEOUT sets it)")
        if isinstance(error, httpx2.ConnectError):
            return "the Hub cannot be reached (no connection)"
        if isinstance(error, (httpx2.RemoteProtocolError, httpx2.ReadError)):
            return "the connection dropped in the middle of a file"
        if isinstance(error, httpx2.HTTPError):
            return f"network error ({type(error).__name__})"
        if isinstance(error, OSError) and "Consistency check failed" in str(error):
            return "a file arrived incomplete (shorter than the Hub said)"
        error = error.__cause__ or error.__context__
    return None


def fetch(name_or_path: str | Path, files: list[str], what: str,
          error: type[CheckpointError] = CheckpointError) -> Path:
    """A local folder as is; otherwise the Hub repo of that id, only `files` of it.

    snapshot_download honours HF_HOME and HF_HUB_OFFLINE, reuses the cache and shows the Hub's own
    progress bars. Every failure becomes one line of `error`, naming `what` was asked for and why.
    """
    if (path := local_folder(name_or_path)) is not None:
        return path
    repo_id = str(name_or_path)
    local = f"--{what} also takes a local folder"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=files))
    except LocalEntryNotFoundError as e:
        problem = network_problem(e.__cause__) if e.__cause__ is not None else "offline"
        if problem == "offline":
            raise error(f"{what} {repo_id!r} is neither a local folder nor in the Hugging Face cache, and downloads "
                        f"are off (HF_HUB_OFFLINE=1); connect and unset HF_HUB_OFFLINE once to download it "
                        f"({local})") from None
        raise error(f"cannot download {what} {repo_id!r}: {problem or str(e).splitlines()[0]}; it is not in the "
                    f"Hugging Face cache either. Try again later ({local})") from None
    except HFValidationError:
        raise error(f"no {what} folder {repo_id!r} (nor is it a Hub repo id)") from None
    except RepositoryNotFoundError:
        raise error(f"no {what} folder or Hub repository named {repo_id!r}") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as e:
        problem = network_problem(e)
        if problem is None:
            raise error(f"could not download {what} {repo_id!r}: {str(e).splitlines()[0]}") from None
        raise error(f"could not download {what} {repo_id!r}: {problem}. Nothing partial was kept: run again to "
                    f"retry ({local})") from None


def redownload(snapshot: Path, filename: str, what: str, error: type[CheckpointError], damage: str) -> None:
    """Replace a damaged file of a Hub-cache snapshot with a fresh download of the same commit.

    The cache keeps each file once, as a blob the snapshot links to: deleting the link does not help, the
    blob itself must be replaced; hf_hub_download(force_download=True) writes the new one beside it and
    renames it into place, so a failure leaves no half-written blob behind. Offline, say how to do it.
    """
    repo_id, repo_type, commit = cache_origin(snapshot)
    damaged = f"the cached {filename} of {what} {repo_id!r} is damaged ({damage})"
    command = f"hf download {repo_id} {filename} --force-download" + (f" --repo-type {repo_type}" if
                                                                       repo_type != "model" else "")
    if os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        raise error(f"{damaged}; downloads are off (HF_HUB_OFFLINE=1): connect and run again without it to "
                    f"re-download it, or: {command}")
    try:
        hf_hub_download(repo_id, filename, repo_type=repo_type, revision=commit, force_download=True)
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as e:
        problem = network_problem(e) or str(e).splitlines()[0]
        raise error(f"{damaged}, and re-downloading it failed: {problem}. Run again to retry, or: {command}") from None


def cache_origin(snapshot: Path) -> tuple[str, str, str]:
    """(repo id, repo type, commit) of a Hub-cache snapshot folder: .../{models|datasets}--owner--name/snapshots/sha."""
    repo_folder = snapshot.parent.parent.name
    kind, _, name = repo_folder.partition("--")
    return name.replace("--", "/"), kind.removesuffix("s"), snapshot.name


def in_hub_cache(snapshot: Path) -> bool:
    return snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith(("models--", "datasets--"))


def cache_snapshot(file: Path) -> tuple[Path, str] | None:
    """(snapshot folder, the file's name in the repo) for a file inside a Hub-cache snapshot; None otherwise."""
    for folder in file.parents:
        if in_hub_cache(folder):
            return folder, file.relative_to(folder).as_posix()
    return None
