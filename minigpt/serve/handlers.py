"""The chat app's event handlers: what happens on Send, Retry, Undo, Stop, Clear and in the panels.

app.py lays the page out and wires these to its components; nothing here knows the layout. A handler
returns (or yields) its outputs by name, {"chat": history, "stats": line, ...}, only those it changes;
app.py's `by_name` hands Gradio the components of those names. Every handler receives the browser
session's Session (a gr.State) and the Engine every session shares.
"""
from __future__ import annotations

import html

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
    read_request,
    whole_number,
    with_user_message,
    without_last_reply,
)
from .engine import Engine
from .panels import alternatives, position_caption
from .replies import Reply, paced, stats_line
from .reply_numbers import reply_numbers
from .scheduler import ServerBusy
from .session import Session

NO_REPLY = "No reply yet: send a message, or load a conversation under Export."
WRITING = "The reply is being written: its tokens and views appear here when it ends."
UNDONE = "The reply these panels showed was undone."
EMPTY = "The reply has no tokens to look inside."


def refusal(message: str) -> gr.Error:
    """Refused input from a crafted request (a value no control of the page sends): an error for the
    client, which the page never shows; the page's own refusals are notes beside their control."""
    return gr.Error(message, print_exception=False)


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


def panels(session: Session) -> dict:
    """{"inspect_data"}: the session's panel payload, for the page's script (inspect.js) to draw, and
    whether there is a branch to undo."""
    branched = "1" if session.original is not None else ""
    return {"inspect_data": f'<div class="payload" data-branched="{branched}">'
                            f'{html.escape(session.payload, quote=False)}</div>'}


def busy_message(error: ServerBusy) -> str:
    return f"{str(error)[0].upper()}{str(error)[1:]}. Try again in a moment."


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

    def message_refusal(self, message, history, *controls) -> str:  # controls as in prepare()
        """Why a message cannot be sent as it is ('' if it can)."""
        if not isinstance(message, str) or not message.strip():
            return "Type a message first."
        return self.refusal_of(with_user_message(history, message), *controls)

    def refusal_of(self, history, *controls) -> str:
        try:
            self.prepare(history, *controls)
        except gr.Error as e:
            return e.message
        return ""

    def check_message(self, message, history, *controls):
        """Refuse bad input before anything on the page changes, while the message is still in the box. The
        error only stops the event chain (no outputs, so no component is covered by an error badge, and no
        toast): explain_message puts the reason beside the box."""
        if reason := self.message_refusal(message, history, *controls):
            raise gr.Error(reason, visible=False, print_exception=False)

    def explain_message(self, message, history, *controls) -> dict:
        return {"msg_note": self.message_refusal(message, history, *controls)}

    def check_retry(self, history, *controls):
        if reason := self.refusal_of(without_last_reply(history), *controls):
            raise gr.Error(reason, visible=False, print_exception=False)

    def explain_retry(self, history, *controls) -> dict:
        return {"msg_note": self.refusal_of(without_last_reply(history), *controls)}

    @staticmethod
    def add_message(session: Session, message, history) -> dict:
        """The checked message joins the chat and the controls lock until the reply has finished."""
        session.queue_reply()
        session.forget(WRITING)
        return {"msg": gr.Textbox(value="", interactive=False), "chat": with_user_message(history, message),
                "branch_note": "", **locked(), **panels(session)}

    @staticmethod
    def retry(session: Session, history) -> dict:
        session.queue_reply()
        session.forget(WRITING)
        return {"msg": gr.Textbox(interactive=False), "chat": without_last_reply(history), "branch_note": "",
                **locked(), **panels(session)}

    def undo(self, session: Session, history) -> dict:
        """Take back the last exchange; the message returns to the box for editing, the panels say so."""
        history = without_last_reply(history)
        session.forget(UNDONE if session.reply is not None else NO_REPLY)
        cleared = {"stats": self.ready, "msg_note": "", "branch_note": "", **panels(session)}
        if not history:
            return {"chat": history, **cleared}
        return {"msg": message_text(history[-1]), "chat": history[:-1], **cleared}

    @staticmethod
    def stop(session: Session):
        session.stop()

    async def respond(self, session: Session, history, mode, temperature, top_k, top_p, max_new_tokens, seed,
                      scale=1.0, *more):
        """The reply, streamed: {"chat", "stats"} while it waits and grows; finished, the prompt; then, once
        its numbers are computed (a scheduler task), the panels."""
        request, prompt, notices = await self.prepare_async(history, mode, temperature, top_k, top_p,
                                                            max_new_tokens, seed, scale, *more)
        notes = [*notices, context_note(prompt, self.engine.n_positions)]
        flag = session.start_reply()
        history = [*history, {"role": "assistant", "content": ""}]
        try:
            try:
                replies = self.engine.replies(request, prompt, flag)
            except ServerBusy as e:  # beside the message box; the conversation stays as it was
                message = busy_message(e)
                session.forget(message)
                yield {"stats": message, "msg_note": message, **panels(session)}
                return
            async for reply in paced(replies):
                history[-1] = {"role": "assistant", "content": as_chat_text(reply.text.strip())}
                status = "\n\n".join(filter(None, [stats_line(reply, self.engine.device), *notes]))
                if reply.finish_reason is None:
                    yield {"chat": history, "stats": status}
            finished = {"chat": history, "stats": status, "prompt": prompt.text}
            yield finished
            await self.show(session, reply, history)
            yield {**finished, **panels(session)}  # every output again: an API client's last update is complete
        finally:
            session.finish_reply(flag)

    async def show(self, session: Session, reply: Reply, history: list[dict], select: int | None = None) -> None:
        """The panels now describe `reply`, the last message of `history`: its numbers, computed once, as a
        scheduler task in its turn."""
        if not reply.token_ids:
            session.forget(EMPTY)
            return
        numbers = await self.engine.compute_async(reply_numbers, self.engine.model_for(reply.request),
                                                  self.engine.tokenizer, reply, follow_up=True)
        session.show(reply, history, numbers, select)

    def alternatives_at(self, session: Session, position) -> dict:
        """{"caption", "alternatives"} of the panels' reply at a token position (the /alternatives API)."""
        position = checked(whole_number, "Token position", position)
        reply = session.reply
        if reply is None:
            return {"caption": NO_REPLY, "alternatives": None}
        position = min(max(position, 1), len(reply.token_ids))
        return {"caption": position_caption(reply, self.engine.tokenizer, position),
                "alternatives": alternatives(reply, self.engine.tokenizer, position)}

    def clear(self, session: Session) -> dict:
        session.forget(NO_REPLY)
        return {"chat": [], "stats": self.ready, "prompt": "", "msg_note": "", "branch_note": "", **panels(session)}
