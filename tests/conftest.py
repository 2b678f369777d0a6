import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

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
