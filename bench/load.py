"""Load test: concurrent chat sessions against `python app.py`, on loopback, with a small random model.

    python -m bench.load --clients 8 --turns 4 --max-new-tokens 48 [--api-clients 8]

Each client is its own gradio_client session holding its own conversation for several turns,
alternating Base GPT-2 and Alpaca LoRA. Client i % 4 == 1 cancels one reply mid-stream
(job.cancel()), i % 4 == 2 presses Stop (/stop) during one, i % 4 == 3 disconnects mid-reply on its
last turn (drops its HTTP stream). With --api-clients, OpenAI-API streaming clients run alongside
(bench/load_api.py says what they do and what is checked). Round 1 warms the server up, the later
rounds are measured (--rounds, at least 2, shows memory level off). Then it checks that every request
finished or was cancelled, that each reply equals a one-at-a-time replay with the same seed (a stopped
one, replayed up to the tokens it got), so no session's text reached another; that the server log holds no traceback;
and that server RSS grew by at most --rss-bound-mib from after the warm-up round to after the last
round. Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path

import psutil
from gradio_client import Client
from gradio_client.utils import Status

from bench.load_api import ApiRequest, check_api_requests, run_api_client, warm_up
from minigpt.serve.conversation import BASE, TUNED, MoreSampling, message_text
from tests.helpers.app_server import (
    running_app,  # tiny checkpoint + adapter, app subprocess
)

LONG_REPLY = 256
MODEL = dict(n_embd=256, n_layer=4, n_head=4)  # big enough that a leaked KV cache per request would show


@dataclass
class Request:
    client: int
    turn: int
    mode: str
    seed: int
    history: list[dict]  # sent: the conversation so far, ending with this turn's user message
    action: str = "finish"  # finish, cancel, stop, disconnect
    max_new_tokens: int = 48
    outcome: str = ""  # done, stopped, cancelled, disconnected, error: ...
    reply: str = ""
    returned: list[dict] = field(default_factory=list)
    first_token_s: float | None = None
    tokens: int = 0


def user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def chat_args(request: Request) -> list:
    """/chat's inputs: history, mode, temperature, top-k, top-p, max new tokens, seed, LoRA scale, then the
    More sampling controls, off (a raw /gradio_api/call/chat needs every input)."""
    return [request.history, request.mode, 0.9, 50, 0.95, request.max_new_tokens, str(request.seed), 1.0,
            *astuple(MoreSampling())]


def action_for(client: int, turn: int, turns: int) -> str:
    kind = client % 4
    if kind == 1 and turn == 1:
        return "cancel"
    if kind == 2 and turn == 1:
        return "stop"
    if kind == 3 and turn == turns - 1:
        return "disconnect"
    return "finish"


def token_count(stats: str) -> int:
    match = re.match(r"(\d+) tokens?", stats)
    return int(match.group(1)) if match else 0


def stream(client: Client, request: Request) -> None:
    """Send one turn through gradio_client; cancel or stop it after its first streamed token if asked."""
    start = time.perf_counter()
    job = client.submit(*chat_args(request), api_name="/chat")
    for update in job:
        if update[1].startswith("Waiting:"):  # still queued: its place, no token yet
            continue
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter() - start
            if request.action == "cancel":
                job.cancel()
                break
            if request.action == "stop":
                client.predict(api_name="/stop")
    if request.action == "cancel":
        deadline = time.monotonic() + 60
        while not job.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        status = job.status().code
        request.outcome = "cancelled" if status == Status.CANCELLED or job.cancelled() else f"error: {status}"
        if status == Status.FINISHED and not job.cancelled():  # it finished before the cancel landed
            request.outcome = "done"
    if request.outcome and request.outcome != "done":
        return
    final = job.result(timeout=120)
    request.returned, stats = final[0], final[1]
    request.reply = message_text(request.returned[-1])
    request.tokens = token_count(stats)
    request.outcome = "stopped" if stats.endswith("stopped by you") else "done"


def disconnect(url: str, request: Request) -> None:
    """Start a turn over Gradio's REST API, read until the first streamed token, then drop the connection."""
    start = time.perf_counter()
    body = json.dumps({"data": chat_args(request)}).encode()
    post = urllib.request.Request(url + "gradio_api/call/chat", body, {"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(post, timeout=60).read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/chat/{event_id}", timeout=60) as response:
        generating = False
        for line in response:
            if line.startswith(b"event: generating"):
                generating = True
            elif generating and line.startswith(b"data:") and b'"Waiting:' not in line:  # a token, not its place
                request.first_token_s = time.perf_counter() - start
                break
    request.outcome = "disconnected"


def run_client(url: str, index: int, turns: int, max_new_tokens: int, requests: list[Request],
               lock: threading.Lock) -> None:
    client = Client(url, verbose=False, analytics_enabled=False)
    history: list[dict] = []
    try:
        for turn in range(turns):
            history = [*history, user(f"Client {index}, turn {turn}: tell me about topic {index * 31 + turn}.")]
            action = action_for(index, turn, turns)
            # replies that get cancelled, stopped or dropped are long, so they are still streaming then
            request = Request(index, turn, (BASE, TUNED)[(index + turn) % 2], 1000 * index + turn, history, action,
                              max_new_tokens if action == "finish" else LONG_REPLY)
            with lock:
                requests.append(request)
            try:
                if request.action == "disconnect":
                    disconnect(url, request)
                else:
                    stream(client, request)
            except Exception as e:  # recorded, reported and counted as a failure
                request.outcome = f"error: {type(e).__name__}: {e}"
            if request.outcome in ("done", "stopped"):
                history = request.returned
    finally:
        client.close()


def run_round(url: str, clients: int, turns: int, max_new_tokens: int,
              api_clients: int = 0) -> tuple[list[Request | ApiRequest], float]:
    """All clients at once: `clients` chat sessions and `api_clients` OpenAI-API clients."""
    requests: list[Request | ApiRequest] = []
    lock = threading.Lock()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients + api_clients) as pool:
        futures = [pool.submit(run_client, url, i, turns, max_new_tokens, requests, lock) for i in range(clients)]
        futures += [pool.submit(run_api_client, url, i, turns, max_new_tokens, requests, lock)
                    for i in range(api_clients)]
        for future in futures:
            future.result()
    return requests, time.perf_counter() - start


