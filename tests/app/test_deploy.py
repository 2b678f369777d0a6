"""The app deployed as users deploy it: a folder built by `python -m minigpt.space` run as a Space runs it
(its requirements installed into a fresh environment, SPACE_ID set, configured by variables only), and
the package installed from its wheel, serving the chat with its own commands outside the checkout.

The fresh environments see this machine's packages (--system-site-packages) and install offline: the pins
are what is installed here, and the Hub and PyPI cannot be reached."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client

from minigpt.space import build
from tests.app.test_api import chat_args, history
from tests.helpers import REPO
from tests.helpers.app_server import free_port, make_adapter, serving
from tests.helpers.checkpoints import make_checkpoint

pytestmark = pytest.mark.slow


def fresh_environment(folder: Path) -> Path:
    """A new virtual environment; its bin folder. Without a pip of its own (which would bring an older
    setuptools than torch needs, shadowing this machine's): `python -m pip` there is this machine's pip."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(folder)],
                   check=True, timeout=300)
    return folder / "bin"


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without what points into the checkout (PYTHONPATH) or configures the app."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("MINIGPT_", "GRADIO_"))}
    return {**env, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **variables}


def test_the_space_folder_installs_and_serves_as_a_space_runs_it(tmp_path):
    checkpoint, _ = make_checkpoint(tmp_path / "model")
    space = tmp_path / "space"
    build(space, str(make_adapter(checkpoint, tmp_path / "adapter")))
    bin = fresh_environment(tmp_path / "env")
    install = subprocess.run([bin / "python", "-m", "pip", "install", "--no-index", "-r", "requirements.txt"], cwd=space,
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    where = subprocess.run([bin / "python", "-c", "import minigpt; print(minigpt.__file__)"], cwd=space,
                           capture_output=True, text=True, env=clean_env(), timeout=300)
    assert Path(where.stdout.strip()).parent == space / "minigpt"  # the Space's copy, not the checkout's

    port = free_port()  # a Space passes no flag: everything below comes from variables
    env = clean_env(SPACE_ID="me/chat", MINIGPT_MODEL=str(checkpoint), MINIGPT_DEVICE="cpu",
                    GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
    with serving([str(bin / "python"), "app.py"], space, env, port, tmp_path / "space.log") as url:
        client = Client(url, verbose=False)
        base = client.predict(*chat_args(history("Hello there")), api_name="/chat")[0]
        tuned = client.predict(*chat_args(history("Hello there"), mode="Alpaca LoRA"), api_name="/chat")[0]
        assert base[-1]["role"] == tuned[-1]["role"] == "assistant" and base[-1]["content"] != tuned[-1]["content"]
    # the default adapter is the Space's checkpoints/alpaca-lora; the address came from Gradio's variables
    # (bound to loopback here, /v1 is open: on 0.0.0.0 it is off, tests/minigpt/serve/test_launch.py)
    assert "mode is off" not in (tmp_path / "space.log").read_text()


def test_the_wheel_installs_commands_that_serve_the_chat_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(REPO / name, source / name)
    for package in ["minigpt", "lora"]:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheel_run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                                str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert wheel_run.returncode == 0, wheel_run.stderr
    wheel = next((tmp_path / "dist").glob("minigpt-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
        assert "minigpt/serve/app.css" in z.namelist() and "minigpt/speed/decode_step.c" in z.namelist()
    description = metadata.split("\n\n", 1)[1]
    assert description.startswith("# MiniGPT") and "Requires-Python: >=3.11" in metadata  # no front matter

    bin = fresh_environment(tmp_path / "env")
    install = subprocess.run([bin / "python", "-m", "pip", "install", "--no-index", "--no-deps", str(wheel)], capture_output=True,
                             text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    commands = subprocess.run(  # every command's function loads (one process: torch is imported once)
        [bin / "python", "-c", "from importlib.metadata import entry_points\n"
         "for ep in entry_points(group='console_scripts'):\n"
         "    if ep.value.startswith(('minigpt', 'lora')): ep.load(); print(ep.name)"],
        cwd=elsewhere, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert sorted(commands.stdout.split()) == ["minigpt-chat", "minigpt-generate", "minigpt-perplexity",
                                               "minigpt-pretrain", "minigpt-space", "minigpt-train"], commands.stderr
    for command in ["minigpt-chat", "minigpt-generate"]:
        run = subprocess.run([bin / command, "--help"], cwd=elsewhere, capture_output=True, text=True,
                             env=clean_env(), timeout=300)
        assert run.returncode == 0 and run.stdout.startswith("usage:"), (command, run.stderr)
    checkpoint, _ = make_checkpoint(tmp_path / "model")
    port = free_port()
    command = [str(bin / "minigpt-chat"), "--model", str(checkpoint), "--device", "cpu", "--port", str(port)]
    with serving(command, elsewhere, clean_env(), port, tmp_path / "chat.log") as url:
        chat = Client(url, verbose=False).predict(*chat_args(history("Hi")), api_name="/chat")[0]
        assert chat[-1]["role"] == "assistant"
    assert "Alpaca LoRA mode is off" in (tmp_path / "chat.log").read_text()  # no checkpoints/ in the cwd
    space = subprocess.run([bin / "minigpt-space", "--out", str(tmp_path / "space")], cwd=elsewhere,
                           capture_output=True, text=True, env=clean_env(), timeout=300)
    assert space.returncode == 2 and space.stderr.startswith("error: a Space is built from a MiniGPT checkout")
