"""One browser session's state, in one object: its Stop flags, and the reply its panels, stats line and Export describe."""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .replies import Reply
from .reply_numbers import as_json

KEYS = itertools.count(1)  # every panel payload of the process gets its own key: a restored one stays unique


@dataclass(frozen=True)
class Shown:
    """What the panels show, kept to be shown again (Undo branch)."""
    reply: Reply
    history: list[dict]
    payload: str
    key: int


@dataclass
class Session:
    """Held in a gr.State: Gradio gives each browser (or API client) session its own, through
    __deepcopy__, and hands every event of that session the same object, so a Stop clicked while a
    reply streams reaches that reply's flag.

    The "look inside" panels, the stats line and Export all describe `reply`, the chat's last message,
    and nothing else: every action that changes that message (Send, Retry, Undo, Clear, a branch and its
    undo, loading a file) goes through show() or forget(), and the page's panels follow `payload`."""
    in_flight: set[threading.Event] = field(default_factory=set)  # one Stop flag per reply queued or computing
    queued: threading.Event | None = None  # the flag of the reply the browser just asked for, until it starts
    reply: Reply | None = None  # the chat's last reply, the panels' subject; None while there is none or it streams
    history: list[dict] = field(default_factory=list)  # the conversation that reply ends (what Export writes)
    payload: str = ""  # the panels' numbers (reply_numbers) as JSON, or {"note": ...} without a reply
    key: int = 0  # the key of the payload on screen: a branch asked from another panel is refused
    original: Shown | None = None  # what the panels showed before branching, for Undo branch
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

    def show(self, reply: Reply, history: list[dict], numbers: dict, select: int | None = None) -> None:
        """The chat's last message is now `reply` (ending `history`); the panels show its numbers, token
        `select` selected (default: the last)."""
        self.key += 1
        self.reply, self.history = reply, list(history)
        self.payload = as_json({**numbers, "key": self.key, "select": select or len(reply.token_ids)})

    def forget(self, note: str, keep_branch: bool = False) -> None:
        """The panels' reply is gone (undone, cleared, being replaced): they say `note` instead."""
        self.key = next(KEYS)
        self.reply, self.history = None, []
        self.payload = as_json({"note": note, "key": self.key})
        if not keep_branch:
            self.original = None

    def shown(self) -> Shown | None:
        return Shown(self.reply, self.history, self.payload, self.key) if self.reply is not None else None

    def restore(self, shown: Shown) -> None:
        """Show again what shown() kept (its key too: its panels' branch requests hold again)."""
        self.reply, self.history, self.payload, self.key = shown.reply, shown.history, shown.payload, shown.key
