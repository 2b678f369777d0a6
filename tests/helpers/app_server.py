"""Run app.py in a subprocess on a free port with a tiny checkpoint and a tiny LoRA adapter (API and browser tests)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora import AdapterConfig, inject_lora, save_adapter
from minigpt import load_pretrained
from tests.helpers import REPO
from tests.helpers.checkpoints import make_checkpoint


@dataclass
class RunningApp:
    url: str
    checkpoint: Path
    adapter: Path
    log: Path  # the app's stdout and stderr


def make_adapter(checkpoint: Path, folder: Path, seed: int = 1) -> Path:
    """A tiny PEFT adapter for checkpoint, written by lora's own save_adapter; its B matrices are random
    (not zero, as fresh LoRA would be) so the tuned model answers differently from the base."""
    model, _ = load_pretrained(checkpoint, device="cpu")
    inject_lora(model, ["c_attn"], r=4, alpha=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return save_adapter(model, folder, AdapterConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))


def answers(url: str) -> bool:
    """Whether url answers 200 (within 5 s)."""
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(tmp: Path, concurrency: int = 2, startup_s: float = 180, app_args: Sequence[str] = (),
                with_adapter: bool = True, **model_config) -> Iterator[RunningApp]:
    """`python app.py` on a tiny 1024-position checkpoint (long enough replies to press Stop during), with a
    tiny adapter or --no-adapter; app_args are more of app.py's options (e.g. --api-key); model_config
    overrides make_checkpoint's sizes (e.g. n_embd=256 for the load test). The server's output goes to
    tmp/app.log."""
    with running_apps(dict(tmp=tmp, concurrency=concurrency, app_args=app_args, with_adapter=with_adapter,
                           **model_config), startup_s=startup_s) as (app,):
        yield app


@contextmanager
def running_apps(*options: dict, startup_s: float = 180) -> Iterator[list[RunningApp]]:
    """running_app(**each of options), started side by side: a start is mostly one core's work (importing
    torch and Gradio, loading the model), so on two cores two apps answer in about the time of one."""
    prepared = [app_launch(**o) for o in options]
    with serving_all([launch for launch, _ in prepared], startup_s) as urls:
        yield [replace(app, url=url) for url, (_, app) in zip(urls, prepared)]


def app_launch(tmp: Path, concurrency: int = 2, app_args: Sequence[str] = (), with_adapter: bool = True,
               **model_config) -> tuple[Launch, RunningApp]:
    """(the launch of app.py, the app it will be, its url not yet known): running_app's arguments."""
    checkpoint, _ = make_checkpoint(tmp / "model", **{"n_positions": 1024, **model_config})
    adapter = make_adapter(checkpoint, tmp / "adapter")
    adapter_args = ["--adapter", str(adapter)] if with_adapter else ["--no-adapter"]
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MINIGPT_API_KEY", None)  # the key, if any, comes from app_args
    command = [sys.executable, "app.py", "--model", str(checkpoint), *adapter_args, "--device", "cpu",
               "--port", str(port), "--concurrency", str(concurrency), *app_args]
    return Launch(command, REPO, env, port, tmp / "app.log"), RunningApp("", checkpoint, adapter, tmp / "app.log")


@dataclass
class Launch:
    """A chat app's command, where and with what environment it runs, its port, and where its output goes."""
    command: Sequence[str]
    cwd: Path
    env: dict[str, str]
    port: int
    log_path: Path


@contextmanager
def serving(command: Sequence[str], cwd: Path, env: dict[str, str], port: int, log_path: Path,
            startup_s: float = 180) -> Iterator[str]:
    """Run a chat app command until the block ends; yields its URL once it answers on the port. Its output
    goes to log_path; if it exits or stays silent, the error quotes it."""
    with serving_all([Launch(command, cwd, env, port, log_path)], startup_s) as (url,):
        yield url


@contextmanager
def serving_all(launches: Sequence[Launch], startup_s: float = 180) -> Iterator[list[str]]:
    """serving() for each launch, all started before any is waited for."""
    with ExitStack() as stack:
        processes = [stack.enter_context(started(launch)) for launch in launches]
        yield [answering(process, launch, startup_s) for process, launch in zip(processes, launches)]


@contextmanager
def started(launch: Launch) -> Iterator[subprocess.Popen]:
    """The launch's command running, its output to its log, until the block ends (then stopped)."""
    with launch.log_path.open("w") as log:
        process = subprocess.Popen(launch.command, cwd=launch.cwd, env=launch.env, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            stop(process, timeout_s=10)


def stop(process: subprocess.Popen, timeout_s: float) -> None:
    """Terminate process; kill it if it has not exited within timeout_s."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def answering(process: subprocess.Popen, launch: Launch, startup_s: float) -> str:
    """The app's URL once it answers on its port; if it exits or stays silent, the error quotes its output."""
    url = f"http://127.0.0.1:{launch.port}/"
    deadline = time.monotonic() + startup_s
    while not answers(url + "health"):  # open even where the page needs a login
        if process.poll() is not None:
            raise RuntimeError(f"{launch.command[0]} exited with {process.returncode}:\n{launch.log_path.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{launch.command[0]} did not answer in {startup_s} s:\n{launch.log_path.read_text()}")
        time.sleep(0.3)
    return url
