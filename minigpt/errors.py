class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or matched to the model; the message says which and why."""
