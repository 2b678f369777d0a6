"""The Compare tab's handlers: one message answered by both models side by side, and the token diff.

Each side streams in its own queued event with its own Stop flag (a Session per side), from the same
message, settings and seed; a blank seed is drawn once here, so both sides share it.
"""
from __future__ import annotations

import html
import math
import random
from dataclasses import dataclass, field

import gradio as gr
import plotly.graph_objects as go

from ..request import DRAWN_SEEDS
from ..scoring import Comparison, TokenDiff, compare_ids
from .conversation import BASE, MODES, TUNED, as_chat_text
from .engine import Engine
from .handlers import ChatHandlers, busy_message
from .panels import token_text
from .replies import paced, stats_line
from .scheduler import ServerBusy
from .session import Session

DIFF_SCALE = 4.0  # nats of log p_tuned − log p_base at which a token's colour saturates
DIFF_HINT = "Pick a reply and press Compare tokens: both models re-score it in one teacher-forced pass each."
RANKED_HEADERS = ["rank", "position", "token", "log p base", "log p tuned", "KL", "base top-5", "tuned top-5"]
TOKEN_HEADERS = ["position", "token", "log p base", "log p tuned", "tuned − base", "KL"]


@dataclass
class CompareSession:
    """One browser session's comparison: a Session per side (Stop flags, last reply) and the request."""
    sides: dict[str, Session] = field(default_factory=lambda: {mode: Session() for mode in MODES})
    request: tuple = ()  # (history, temperature, top_k, top_p, max_new_tokens, seed, scale) of the last Send

    def __deepcopy__(self, memo: dict) -> CompareSession:
        return CompareSession()

    @property
    def busy(self) -> bool:
        return any(side.in_flight for side in self.sides.values())


def side_outputs(mode: str) -> tuple[str, str]:
    """The names of one side's outputs: its text and its stats line."""
    key = "base" if mode == BASE else "tuned"
    return f"cmp_{key}", f"cmp_{key}_stats"


