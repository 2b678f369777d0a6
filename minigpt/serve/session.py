"""One browser session's state, in one object: its Stop flags, its last reply and its panels' state."""
from __future__ import annotations

import threading
from pathlib import Path
from dataclasses import dataclass, field

from ..inspection import LogitLens
from .clickable import ClickMap
from .panels import AttentionWindow
from .replies import Reply


@dataclass
class Session:
    """Held in a gr.State: Gradio gives each browser (or API client) session its own, through
    __deepcopy__, and hands every event of that session the same object, so a Stop clicked while a
    reply streams reaches that reply's flag."""
    in_flight: set[threading.Event] = field(default_factory=set)  # one Stop flag per reply queued or computing
    queued: threading.Event | None = None  # the flag of the reply the browser just asked for, until it starts
    reply: Reply | None = None  # the last finished reply, behind the log-prob and attention panels
    window: AttentionWindow | None = None  # its attention, once computed
    attention_open: bool = False  # the attention panel is open (it may open mid-reply)
    # The "look inside" views (minigpt/serve/inspect_panels.py) share one selected token and cache
    # what they computed for the last reply, until the next one.
    position: int = 1  # the selected reply token, 1-based
    view: str = "Sampling"  # the view on screen: the others are computed when they are opened
    hide_sink: bool = False  # attention views without the first token, renormalised
    lens: LogitLens | None = None
    heads: AttentionWindow | None = None  # every row and key of the reply's attention (entropy, similarity)
    clicks: dict[str, ClickMap] = field(default_factory=dict)  # each clickable figure's grid, by view
    original: Reply | None = None  # the reply before branching from an alternative, for Undo
    export: Path | None = None  # the latest conversation export (the next replaces it: files.ExportFolder)

    def __deepcopy__(self, memo: dict) -> "Session":
        return Session()  # threading.Event cannot be copied, and a new session starts empty

    def queue_reply(self) -> None:
        """Called as the browser sends a message: a Stop clicked while the reply waits in the queue counts."""
        self.queued = threading.Event()
        self.in_flight.add(self.queued)

    def start_reply(self) -> threading.Event:
        """The Stop flag of a reply starting now: the queued one, or a new one (API calls have no input step)."""
        flag, self.queued = self.queued or threading.Event(), None
        self.in_flight.add(flag)
        return flag

    def finish_reply(self, flag: threading.Event) -> None:
        self.in_flight.discard(flag)

    def stop(self) -> None:
        """Stop every reply of this session that is still being computed."""
        for flag in list(self.in_flight):
            flag.set()

    def show(self, reply: Reply | None, window: AttentionWindow | None = None) -> None:
        """A new last reply (None: none): every view starts over, its last token selected."""
        self.reply, self.window, self.lens, self.heads, self.original = reply, window, None, None, None
        self.position = len(reply.token_ids) if reply is not None else 1
        self.clicks = {}
