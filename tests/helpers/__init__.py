"""Test helpers shared by the tests and bench/: tiny Hub-layout checkpoints, a running app."""
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
