"""Event handlers of the "look inside" panels that need the server: branching from an alternative (it
generates), undoing a branch, and export / load of a conversation.

Everything else the panels do (select a token, a view, a layer or head, hide the attention sink) happens
in the browser (inspect.js), from the reply's numbers sent once (reply_numbers.py). Handlers return their
outputs by name, only those they change; app.py wires the names to its components. A refusal is a note
beside the control that caused it ("branch_note", "export_note"), never an error over the conversation.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import gradio as gr

from .conversation import BASE, ChatInputError, Prompt, as_chat_text
from .engine import Engine
from .files import ExportFolder
from .handlers import WRITING, ChatHandlers, busy_message, locked, panels, unlock
from .replies import paced, stats_line
from .scheduler import ServerBusy
from .session import Session
from .transcript import TranscriptError, export_conversation, load_conversation

STALE = "That alternative belongs to a reply that is no longer on screen."


def branch_point(session: Session, request: object) -> tuple[int, int]:
    """(position, token) of a branch request "key:position:token" sent by the page's script for the reply
    its panels show; ChatInputError says why it cannot be followed."""
    try:
        key, position, token = (int(part) for part in str(request).split(":"))
    except ValueError:
        raise ChatInputError("A branch request is 'key:position:token', three whole numbers.") from None
    reply = session.reply
    if reply is None or key != session.key:
        raise ChatInputError(STALE)
    if not 1 <= position <= len(reply.token_ids) or token not in {t for t, _ in reply.top[position - 1]}:
        raise ChatInputError(f"Token {token} is not among the alternatives at position {position}.")
    return position, token


class InspectHandlers:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.chat = ChatHandlers(engine)  # replies and the panels' numbers, as for any reply
        self.tokenizer = engine.tokenizer
        self.exports = ExportFolder()

    async def branch(self, session: Session, request: str) -> AsyncIterator[dict]:
        """An alternative was clicked: cut the reply before the selected token, force the alternative and
        continue with the same request (model, LoRA scale, settings, seed), streaming into the chat. The
        message box and Send, Retry, Undo, Clear wait meanwhile, as for any reply."""
        try:
            if session.in_flight:
                raise ChatInputError("Wait for the reply to finish before branching.")
            position, token = branch_point(session, request)
            reply = session.reply
            self.engine.model_for(reply.request)  # refused here if the mode is off
        except ChatInputError as e:
            yield {"branch_note": str(e)}
            return
        before = session.shown()
        original = session.original or before
        base = [*session.history[:-1]]
        flag = session.start_reply()
        session.forget(WRITING, keep_branch=True)
        yield {"msg": gr.Textbox(interactive=False), "branch_note": "", **locked(), **panels(session)}
        try:
            prompt = Prompt("", reply.prompt_ids, 0, reply.stop)
            forced = [*reply.token_ids[:position - 1], token]
            history = [*base, {"role": "assistant", "content": ""}]
            try:
                replies = self.engine.replies(reply.request, prompt, flag, forced=forced)
            except ServerBusy as e:
                session.restore(before)  # nothing changed after all
                yield {"branch_note": busy_message(e), **unlock(), **panels(session)}
                return
            async for new in paced(replies):
                history[-1] = {"role": "assistant", "content": as_chat_text(new.text.strip())}
                if new.finish_reason is None:
                    yield {"chat": history, "stats": stats_line(new, self.engine.device)}
            status = f"Branched at token {position}: {stats_line(new, self.engine.device)} · Undo branch returns"
            yield {"chat": history, "stats": status, **unlock()}
            await self.chat.show(session, new, history, select=position)
            session.original = original
            yield panels(session)
        finally:
            session.finish_reply(flag)

    def undo_branch(self, session: Session) -> dict:
        """Back to the reply before branching: the chat, the stats line, the panels and Export."""
        if session.original is None:
            return {"branch_note": "There is no branch to undo.", **panels(session)}
        if session.in_flight:
            return {"branch_note": "Wait for the reply to finish first."}
        session.restore(session.original)
        session.original = None
        return {"chat": session.history, "stats": stats_line(session.reply, self.engine.device), "branch_note": "",
                **panels(session)}

    # -- export and load -------------------------------------------------------------------------------

    def export(self, session: Session):
        """{"export_file", "export_note"}: the panels' conversation and reply as JSON (so they always agree)."""
        if session.reply is None:
            return {"export_file": None, "export_note": "Nothing to export: the panels show no reply."}
        session.export = self.exports.write(export_conversation(session.history, session.reply, self.tokenizer),
                                            replacing=session.export)  # Gradio serves its own copy of it
        return {"export_file": str(session.export), "export_note": f"Ready: {len(session.history)} messages, "
                                                                   f"{len(session.reply.token_ids)} reply tokens "
                                                                   "with top-5 each."}

    async def load(self, session: Session, file):
        """A conversation file was uploaded: the chat, the stats line, a note and the panels; a bad file only
        gets a note, and nothing on screen changes."""
        if file is None:
            return {}
        if session.in_flight:
            return {"export_note": "Could not load: wait for the reply to finish first."}
        try:
            text = Path(file).read_bytes().decode("utf-8")
            vocab_size = self.engine.models[BASE].config.vocab_size
            history, reply = load_conversation(text, vocab_size, self.engine.n_positions)
            self.engine.model_for(reply.request)
        except UnicodeDecodeError:
            return {"export_note": "Could not load: the file is not UTF-8 text."}
        except (TranscriptError, ChatInputError) as e:
            return {"export_note": f"Could not load: {e}"}
        session.original = None
        await self.chat.show(session, reply, history)
        note = f"Loaded {len(history)} messages; the panels show its last reply ({len(reply.token_ids)} tokens)."
        return {"chat": history, "export_note": note, "stats": f"Loaded from a file: {stats_line(reply, self.engine.device)}",
                "msg_note": "", "branch_note": "", **panels(session)}
