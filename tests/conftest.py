import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The suite runs in two workers (pyproject's addopts) on as few as two cores, with the apps and commands they
# start: PyTorch's OpenMP threads, spinning while they wait, would burn the other worker's core. Set before torch
# is imported, here and in every process a test starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.helpers.checkpoints import make_checkpoint  # noqa: E402  (env first: transformers reads it on import)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random GPT-2 in the official Hub layout: (folder, transformers model)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(our model, tokenizer, transformers model) for the shared tiny checkpoint, on CPU."""
    from minigpt import load_pretrained
    folder, hf_model = tiny_checkpoint
    model, tokenizer = load_pretrained(folder, device="cpu")
    return model, tokenizer, hf_model
