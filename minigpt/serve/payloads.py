"""Chat histories that arrive over HTTP, checked in our words before Gradio reads them.

Before an event handler runs, Gradio copies every file a payload names into its cache (refusing a
server path with a message that names it) and validates the shape with pydantic (a multi-line dump
that links to pydantic's site). Checking the raw payload first means a malformed or oversized history
is refused with one line of ours, and nothing in it is read, copied or echoed back. Gradio's own
input checks (a number outside its slider's range) are the sender's mistake too: the sender is told,
and the server log is spared a traceback.
"""
from __future__ import annotations

import gradio as gr

from .conversation import check_history
from .handlers import checked


def check_chat_payloads(demo: gr.Blocks) -> None:
    """Make every event of `demo` check the raw history sent to each of its Chatbots first."""
    preprocess = demo.preprocess_data  # Gradio's own step: files to the cache, pydantic, component preprocess

    async def preprocess_checked(block_fn, inputs: list, state, explicit_call: bool = False):
        for block, value in zip(block_fn.inputs, inputs):
            if isinstance(block, gr.Chatbot) and value is not None:
                checked(check_history, value)
        try:
            return await preprocess(block_fn, inputs, state, explicit_call)
        except gr.Error as e:
            e.print_exception = False
            raise

    demo.preprocess_data = preprocess_checked
