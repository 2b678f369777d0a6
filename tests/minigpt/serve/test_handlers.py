"""The Gradio handlers given what only a crafted request sends to the page's private events: each refusal is
a gr.Error with our one-line message, never a Python error whose text would reach the client."""
import gradio as gr
import pytest

from minigpt.serve.engine import load_engine
from minigpt.serve.handlers import ChatHandlers
from minigpt.serve.session import Session


@pytest.fixture(scope="module")
def handlers(tiny_checkpoint):
    return ChatHandlers(load_engine(str(tiny_checkpoint[0]), None, "cpu", "float32"))


def test_a_position_that_is_not_a_number_is_refused(handlers):
    with pytest.raises(gr.Error, match="Token position must be a number, got None"):
        handlers.alternatives_at(Session(), None)
