"""Where model and adapter files come from: a local folder, or a Hub repo fetched into the Hub cache."""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
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


def fetch(name_or_path: str | Path, files: list[str], what: str,
          error: type[CheckpointError] = CheckpointError) -> Path:
    """A local folder as is; otherwise the Hub repo of that id, only `files` of it.

    snapshot_download honours HF_HOME and HF_HUB_OFFLINE, reuses the cache and shows the Hub's own
    progress bars. Every failure becomes one line of `error`, naming `what` was asked for.
    """
    if (path := local_folder(name_or_path)) is not None:
        return path
    repo_id = str(name_or_path)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=files))
    except LocalEntryNotFoundError:
        raise error(f"{what} {repo_id!r} is neither a local folder nor in the Hugging Face cache, and the Hub "
                    "cannot be reached (offline or HF_HUB_OFFLINE=1); connect once to download it") from None
    except HFValidationError:
        raise error(f"no {what} folder {repo_id!r} (nor is it a Hub repo id)") from None
    except RepositoryNotFoundError:
        raise error(f"no {what} folder or Hub repository named {repo_id!r}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise error(f"could not download {what} {repo_id!r}: {str(e).splitlines()[0]}") from None