def check_requests(url: str, requests: list[Request | ApiRequest]) -> list[str]:
    """Problems found: failed requests, histories that came back changed, replies unlike a solo replay."""
    problems = check_api_requests(url, [r for r in requests if isinstance(r, ApiRequest)])
    requests = [r for r in requests if isinstance(r, Request)]
    problems += [f"client {r.client} turn {r.turn}: {r.outcome}" for r in requests if r.outcome.startswith("error")]
    replay = Client(url, verbose=False, analytics_enabled=False)
    try:
        for r in requests:
            if r.outcome not in ("done", "stopped"):
                continue
            sent = [(m["role"], message_text(m)) for m in r.history]
            back = [(m["role"], message_text(m)) for m in r.returned]
            if back[:-1] != sent or back[-1][0] != "assistant":
                problems.append(f"client {r.client} turn {r.turn}: the history came back changed")
            # a stopped reply is replayed up to the tokens it got: the same text, not only a prefix of a longer one
            again = r if r.outcome == "done" else replace(r, max_new_tokens=r.tokens)
            solo = message_text(replay.predict(*chat_args(again), api_name="/chat")[0][-1])
            if r.reply != solo:
                problems.append(f"client {r.client} turn {r.turn} ({r.outcome}): reply {r.reply!r} differs from "
                                f"the solo replay {solo!r}")
    finally:
        replay.close()
    return problems


