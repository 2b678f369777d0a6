"""Event handlers of the "look inside" panels beside the chat: one selected token shared by every view,
the sampling pipeline, the logit lens, attention (heatmap, entropy, head similarity), the timeline,
branching from an alternative, and export / load of a conversation.

Nothing here runs while a reply streams: the views are computed after it, and only the view on
screen (Session.view); the others when they are opened. Handlers return their outputs by name (the
names of VIEW_OUTPUTS, "chat", "stats", ...), only those they change; app.py wires the names to its
components. The forward passes of the views run as scheduler tasks (Engine.compute).
"""
from __future__ import annotations

import math
import reprlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import gradio as gr

from ..inspection import logit_lens
from .conversation import BASE, ChatInputError, Prompt, as_chat_text, whole_number
from .engine import Engine
from .files import ExportFolder
from .handlers import ChatHandlers, checked, locked, refusal, unlock
from .panels import MAX_KEYS, MAX_QUERIES, alternatives, attention_window, heatmap, position_caption, token_highlights
from .panels_heads import entropy_figure, similarity_figure
from .panels_lens import lens_figure, lens_ids, lens_table, reply_column, visible_columns
from .panels_sampling import (
    pipeline_figure,
    pipeline_summary,
    position_history,
    position_logits,
    sampling_pipeline,
)
from .panels_timeline import timeline_figure, timeline_summary
from .replies import paced, stats_line
from .session import Session
from .transcript import TranscriptError, export_conversation, load_conversation

SELECTED = "selected token"  # the HighlightedText category of the selected token
VIEWS = ("Sampling", "Logit lens", "Attention", "Timeline", "Export")
VIEW_OUTPUTS = ("tokens", "position", "caption", "alternatives", "pipeline", "pipeline_note", "lens", "lens_table",
                "heatmap", "attention_note", "entropy", "similarity", "timeline", "timeline_note")
NO_REPLY = "No reply yet: send a message, or load a conversation in Export."


def clicked_pixel(event: gr.SelectData) -> tuple[float, float]:
    """The (x, y) pixel of a click on a figure; a crafted event with anything else gets a message."""
    index = event.index
    if not (isinstance(index, (list, tuple)) and len(index) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in index)):
        raise refusal(f"A click on a figure gives the pixel clicked as [x, y], not {reprlib.repr(index)}.")
    return float(index[0]), float(index[1])


