"""Prepare, and optionally push, a Hugging Face Space that serves the chat app.

    python -m minigpt.space --out space/ [--adapter checkpoints/alpaca-lora | --no-adapter] [--push USER/NAME]

The folder holds exactly what the Space runs: app.py and the minigpt package's source (its C decode step
included), the adapter's two files, README.md whose front matter configures the Space within the Hub's
limits, requirements.txt that installs torch's CPU build (a Space would otherwise get the CUDA build and
several GB of nvidia-* wheels on CPU hardware), and packages.txt (a C compiler, for the C decode step).
It is built from a MiniGPT checkout: app.py and README.md beside the package.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its network errors are not OSErrors
from huggingface_hub import HfApi, SpaceCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError

from .adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterError, read_adapter, resolve_adapter
from .cli import HelpWithDefaults, exit_cli
from .hub import network_problem

CHECKOUT = Path(__file__).resolve().parents[1]  # app.py, README.md, requirements.txt and minigpt/
PACKAGE_FILES = ("*.py", "*.c", "*.css", "*.js")  # the package's source and data: decode_step.c, app.css, inspect.js
ADAPTER_FOLDER = "checkpoints/alpaca-lora"  # where app.py looks for its default adapter
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYTHON = "3.11"  # the version CI runs
SHORT_DESCRIPTION = "GPT-2 from scratch: base vs Alpaca LoRA, look inside"
MAX_SHORT_DESCRIPTION = 60  # the Hub refuses a longer short_description
TRAINING_ONLY = ("tensorboard", "matplotlib")  # the loss plot and its log: the app never imports them
SYSTEM_PACKAGES = ["build-essential"]  # cc for the C decode step (without: PyTorch, slower)


class SpaceError(Exception):
    """Why the Space cannot be built or pushed, in one line."""


def front_matter() -> str:
    """The Space's configuration: the README's YAML header."""
    assert len(SHORT_DESCRIPTION) <= MAX_SHORT_DESCRIPTION
    card = SpaceCardData(title="MiniGPT", emoji="🔬", colorFrom="indigo", colorTo="pink", sdk="gradio",
                         sdk_version=version("gradio"), python_version=PYTHON, app_file="app.py", pinned=False,
                         license="mit", models=["openai-community/gpt2"], short_description=SHORT_DESCRIPTION)
    return f"---\n{card.to_yaml()}\n---\n"


def readme(checkout_readme: str) -> tuple[str, list[str]]:
    """The Space's README: the front matter, then the project README's introduction (up to its first
    section), and the assets that introduction shows."""
    intro = checkout_readme.split("\n## ", 1)[0].rstrip() + "\n"
    on_space = ("\nOn this Space the OpenAI-compatible API (`/v1`) is off unless the Space has a `MINIGPT_API_KEY` "
                "secret or a `MINIGPT_OPEN_API=1` variable; every variable is in the project's docs/deploy.md.\n")
    return front_matter() + "\n" + intro + on_space, re.findall(r"\]\((assets/[^)\s]+)\)", intro)


def requirements(checkout_requirements: str) -> str:
    """The checkout's pins but the training-only ones, torch's as its CPU build from PyTorch's index."""
    pins = [line for line in checkout_requirements.splitlines() if line.strip() and not line.startswith("#")
            and not line.startswith(TRAINING_ONLY)]
    torch = next(p for p in pins if p.startswith("torch=="))
    return ("# torch's CPU build: on CPU hardware PyPI's torch is the CUDA build, with several GB of nvidia-* wheels.\n"
            f"# On GPU hardware, delete the --extra-index-url line and write {torch} instead of {torch}+cpu.\n"
            f"--extra-index-url {CPU_INDEX}\n"
            + "".join(f"{p}+cpu\n" if p == torch else f"{p}\n" for p in pins))


def build(out: Path, adapter: str | None) -> list[str]:
    """Write the Space's files into out (new or empty); their paths, relative to out."""
    if not (CHECKOUT / "app.py").is_file() or not (CHECKOUT / "README.md").is_file():
        raise SpaceError(f"a Space is built from a MiniGPT checkout (app.py and README.md beside the minigpt "
                         f"package); this minigpt is installed in {CHECKOUT}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpaceError(f"--out {out} is not an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    adapter_folder = None
    if adapter is not None:
        adapter_folder = resolve_adapter(adapter)
        read_adapter(adapter_folder)  # a damaged adapter is refused here, not on the Space
    text, assets = readme((CHECKOUT / "README.md").read_text(encoding="utf-8"))
    files = {"README.md": text, "requirements.txt": requirements((CHECKOUT / "requirements.txt").read_text()),
             "packages.txt": "".join(f"{p}\n" for p in SYSTEM_PACKAGES)}
    copies = {"app.py": CHECKOUT / "app.py", **{a: CHECKOUT / a for a in assets}}
    for pattern in PACKAGE_FILES:
        copies |= {str(p.relative_to(CHECKOUT)): p for p in (CHECKOUT / "minigpt").rglob(pattern)
                   if "__pycache__" not in p.parts}
    if adapter_folder is not None:
        copies |= {f"{ADAPTER_FOLDER}/{name}": adapter_folder / name for name in (CONFIG_FILE, WEIGHTS_FILE)}
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(content, encoding="utf-8")
    for name, source in copies.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / name)
    return sorted([*files, *copies])


def push(out: Path, repo_id: str) -> str:
    """Create the Space (if new) and upload the folder as one commit; the Space's URL."""
    api = HfApi()  # the token of `hf auth login` or HF_TOKEN; the Hub of HF_ENDPOINT
    try:
        url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=out,
                          commit_message="MiniGPT chat app, built by python -m minigpt.space")
    except (HfHubHTTPError, HFValidationError, httpx2.HTTPError, ValueError) as e:  # ValueError: the Hub's
        # check of README.md's front matter, or an invalid repo id
        problem = network_problem(e) or str(e)
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if "HTTP 401" in problem else ""
        raise SpaceError(f"cannot push to the Space {repo_id}: {problem}{hint}") from None
    return str(url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigpt.space", description=__doc__.splitlines()[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--out", type=Path, help="the folder to write (new or empty; default with --push: a temporary one)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", help=f"the LoRA adapter the Space serves: a folder or a Hub repo id "
                                         f"(default: {ADAPTER_FOLDER} of the checkout, if it is there)")
    which.add_argument("--no-adapter", action="store_true", help="a base-only Space")
    p.add_argument("--push", metavar="USER/NAME", help="create the Space if needed and upload the folder to it")
    args = p.parse_args(argv)
    if args.out is None and args.push is None:
        p.error("give --out DIR, --push USER/NAME, or both")
    adapter = args.adapter
    if adapter is None and not args.no_adapter and (CHECKOUT / ADAPTER_FOLDER / CONFIG_FILE).is_file():
        adapter = str(CHECKOUT / ADAPTER_FOLDER)
    try:
        with tempfile.TemporaryDirectory(prefix="minigpt-space-") as scratch:
            out = args.out or Path(scratch)
            files = build(out, adapter)
            print(f"wrote {len(files)} files to {out}" + ("" if adapter else " (no adapter: the Space serves the "
                                                                             "base model alone)"))
            if args.push:
                print(f"pushed: {push(out, args.push)}")
    except (SpaceError, AdapterError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """The installed command (pyproject.toml: [project.scripts])."""
    exit_cli(main())


if __name__ == "__main__":
    cli()
