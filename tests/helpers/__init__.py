"""Test helpers shared by the tests and bench/: tiny Hub-layout checkpoints, a running app."""
import signal
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root


def run_async(coroutine):
    """asyncio.run(coroutine) in a thread of its own: Playwright's sync API (the browser tests' session-wide
    fixture) keeps an event loop running in the main thread, where asyncio.run refuses to start."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def updates(stream) -> list:
    """Everything an async generator yields, run to its end (the app's streaming handlers are async)."""
    async def drain():
        return [item async for item in stream]
    return run_async(drain())


def without_timings(log: list[dict]) -> list[dict]:
    """A training log's records without the fields that measure time (they differ between equal runs)."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "eval_s")} for r in log]


def interruptible() -> None:
    """preexec_fn of a child process a test sends SIGINT (Ctrl-C). A test run started in the background
    (`&`, nohup, some CI runners) ignores SIGINT, children inherit that, and Python then installs no
    KeyboardInterrupt handler: the child would never see the Ctrl-C, and the test would wait out its timeout."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
