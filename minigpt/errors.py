class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or matched to the model; the message says which and why."""


class DamagedFileError(CheckpointError):
    """A checkpoint file whose bytes are broken (truncated, garbled): `path` names it, `damage` says how.
    From the Hub cache, such a file is re-downloaded rather than trusted again."""

    def __init__(self, message: str, path, damage: str) -> None:
        super().__init__(message)
        self.path, self.damage = path, damage


class DeviceError(ValueError):
    """A --device this machine cannot run on (an unknown name, or CUDA/MPS not available)."""
