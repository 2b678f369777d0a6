"""The chat app's event handlers: what happens on Send, Retry, Undo, Stop, Clear and in the panels.

app.py lays the page out and wires these to its components; nothing here knows the layout. A handler
returns (or yields) its outputs by name, {"chat": history, "stats": line, ...}, only those it changes;
app.py's `by_name` hands Gradio the components of those names. Every handler receives the browser
session's Session (a gr.State) and the Engine every session shares.
"""
from __future__ import annotations

import anyio
import gradio as gr

from ..json_output import SchemaError, compile_schema
from .conversation import (
    ChatInputError,
    MoreSampling,
    as_chat_text,
    build_prompt,
    context_note,
    message_text,
    read_choice,
    read_request,
    whole_number,
    with_user_message,
    without_last_reply,
)
from .engine import Engine
from .panels import (
    AttentionWindow,
    alternatives,
    attention_window,
    heatmap,
    position_caption,
    token_highlights,
)
from .replies import paced, stats_line
from .scheduler import ServerBusy
from .session import Session

ATTENTION_HINT = "The attention of the last reply is computed when this panel is open."


def refusal(message: str) -> gr.Error:
    """Refused input, as the browser shows it: a toast that stays until closed. The page's own refusals come
    from the check steps, which have no outputs, so no component is covered by an "Error" badge."""
    return gr.Error(message, duration=None, print_exception=False)


def checked(read, *args):
    """read(*args), a ChatInputError becoming the user's message (for values a crafted request can send)."""
    try:
        return read(*args)
    except ChatInputError as e:
        raise refusal(str(e)) from None


def locked() -> dict:
    """Send, Retry, Undo and Clear wait while a reply streams; Stop does not."""
    return {name: gr.Button(interactive=False) for name in BUTTONS}


def unlock() -> dict:
    return {"msg": gr.Textbox(interactive=True), **{name: gr.Button(interactive=True) for name in BUTTONS}}


BUTTONS = ("send", "retry", "undo", "clear")


