"""What a request hands the page's events, checked in our words before Gradio reads it.

Before an event handler runs, Gradio copies every file a payload names into its cache (refusing a
server path with a message that names it), validates a chat history with pydantic (a multi-line dump
that links to pydantic's site), turns a slider's value into a number (a Python error for "abc") and
builds the clicked item of a select event from the event data (a Python error when there is none).
Checking the raw payload first means bad input is refused with one line of ours, nothing in it is
read, copied or echoed back, and the server log is spared a traceback.
"""
from __future__ import annotations

import functools
import inspect
import reprlib
import typing

import gradio as gr
from gradio.exceptions import ComponentProcessingError

from .conversation import check_history
from .handlers import checked, refusal


def check_payloads(demo: gr.Blocks) -> None:
    """Make every event of `demo` check its raw inputs (histories, slider values) and its event data first."""
    preprocess, process = demo.preprocess_data, demo.process_api  # Gradio's own steps

    async def preprocess_checked(block_fn, inputs: list, state, explicit_call: bool = False):
        inputs = [read_input(block, value) for block, value in zip(block_fn.inputs, inputs)] + \
            inputs[len(block_fn.inputs):]
        try:
            return await preprocess(block_fn, inputs, state, explicit_call)
        except gr.Error as e:  # Gradio's own input checks (a number outside its slider's range): the sender's mistake
            e.print_exception = False
            raise
        except ComponentProcessingError as e:
            raise refusal(str(e).split("\n")[0].split(" of the event handler")[0] + ": it could not be read.") from None

    async def process_checked(*args, **kwargs):
        block_fn = kwargs["block_fn"] if "block_fn" in kwargs else args[0]
        block_fn = demo.fns[block_fn] if isinstance(block_fn, int) else block_fn
        data = getattr(kwargs.get("event_data"), "_data", None)
        if takes_selection(block_fn.fn) and not (isinstance(data, dict) and {"index", "value"} <= data.keys()):
            raise refusal("This event needs the item that was clicked, and the request did not say which.")
        return await process(*args, **kwargs)

    demo.preprocess_data, demo.process_api = preprocess_checked, process_checked


def read_input(block: gr.components.Component, value: object) -> object:
    """A raw input value as Gradio may read it, or a refusal. A history's text content is made the list of
    text parts Gradio 6's Chatbot validates (the API documents both)."""
    if isinstance(block, gr.Chatbot) and value is not None:
        checked(check_history, value)
        return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
                for m in value]
    if isinstance(block, gr.Slider) and value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float))):
        raise refusal(f"{block.label or 'A slider'} must be a number, got {reprlib.repr(value)}.")
    return value


@functools.cache  # asked at every step of every event: the handlers are few and fixed
def takes_selection(fn) -> bool:
    """Whether Gradio hands fn the clicked item (a parameter typed gr.SelectData)."""
    if fn is None:
        return False
    try:
        hints = typing.get_type_hints(inspect.unwrap(fn))
    except Exception:  # a hint that does not resolve: Gradio would not see a SelectData there either
        return False
    return any(isinstance(hint, type) and issubclass(hint, gr.SelectData) for hint in hints.values())
