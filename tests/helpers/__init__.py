"""Test helpers shared by the tests and bench/: tiny Hub-layout checkpoints, a running app."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root


def updates(stream) -> list:
    """Everything an async generator yields, run to its end (the app's streaming handlers are async)."""
    import asyncio

    async def drain():
        return [item async for item in stream]
    return asyncio.run(drain())