class ChatHandlers:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.ready = f"Ready · {engine.device}"

    def prepare(self, history, mode, temperature, top_k, top_p, max_new_tokens, seed, scale=1.0, *more):
        """(request, prompt, notices): everything a reply needs, validated; bad input becomes a message for
        the user. It tokenizes: an async handler calls it in a worker thread (prepare_async). `more`: the
        "More sampling" controls (MoreSampling's fields, in order)."""
        context = self.engine.n_positions
        try:
            request, notices = read_request(mode, temperature, top_k, top_p, max_new_tokens, seed, scale, context,
                                            MoreSampling(*more), self.engine.tokenizer.n_vocab)
            if request.params.json_schema is not None:
                try:
                    compile_schema(request.params.json_schema, self.engine.tokenizer)
                except SchemaError as e:
                    raise ChatInputError(f"The JSON schema cannot be used: {e}.") from None
            self.engine.model_for(request)  # refused here if the mode is off
            prompt = build_prompt(request.mode, history, self.engine.tokenizer, context - request.max_new_tokens)
        except ChatInputError as e:
            raise refusal(str(e)) from None
        return request, prompt, notices

    async def prepare_async(self, *args):
        """prepare(), off the event loop: tokenizing a long history must not hold up every other user."""
        return await anyio.to_thread.run_sync(self.prepare, *args)

    def check_message(self, message, history, *controls):  # controls as in prepare()
        """Refuse bad input before anything on the page changes, while the message is still in the box."""
        if not isinstance(message, str) or not message.strip():
            raise refusal("Type a message first.")
        self.prepare(with_user_message(history, message), *controls)

    def check_retry(self, history, *controls):
        self.prepare(without_last_reply(history), *controls)

    @staticmethod
    def add_message(session: Session, message, history) -> dict:
        """The checked message joins the chat and the controls lock until the reply has finished."""
        session.queue_reply()
        return {"msg": gr.Textbox(value="", interactive=False), "chat": with_user_message(history, message),
                **locked()}

    @staticmethod
    def retry(session: Session, history) -> dict:
        session.queue_reply()
        return {"msg": gr.Textbox(interactive=False), "chat": without_last_reply(history), **locked()}

    @staticmethod
    def undo(history) -> dict:
        """Take back the last exchange; the message returns to the box for editing."""
        history = without_last_reply(history)
        if not history:
            return {"chat": history}
        return {"msg": message_text(history[-1]), "chat": history[:-1]}

    @staticmethod
    def stop(session: Session):
        session.stop()

    async def respond(self, session: Session, history, mode, temperature, top_k, top_p, max_new_tokens, seed, layer,
                      head, scale=1.0, *more):
        """The reply, streamed: {"chat", "stats"} while it waits and grows; finished, the prompt and the panels."""
        request, prompt, notices = await self.prepare_async(history, mode, temperature, top_k, top_p,
                                                            max_new_tokens, seed, scale, *more)
        notes = [*notices, context_note(prompt, self.engine.n_positions)]
        for note in filter(None, notes):
            gr.Warning(note)
        flag = session.start_reply()
        history = [*history, {"role": "assistant", "content": ""}]
        try:
            async for reply in paced(self.replies(request, prompt, flag)):
                history[-1] = {"role": "assistant", "content": as_chat_text(reply.text.strip())}
                status = "\n\n".join(filter(None, [stats_line(reply, self.engine.device), *notes]))
                if reply.finish_reason is None:
                    yield {"chat": history, "stats": status}
            wanted = session.attention_open and reply.token_ids
            window = await self.engine.compute_async(attention_window, self.engine.model_for(request),
                                                     self.engine.tokenizer, reply) if wanted else None
            session.show(reply, window)
            yield {"chat": history, "stats": status, "prompt": prompt.text,
                   **self.log_prob_panel(session, len(reply.token_ids)), **self.attention_panel(session, layer, head)}
        finally:
            session.finish_reply(flag)

    def replies(self, request, prompt, flag, forced=()):
        """engine.replies, a full queue becoming the user's message."""
        try:
            return self.engine.replies(request, prompt, flag, forced=forced)
        except ServerBusy as e:
            raise gr.Error(f"{str(e)[0].upper()}{str(e)[1:]}. Try again in a moment.", print_exception=False) \
                from None

    def log_prob_panel(self, session: Session, position) -> dict:
        """{"tokens", "position", "caption", "alternatives"} of the last reply at a token position."""
        position = checked(whole_number, "Token position", position)
        reply = session.reply
        if reply is None or not reply.token_ids:
            return {"tokens": [], "position": gr.Slider(1, 2, value=1), "caption": "No reply yet.",
                    "alternatives": None}
        position = min(max(position, 1), len(reply.token_ids))  # clamped: a slider cannot span a single value
        tokenizer = self.engine.tokenizer
        return {"tokens": token_highlights(reply, tokenizer),
                "position": gr.Slider(1, max(len(reply.token_ids), 2), value=position),
                "caption": position_caption(reply, tokenizer, position),
                "alternatives": alternatives(reply, tokenizer, position)}

    def alternatives_at(self, session: Session, position) -> dict:
        panel = self.log_prob_panel(session, position)
        return {"caption": panel["caption"], "alternatives": panel["alternatives"]}

    @staticmethod
    def attention_panel(session: Session, layer, head) -> dict:
        """{"heatmap", "attention_note"}: the last reply's attention at a layer and head (-1: their average)."""
        window: AttentionWindow | None = session.window
        layer, head = checked(whole_number, "Layer", layer), checked(whole_number, "Head", head)
        if window is None:
            return {"heatmap": None, "attention_note": ATTENTION_HINT}
        n_layer, n_head = window.probs.shape[:2]
        layer = checked(read_choice, "Layer", layer, range(n_layer))
        head = checked(read_choice, "Head", head, range(-1, n_head))  # -1: the average over heads
        return {"heatmap": heatmap(window, layer, None if head < 0 else head), "attention_note": window.note}

    def clear(self, session: Session) -> dict:
        session.show(None)
        return {"chat": [], "stats": self.ready, "prompt": "", **self.log_prob_panel(session, 1),
                **self.attention_panel(session, 0, -1)}
