"""Files the app stores for its users, bounded: what clients upload, and the conversation exports.

Gradio caps the size of one uploaded file (`max_file_size`) but not how many a request carries, how
often a client sends them, or their total: anyone who can open the page could fill the disk.
UploadGuard sits in front of every route that takes a multipart body (Gradio's /upload,
/component_server, ...): it reads at most MAX_REQUEST_BYTES of a request (413 beyond), and charges
what it accepted to the client and to the server; past either budget, over the time an upload can
stay in Gradio's cache (it deletes files older than UPLOAD_CLEANUP_S, every UPLOAD_CLEANUP_S), uploads
are refused with 429 until older ones have aged out. Exports go to one folder per server process,
removed at exit, holding each session's latest export and at most MAX_EXPORTS files.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

UPLOAD_CLEANUP_S = 3600  # Gradio's delete_cache: files older than this go, checked this often
UPLOAD_WINDOW_S = 2 * UPLOAD_CLEANUP_S  # the longest an upload stays in the cache
MAX_FILE = "2mb"  # Gradio's max_file_size: a conversation export is tens of kB
MAX_REQUEST_BYTES = 2 * 2**20 + 64 * 2**10  # one request: one such file and its multipart framing
MAX_CLIENT_BYTES = 16 * 2**20  # one client, per window
MAX_TOTAL_BYTES = 256 * 2**20  # every client together, per window
MAX_EXPORTS = 64  # files in the export folder; Gradio serves its own copy of each (its cache)


class UploadBudget:
    """Bytes accepted per client and in total over the last `window_s` seconds."""

    def __init__(self, per_client: int = MAX_CLIENT_BYTES, total: int = MAX_TOTAL_BYTES,
                 window_s: float = UPLOAD_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.per_client, self.total, self.window_s, self.clock = per_client, total, window_s, clock
        self.accepted: deque[tuple[float, str, int]] = deque()  # (when, client, bytes), oldest first

    def refusal(self, client: str, size: int) -> str | None:
        """Why `size` more bytes from `client` are refused now, or None (then they are charged)."""
        now = self.clock()
        while self.accepted and self.accepted[0][0] <= now - self.window_s:
            self.accepted.popleft()
        total = sum(n for _, _, n in self.accepted)
        mine = sum(n for _, who, n in self.accepted if who == client)
        if mine + size > self.per_client:
            return (f"Too many uploads from you: at most {self.per_client // 2**20} MiB per "
                    f"{self.window_s / 3600:g} hours. Try again later.")
        if total + size > self.total:
            return "The server takes no more uploads for now: its upload space is full. Try again later."
        self.accepted.append((now, client, size))
        return None


class UploadGuard:
    """ASGI middleware: every multipart request is read whole (at most MAX_REQUEST_BYTES) and charged to an
    UploadBudget before the app sees it; other requests pass untouched."""

    def __init__(self, app, budget: UploadBudget | None = None, max_request: int = MAX_REQUEST_BYTES):
        self.app, self.budget, self.max_request = app, budget or UploadBudget(), max_request

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        if scope["type"] != "http" or not headers.get(b"content-type", b"").startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.max_request
        body = bytearray()
        while True:  # what the app is handed is what was counted, and at most max_request is ever held
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            if not too_large:
                body += message.get("body", b"")
                too_large = len(body) > self.max_request
            if not message.get("more_body"):  # the rest of a refused body is read and dropped: a client still
                break                          # sending would see its connection reset, not the 413
        if too_large:
            return await refuse(send, 413, f"An upload is at most {self.max_request // 2**20} MiB per request.")
        if why := self.budget.refusal(client_of(scope, headers), len(body)):
            return await refuse(send, 429, why)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # after the body: a disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


def client_of(scope, headers: dict[bytes, bytes]) -> str:
    """Who sent a request: the first X-Forwarded-For address behind a proxy (a Space), else the peer's.
    A client that forges the header escapes its own budget, not the total."""
    forwarded = headers.get(b"x-forwarded-for", b"").split(b",")[0].strip()
    return forwarded.decode("latin-1") if forwarded else (scope.get("client") or ("unknown",))[0]


async def refuse(send, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": text.encode()})


class ExportFolder:
    """Where conversation exports are written: a folder of this process's own (removed at exit), holding each
    session's latest export and at most `limit` files, the oldest going first."""

    def __init__(self, limit: int = MAX_EXPORTS):
        self.path = Path(tempfile.mkdtemp(prefix="minigpt-exports-"))
        self.limit = limit
        self.lock = threading.Lock()  # sessions export in their own threads
        atexit.register(shutil.rmtree, self.path, True)

    def write(self, text: str, replacing: Path | None = None) -> Path:
        """A new export file holding text; `replacing` (the session's previous export) is deleted."""
        with self.lock:
            if replacing is not None and replacing.parent == self.path:
                replacing.unlink(missing_ok=True)
            older = sorted(self.path.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
            for stale in older[:max(0, len(older) - self.limit + 1)]:
                stale.unlink(missing_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path, prefix="conversation-", suffix=".json",
                                             delete=False, encoding="utf-8") as f:
                f.write(text)
            return Path(f.name)
