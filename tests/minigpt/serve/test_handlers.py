"""The Gradio handlers given what only a crafted request sends to the page's private events: each refusal is
a gr.Error with our one-line message, never a Python error whose text would reach the client."""
import gradio as gr
import numpy as np
import pytest

from minigpt.serve.engine import load_engine
from minigpt.serve.handlers import ChatHandlers
from minigpt.serve.inspect_panels import InspectHandlers
from minigpt.serve.panels import AttentionWindow
from minigpt.serve.session import Session


@pytest.fixture(scope="module")
def handlers(tiny_checkpoint):
    return ChatHandlers(load_engine(str(tiny_checkpoint[0]), None, "cpu", "float32"))


def session_with_attention(n_layer=2, n_head=2) -> Session:
    session = Session()
    session.window = AttentionWindow(np.full((n_layer, n_head, 2, 3), 1 / 3), ["a", "b"], ["x", "y", "z"], 2, 3)
    return session


@pytest.mark.parametrize("index, message", [("1", None), ("one", "Token index must be a number, got 'one'"),
                                            (None, "Token index must be a number, got None"),
                                            ([0, 1], "Token index must be a number"), (0.5, "must be a whole number")])
def test_a_picked_token_index_is_checked(handlers, index, message):
    event = gr.SelectData(None, {"index": index, "value": "x", "selected": True})
    inspect = InspectHandlers(handlers.engine)
    if message is None:
        assert inspect.pick_token(Session(), 0, -1, event)["caption"].startswith("No reply yet")
    else:
        with pytest.raises(gr.Error, match=message):
            inspect.pick_token(Session(), 0, -1, event)


@pytest.mark.parametrize("layer, head, message", [
    (None, -1, "Layer must be a number, got None"), (0, None, "Head must be a number, got None"),
    ("0", "x", "Head must be a number, got 'x'"), (2, -1, "Layer must be between 0 and 1, got 2"),
    (0, -2, "Head must be between -1 and 1, got -2"), (0, 2, "Head must be between -1 and 1, got 2"),
])
def test_attention_layer_and_head_are_checked(layer, head, message):
    with pytest.raises(gr.Error, match=message):
        ChatHandlers.attention_panel(session_with_attention(), layer, head)


def test_before_any_reply_only_numbers_are_accepted_as_layer_and_head():
    assert ChatHandlers.attention_panel(Session(), 5, 9)["heatmap"] is None  # nothing to draw yet: any number will do
    with pytest.raises(gr.Error, match="Layer must be a number, got None"):
        ChatHandlers.attention_panel(Session(), None, -1)


def test_valid_layer_and_head_draw_the_heatmap():
    figure, note = ChatHandlers.attention_panel(session_with_attention(), "1", 1).values()
    assert note == "Rows: all 2 reply tokens. Columns: all 3 context tokens."
    assert figure.axes[0].get_title() == "Layer 2, head 2"


def test_a_position_that_is_not_a_number_is_refused(handlers):
    with pytest.raises(gr.Error, match="Token position must be a number, got None"):
        handlers.alternatives_at(Session(), None)