class InspectHandlers:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.chat = ChatHandlers(engine)  # its replies(): a full queue becomes the user's message
        self.tokenizer = engine.tokenizer
        self.exports = ExportFolder()

    # -- the views, for the selected token -------------------------------------------------------------

    def views(self, session: Session, layer: int, head: int) -> dict:
        """Outputs of VIEW_OUTPUTS by name: the token panel always, the view on screen; without a reply, all."""
        reply = session.reply
        if reply is None or not reply.token_ids:
            empty = {"position": gr.Slider(1, 2, value=1), "tokens": [], "caption": NO_REPLY}
            return {name: empty.get(name, NO_REPLY if name.endswith(("note", "table")) else None)
                    for name in VIEW_OUTPUTS}
        n = len(reply.token_ids)
        session.position = position = min(max(int(session.position), 1), n)
        highlights = token_highlights(reply, self.tokenizer)
        highlights[position - 1] = (highlights[position - 1][0], SELECTED)
        out = {"tokens": highlights, "position": gr.Slider(1, max(n, 2), value=position),
               "caption": position_caption(reply, self.tokenizer, position),
               "alternatives": alternatives(reply, self.tokenizer, position)}
        view = {"Sampling": self.sampling_view, "Logit lens": self.lens_view, "Timeline": self.timeline_view,
                "Attention": lambda s: self.attention_view(s, layer, head)}.get(session.view)
        return {**out, **view(session)} if view else out

    def sampling_view(self, session: Session) -> dict:
        reply, position = session.reply, session.position
        params = reply.request.params
        logits = self.engine.compute(position_logits, self.engine.model_for(reply.request), reply, position)
        pipeline = sampling_pipeline(logits, params, reply.token_ids[position - 1],
                                     position_history(reply, position, self.tokenizer))
        return {"pipeline": pipeline_figure(pipeline, self.tokenizer),
                "pipeline_note": pipeline_summary(pipeline, self.tokenizer, params)}

    def lens_view(self, session: Session) -> dict:
        reply = session.reply
        if session.lens is None:
            session.lens = self.engine.compute(logit_lens, self.engine.model_for(reply.request), lens_ids(reply))
        column = reply_column(reply, session.position)
        pixels, session.clicks["lens"] = lens_figure(session.lens, self.tokenizer, column, len(reply.prompt_ids) - 1)
        return {"lens": pixels, "lens_table": lens_table(session.lens, self.tokenizer, column)}

    def attention_view(self, session: Session, layer: int, head: int) -> dict:
        reply, model = session.reply, self.engine.model_for(session.reply.request)
        if session.heads is None or session.heads.hides_sink != session.hide_sink:
            # one pass gives every row; the heatmap shows the most recent of them
            session.heads = self.engine.compute(attention_window, model, self.tokenizer, reply, len(reply.token_ids),
                                                model.config.n_positions, session.hide_sink)
            session.window = session.heads.last(MAX_QUERIES, MAX_KEYS)
        head = None if head < 0 else head
        entropy, session.clicks["entropy"] = entropy_figure(session.heads, (layer, head))
        similarity, session.clicks["similarity"] = similarity_figure(session.heads, layer, head)
        row = session.position - 1 - (len(reply.token_ids) - len(session.window.query_labels))  # in the window
        return {"heatmap": heatmap(session.window, layer, head, row), "attention_note": session.window.note,
                "entropy": entropy, "similarity": similarity}

    def timeline_view(self, session: Session) -> dict:
        pixels = None
        if session.reply.token_times:
            pixels, session.clicks["timeline"] = timeline_figure(session.reply, self.tokenizer, session.position)
        return {"timeline": pixels, "timeline_note": timeline_summary(session.reply)}

    # -- events ----------------------------------------------------------------------------------------

    def opener(self, view: str) -> Callable:
        """The handler of a view's tab: the view is computed now, as it comes on screen."""
        def open_view(session: Session, layer: int, head: int):
            session.view = view
            session.attention_open = view == "Attention"  # respond() computes the heatmap's window for it
            return self.views(session, layer, head)
        return open_view

    def select(self, session: Session, position, layer: int, head: int):
        """A token was chosen on the slider: every view follows."""
        session.position = int(position)
        return self.views(session, layer, head)

    def pick_token(self, session: Session, layer: int, head: int, event: gr.SelectData):
        session.position = checked(whole_number, "Token index", event.index) + 1
        return self.views(session, layer, head)

    def click_lens(self, session: Session, layer: int, head: int, event: gr.SelectData):
        """A lens cell: select the reply token its column predicted (prompt columns select nothing)."""
        pixel = clicked_pixel(event)
        cell = session.clicks["lens"].cell(*pixel) if "lens" in session.clicks else None
        if cell is not None:
            shown = visible_columns(session.lens, reply_column(session.reply, session.position))  # as drawn
            column = shown[cell[1]]
            position = column - len(session.reply.prompt_ids) + 2
            if 1 <= position <= len(session.reply.token_ids):
                session.position = position
        return self.views(session, layer, head)

    def click_timeline(self, session: Session, layer: int, head: int, event: gr.SelectData):
        pixel = clicked_pixel(event)
        cell = session.clicks["timeline"].cell(*pixel) if "timeline" in session.clicks else None
        if cell is not None:
            session.position = cell[1] + 1
        return self.views(session, layer, head)

    @staticmethod
    def head_clicker(which: str) -> Callable:
        """The handler of a click on the entropy grid (picks layer and head) or on the head-similarity
        matrix (picks the head of the clicked row). -> layer, head; the heatmap follows their change."""
        def click(session: Session, layer: int, head: int, event: gr.SelectData):
            pixel = clicked_pixel(event)
            cell = session.clicks[which].cell(*pixel) if which in session.clicks else None
            if cell is None:
                return {}
            return {"layer": cell[0], "head": cell[1]} if which == "entropy" else {"head": cell[0]}
        return click

    def toggle_sink(self, session: Session, hide: bool, layer: int, head: int):
        session.hide_sink = bool(hide)
        return self.views(session, layer, head)

    # -- branching -------------------------------------------------------------------------------------

    async def branch(self, session: Session, history: list, layer: int, head: int,
                     event: gr.SelectData) -> AsyncIterator[list]:
        """An alternative was clicked: cut the reply before the selected token, force the alternative and
        continue with the same request (model, LoRA scale, settings, seed), streaming into the chat. The
        message box and Send, Retry, Undo, Clear wait meanwhile, as for any reply."""
        reply, position = session.reply, session.position
        if reply is None or not history or history[-1]["role"] != "assistant":
            raise gr.Error("Branching needs the last reply of this conversation on screen.", print_exception=False)
        labels = alternatives(reply, self.tokenizer, position)
        token = next((t for label, (t, _) in zip(labels, reply.top[position - 1]) if label == event.value), None)
        if token is None:  # the panel was redrawn for another reply meanwhile
            raise gr.Error("That alternative is no longer on screen: click it again.", print_exception=False)
        original = session.original or reply
        try:
            self.engine.model_for(reply.request)  # refused here if the mode is off
        except ChatInputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        flag = session.start_reply()
        history = [*history]
        yield {"msg": gr.Textbox(interactive=False), **locked()}
        try:
            prompt = Prompt("", reply.prompt_ids, 0, reply.stop)
            forced = [*reply.token_ids[:position - 1], token]
            async for new in paced(self.chat.replies(reply.request, prompt, flag, forced=forced)):
                history[-1] = {"role": "assistant", "content": as_chat_text(new.text.strip())}
                if new.finish_reason is None:
                    yield {"chat": history, "stats": stats_line(new, self.engine.device)}
            session.show(new)
            session.original, session.position = original, position
            status = f"Branched at token {position}: {stats_line(new, self.engine.device)} · Undo branch returns"
            yield {"chat": history, "stats": status, **unlock(), **self.views(session, layer, head)}
        finally:
            session.finish_reply(flag)

    def undo_branch(self, session: Session, history: list, layer: int, head: int):
        """Back to the reply before branching."""
        original = session.original
        if original is None or not history:
            raise gr.Error("There is no branch to undo.", print_exception=False)
        session.show(original)
        history = [*history[:-1], {"role": "assistant", "content": as_chat_text(original.text.strip())}]
        return {"chat": history, "stats": stats_line(original, self.engine.device), **self.views(session, layer, head)}

    # -- export and load -------------------------------------------------------------------------------

    def export(self, session: Session, history: list):
        """{"export_file", "export_note"}: the conversation and its last reply as JSON."""
        if session.reply is None or not session.reply.token_ids:
            return {"export_file": None, "export_note": NO_REPLY}
        session.export = self.exports.write(export_conversation(history, session.reply, self.tokenizer),
                                            replacing=session.export)  # Gradio serves its own copy of it
        return {"export_file": str(session.export), "export_note": f"Ready: {len(history)} messages, "
                                                      f"{len(session.reply.token_ids)} reply tokens with top-5 each."}

    def load(self, session: Session, file, layer: int, head: int):
        """A conversation file was uploaded: the chat, a note and every view; a bad file only gets a message."""
        if file is None:
            return {}
        try:
            text = Path(file).read_bytes().decode("utf-8")
            vocab_size = self.engine.models[BASE].config.vocab_size
            history, reply = load_conversation(text, vocab_size, self.engine.n_positions)
            self.engine.model_for(reply.request)
        except UnicodeDecodeError:
            return {"export_note": "Could not load: the file is not UTF-8 text."}
        except (TranscriptError, ChatInputError) as e:
            return {"export_note": f"Could not load: {e}"}
        session.show(reply)
        note = f"Loaded {len(history)} messages; the panels show its last reply ({len(reply.token_ids)} tokens)."
        return {"chat": history, "export_note": note, **self.views(session, layer, head)}

