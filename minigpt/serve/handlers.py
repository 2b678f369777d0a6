"""The chat app's event handlers: what happens on Send, Retry, Undo, Stop, Clear and in the panels.

app.py lays the page out and wires these to its components; nothing here knows the layout beyond
the order of each handler's inputs and outputs. Every handler receives the browser session's
Session (a gr.State) and the Engine every session shares.
"""
from __future__ import annotations

import anyio
import gradio as gr

from .conversation import (
    ChatInputError,
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


def locked() -> list:
    """Send, Retry, Undo and Clear wait while a reply streams; Stop does not."""
    return [gr.Button(interactive=False)] * 4


def unlock() -> tuple:
    return gr.Textbox(interactive=True), *[gr.Button(interactive=True)] * 4


class ChatHandlers:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.ready = f"Ready · {engine.device}"

    def prepare(self, history, mode, temperature, top_k, top_p, max_new_tokens, seed, scale=1.0):
        """(request, prompt, notices): everything a reply needs, validated; bad input becomes a message for
        the user. It tokenizes: an async handler calls it in a worker thread (prepare_async)."""
        context = self.engine.n_positions
        try:
            request, notices = read_request(mode, temperature, top_k, top_p, max_new_tokens, seed, scale, context)
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
    def add_message(session: Session, message, history):
        """The checked message joins the chat and the controls lock until the reply has finished."""
        session.queue_reply()
        return gr.Textbox(value="", interactive=False), with_user_message(history, message), *locked()

    @staticmethod
    def retry(session: Session, history):
        session.queue_reply()
        return gr.Textbox(interactive=False), without_last_reply(history), *locked()

    @staticmethod
    def undo(history):
        """Take back the last exchange; the message returns to the box for editing."""
        history = without_last_reply(history)
        if not history:
            return gr.skip(), history
        return message_text(history[-1]), history[:-1]

    @staticmethod
    def stop(session: Session):
        session.stop()

    async def respond(self, session: Session, history, mode, temperature, top_k, top_p, max_new_tokens, seed, layer,
                      head, scale=1.0):
        request, prompt, notices = await self.prepare_async(history, mode, temperature, top_k, top_p,
                                                            max_new_tokens, seed, scale)
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
                    yield history, status, *[gr.skip()] * 7
            wanted = session.attention_open and reply.token_ids
            window = await self.engine.compute_async(attention_window, self.engine.model_for(request),
                                                     self.engine.tokenizer, reply) if wanted else None
            session.show(reply, window)
            yield (history, status, prompt.text, *self.log_prob_panel(session, len(reply.token_ids)),
                   *self.attention_panel(session, layer, head))
        finally:
            session.finish_reply(flag)

    def replies(self, request, prompt, flag, forced=()):
        """engine.replies, a full queue becoming the user's message."""
        try:
            return self.engine.replies(request, prompt, flag, forced=forced)
        except ServerBusy as e:
            raise gr.Error(f"{str(e)[0].upper()}{str(e)[1:]}. Try again in a moment.", print_exception=False) \
                from None

    def log_prob_panel(self, session: Session, position):
        position = checked(whole_number, "Token position", position)
        reply = session.reply
        if reply is None or not reply.token_ids:
            return [], gr.Slider(1, 2, value=1), "No reply yet.", None
        position = min(max(position, 1), len(reply.token_ids))  # clamped: a slider cannot span a single value
        tokenizer = self.engine.tokenizer
        return (token_highlights(reply, tokenizer), gr.Slider(1, max(len(reply.token_ids), 2), value=position),
                position_caption(reply, tokenizer, position), alternatives(reply, tokenizer, position))

    def alternatives_at(self, session: Session, position):
        return self.log_prob_panel(session, position)[2:]

    def pick_token(self, session: Session, event: gr.SelectData):
        return self.log_prob_panel(session, checked(whole_number, "Token index", event.index) + 1)

    @staticmethod
    def attention_panel(session: Session, layer, head):
        window: AttentionWindow | None = session.window
        layer, head = checked(whole_number, "Layer", layer), checked(whole_number, "Head", head)
        if window is None:
            return None, ATTENTION_HINT
        n_layer, n_head = window.probs.shape[:2]
        layer = checked(read_choice, "Layer", layer, range(n_layer))
        head = checked(read_choice, "Head", head, range(-1, n_head))  # -1: the average over heads
        return heatmap(window, layer, None if head < 0 else head), window.note

    def open_attention(self, session: Session, layer, head):
        session.attention_open = True
        reply = session.reply
        if session.window is None and reply is not None and reply.token_ids:
            session.window = self.engine.compute(attention_window, self.engine.model_for(reply.request),
                                                 self.engine.tokenizer, reply)
        return self.attention_panel(session, layer, head)

    @staticmethod
    def close_attention(session: Session):
        session.attention_open = False

    def clear(self, session: Session):
        session.show(None)
        return [], self.ready, "", *self.log_prob_panel(session, 1), *self.attention_panel(session, 0, -1)