def log_problems(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"Traceback|Exception|Error", line)]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(requests: list[Request], wall_s: float) -> dict:
    counts = {o: sum(r.outcome == o for r in requests) for o in ("done", "stopped", "cancelled", "disconnected")}
    ttft = [r.first_token_s for r in requests if r.first_token_s is not None]
    tokens = sum(r.tokens for r in requests)
    return {"requests": len(requests), **counts, "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s}


@dataclass
class LoadResult:
    rounds: list[dict]  # warm-up, then each measured round
    rss_mib: list[float]  # server RSS after each round
    problems: list[str]

    @property
    def rss_growth_mib(self) -> float:
        """Growth from the end of the warm-up to the end of the last round."""
        return self.rss_mib[-1] - self.rss_mib[0]


def server_process(port_url: str) -> psutil.Process:
    """The app.py child of this process (running_app starts it)."""
    port = int(port_url.rstrip("/").rsplit(":", 1)[1])
    for child in psutil.Process().children(recursive=True):
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("inet")):
            return child
    raise RuntimeError(f"no child process listens on port {port}")


def run_load(tmp: Path, clients: int, turns: int, max_new_tokens: int, rss_bound_mib: float,
             concurrency: int, api_clients: int = 0, rounds: int = 2, sessions_kept: int = 64) -> LoadResult:
    """`rounds` rounds of load, the first a warm-up; RSS is read after each. The app keeps the state of
    `sessions_kept` sessions: below the sessions a round opens, memory should stop growing after the warm-up."""
    with running_app(tmp, concurrency=concurrency, app_args=["--sessions-kept", str(sessions_kept)], **MODEL) as app:
        server = server_process(app.url)
        if api_clients:
            warm_up(app.url)
        summaries, problems, rss = [], [], []
        for _ in range(rounds):
            requests, wall = run_round(app.url, clients, turns, max_new_tokens, api_clients)
            time.sleep(1)  # let cancelled and disconnected generators finish their last step
            rss.append(server.memory_info().rss / 2**20)
            problems += check_requests(app.url, requests)
            summaries.append(summary(requests, wall))
            print(f"round {len(rss)}: server RSS {rss[-1]:.1f} MiB", file=sys.stderr, flush=True)
        if rss[-1] - rss[0] > rss_bound_mib:
            problems.append(f"server RSS grew {rss[-1] - rss[0]:.1f} MiB after the warm-up "
                            f"(bound {rss_bound_mib} MiB)")
        log = (tmp / "app.log").read_text()
    problems += [f"server log: {line}" for line in log_problems(log)]
    return LoadResult(summaries, rss, problems)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--api-clients", type=int, default=0,
                   help="OpenAI-API streaming clients alongside (bench/load_api.py)")
    p.add_argument("--concurrency", type=int, default=2, help="the app's --concurrency (replies computed at once)")
    p.add_argument("--rss-bound-mib", type=float, default=32)
    p.add_argument("--rounds", type=int, default=2, help="rounds of load, the first a warm-up (at least 2)")
    p.add_argument("--sessions-kept", type=int, default=64, help="app.py's --sessions-kept")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error(f"--rounds must be at least 2 (a warm-up and a measured round), got {args.rounds}")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_load(Path(tmp), args.clients, args.turns, args.max_new_tokens, args.rss_bound_mib,
                          args.concurrency, args.api_clients, args.rounds, args.sessions_kept)
    for i, r in enumerate(result.rounds):
        name = "warm-up" if i == 0 else f"round {i + 1}"
        print(f"{name}: {r['requests']} requests ({r['done']} done, {r['stopped']} stopped, {r['cancelled']} cancelled, "
              f"{r['disconnected']} disconnected) in {r['wall_s']:.1f} s; time to first token p50 "
              f"{r['ttft_p50_s']:.3f} s, p95 {r['ttft_p95_s']:.3f} s; {r['tokens']} tokens, "
              f"{r['tokens_per_s']:.1f} tokens/s aggregate")
    curve = " → ".join(f"{mib:.1f}" for mib in result.rss_mib)
    print(f"server RSS after each round (MiB): {curve} ({result.rss_growth_mib:+.1f} MiB after the warm-up, "
          f"bound {args.rss_bound_mib} MiB)")
    for problem in result.problems:
        print(f"PROBLEM: {problem}")
    print("all checks passed" if not result.problems else f"{len(result.problems)} problem(s)")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