class CompareHandlers:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.chat = ChatHandlers(engine)  # its prepare(): the same validation and framing as the chat

    def refusal_of(self, message: str, temperature, top_k, top_p, max_new_tokens, seed, scale) -> str:
        """Why a message or settings cannot be used by both sides ('' if they can)."""
        if TUNED not in self.engine.models:
            return f"Comparing needs the Alpaca LoRA: {self.engine.adapter_hint}"
        if not isinstance(message, str) or not message.strip():
            return "Type a message first."
        history = [{"role": "user", "content": as_chat_text(message)}]
        try:
            for mode in MODES:
                self.chat.prepare(history, mode, temperature, top_k, top_p, max_new_tokens, seed, scale)
        except gr.Error as e:
            return e.message
        return ""

    def check(self, *args) -> None:
        """Refuse what refusal_of refuses: the error only stops the event chain (no outputs, no toast);
        explain puts the reason in the note under the settings."""
        if reason := self.refusal_of(*args):
            raise gr.Error(reason, visible=False, print_exception=False)

    def explain(self, *args) -> dict:
        return {"cmp_note": self.refusal_of(*args)}

    def start(self, session: CompareSession, message: str, temperature, top_k, top_p, max_new_tokens, seed,
              scale):
        """After check: fix the seed (a blank one is drawn once, for both sides), register both sides' Stop
        flags and clear the outputs (no queue, so a Stop clicked right after Send counts)."""
        if seed is None or not str(seed).strip():
            seed = str(random.randrange(DRAWN_SEEDS))
        history = [{"role": "user", "content": as_chat_text(message)}]
        session.request = (history, temperature, top_k, top_p, max_new_tokens, seed, scale)
        for side in session.sides.values():
            side.queue_reply()
        note = f"Both sides: seed {seed}, LoRA scale {float(scale):g}."
        return {"cmp_send": gr.Button(interactive=False), "cmp_note": note,
                **{name: "" for mode in MODES for name in side_outputs(mode)}}

    async def respond(self, session: CompareSession, mode: str):
        """Stream one side's reply: its text and stats line while it waits and after every token."""
        history, temperature, top_k, top_p, max_new_tokens, seed, scale = session.request
        request, prompt, _ = await self.chat.prepare_async(history, mode, temperature, top_k, top_p, max_new_tokens,
                                                           seed, scale)
        side = session.sides[mode]
        flag = side.start_reply()
        try:
            text, stats = side_outputs(mode)
            try:
                replies = self.engine.replies(request, prompt, flag)
            except ServerBusy as e:  # in the side's stats line, beside its text
                yield {stats: busy_message(e)}
                return
            async for reply in paced(replies):
                yield {text: reply.text.strip(), stats: stats_line(reply, self.engine.device)}
            side.reply = reply
        finally:
            side.finish_reply(flag)

    async def respond_base(self, session: CompareSession):
        async for update in self.respond(session, BASE):
            yield update

    async def respond_tuned(self, session: CompareSession):
        async for update in self.respond(session, TUNED):
            yield update

    @staticmethod
    def stop_base(session: CompareSession):
        session.sides[BASE].stop()

    @staticmethod
    def stop_tuned(session: CompareSession):
        session.sides[TUNED].stop()

    @staticmethod
    def unlock(session: CompareSession):
        """Send comes back when neither side is still streaming."""
        return {} if session.busy else {"cmp_send": gr.Button(interactive=True)}

    def diff(self, session: CompareSession, which: str):
        """The token diff of the last reply of side `which`: its summary, coloured tokens, ranked table, all tokens."""
        reply = session.sides[which].reply if which in session.sides else None
        if reply is None or not reply.token_ids:
            return {"diff_summary": f"No {which} reply yet: send a message first.", "diff_tokens": [],
                    "diff_chart": None, "diff_ranked": None, "diff_table": None}
        scale = session.sides[TUNED].reply.request.scale if session.sides[TUNED].reply else 1.0
        base, tuned = self.engine.model(BASE), self.engine.model(TUNED, scale)
        comparison = self.engine.compute(compare_ids, base, tuned, reply.prompt_ids + reply.token_ids,
                                         len(reply.prompt_ids))
        return {"diff_summary": self.summary(comparison, which, scale), "diff_tokens": self.highlights(comparison),
                "diff_chart": self.chart(comparison), "diff_ranked": self.ranked(comparison),
                "diff_table": self.per_token(comparison)}

    @staticmethod
    def summary(c: Comparison, which: str, scale: float) -> str:
        changed = len(c.changed_minds())
        return (f"**{which}'s reply, {len(c.tokens)} tokens, scored by both models** (Alpaca LoRA at scale "
                f"{scale:g}). Mean log-prob: base {c.mean_logprob_base:.3f}, tuned {c.mean_logprob_tuned:.3f} "
                f"(tuned − base {c.mean_logprob_tuned - c.mean_logprob_base:+.3f} nats). "
                f"Mean KL(tuned ‖ base) {c.mean_kl:.3f} nats. The top-1 token differs at {changed} of "
                f"{len(c.tokens)} positions.")

    def highlights(self, c: Comparison) -> list[tuple[str, float]]:
        """Each token coloured by log p_tuned − log p_base: red where the adapter made it likelier, purple less."""
        return [(token_text(self.engine.tokenizer, t.token_id), max(-1.0, min(1.0, t.diff / DIFF_SCALE)))
                for t in c.tokens]

    def chart(self, c: Comparison) -> go.Figure:
        """log p_tuned − log p_base per token as bars (red: the adapter made it likelier), and KL(tuned ‖ base) as a
        line on its own axis; hover: the token, both log-probs, the difference and the KL. Drawn by Plotly in the
        browser (gr.Plot): zoom and pan for long replies."""
        positions = [t.position for t in c.tokens]
        texts = [repr(token_text(self.engine.tokenizer, t.token_id)) for t in c.tokens]
        hover = [f"token {t.position}: {html.escape(text)}<br>log p base {t.logprob_base:.3f}, tuned "
                 f"{t.logprob_tuned:.3f}<br>tuned − base {t.diff:+.3f} nats<br>KL(tuned ‖ base) {t.kl:.3f} nats"
                 for t, text in zip(c.tokens, texts)]
        figure = go.Figure([
            go.Bar(x=positions, y=[t.diff for t in c.tokens], name="log p tuned − log p base",
                   marker_color=["#c62828" if t.diff > 0 else "#6a1b9a" for t in c.tokens],
                   hovertext=hover, hoverinfo="text"),
            go.Scatter(x=positions, y=[t.kl for t in c.tokens], name="KL(tuned ‖ base)", yaxis="y2",
                       mode="lines+markers", line={"color": "#546e7a", "width": 1}, marker={"size": 4},
                       hovertext=hover, hoverinfo="text")])
        figure.update_layout(height=300, margin={"l": 60, "r": 60, "t": 30, "b": 45}, bargap=0.1,
                             legend={"orientation": "h", "y": 1.12},
                             xaxis={"title": {"text": "reply token"}},
                             yaxis={"title": {"text": "tuned − base (nats)"}, "zeroline": True},
                             yaxis2={"title": {"text": "KL (nats)"}, "overlaying": "y", "side": "right",
                                     "rangemode": "tozero", "showgrid": False})
        return figure

    def top(self, alternatives: list[tuple[int, float]]) -> str:
        return ", ".join(f"{token_text(self.engine.tokenizer, i)!r} {math.exp(lp):.0%}" for i, lp in alternatives)

    def ranked(self, c: Comparison) -> dict:
        rows = [[rank, t.position, repr(token_text(self.engine.tokenizer, t.token_id)), round(t.logprob_base, 3),
                 round(t.logprob_tuned, 3), round(t.kl, 3), self.top(t.top_base), self.top(t.top_tuned)]
                for rank, t in enumerate(c.changed_minds(), 1)]
        return {"headers": RANKED_HEADERS, "data": rows or [[""] * len(RANKED_HEADERS)]}

    def per_token(self, c: Comparison) -> dict:
        def row(t: TokenDiff) -> list:
            return [t.position, repr(token_text(self.engine.tokenizer, t.token_id)), round(t.logprob_base, 3),
                    round(t.logprob_tuned, 3), round(t.diff, 3), round(t.kl, 3)]
        return {"headers": TOKEN_HEADERS, "data": [row(t) for t in c.tokens]}
