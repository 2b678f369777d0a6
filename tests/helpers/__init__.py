"""Test helpers shared by the tests and bench/: tiny Hub-layout checkpoints, a running app."""
import signal
import subprocess
import sys
from collections.abc import Callable
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


def call_main(main: Callable[[list[str]], int], *argv: str) -> subprocess.CompletedProcess:
    """A command's main(argv) run in this process, with its output captured as a child's would be: for tests
    of what a command says and returns, where a new Python (about 2 s of importing torch) adds nothing. A
    SystemExit (argparse's refusals) becomes the return code. Tests of the process itself (signals, what
    it imports, a real stdin) start one."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # as the interpreter would end: None is 0; a message is printed, and is 1
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
    return subprocess.CompletedProcess(["main", *argv], code, out.getvalue(), err.getvalue())


def generate_cli(*argv: str) -> subprocess.CompletedProcess:
    """`python -m minigpt.generate *argv`, its main run in this process (call_main)."""
    import importlib
    return call_main(importlib.import_module("minigpt.generate").main, *argv)  # minigpt.generate: also a function


def run_all(env: dict, *commands: list[str] | tuple[dict, list[str]]) -> list[subprocess.CompletedProcess]:
    """Run the commands side by side in the repository and return their results. Each is a new Python that
    imports torch (about 1.5 s of one core): side by side they use both cores, and their waits overlap.
    A command may come with its own environment: (env, command)."""
    commands = [c if isinstance(c, tuple) else (env, c) for c in commands]
    procs = [subprocess.Popen(c, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for e, c in commands]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]
