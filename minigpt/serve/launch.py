"""The chat app's command line (`python app.py`, `minigpt-chat`): its options, answered before the slow
imports (Gradio, the models), then the page in minigpt/serve/app.py.

    minigpt-chat --model gpt2 --adapter checkpoints/alpaca-lora --host 127.0.0.1 --port 7860
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minigpt.cli import INTERRUPTED, add_precision_arguments, exit_cli

# Every option that matters on a Hugging Face Space, where no flag can be passed, also reads a variable
# (set in the Space's settings; a key as a secret). A flag wins over its variable, the variable over the
# default. Gradio's own GRADIO_SERVER_NAME and GRADIO_SERVER_PORT name the address. docs/deploy.md lists them.
ENVIRONMENT = {
    "model": "MINIGPT_MODEL",
    "adapter": "MINIGPT_ADAPTER",
    "host": "GRADIO_SERVER_NAME",
    "port": "GRADIO_SERVER_PORT",
    "device": "MINIGPT_DEVICE",
    "precision": "MINIGPT_PRECISION",
    "speculative": "MINIGPT_SPECULATIVE",
    "concurrency": "MINIGPT_CONCURRENCY",
    "queue_size": "MINIGPT_QUEUE_SIZE",
    "sessions_kept": "MINIGPT_SESSIONS_KEPT",
    "api_key": "MINIGPT_API_KEY",
    "open_api": "MINIGPT_OPEN_API",
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def on_space() -> bool:
    """Whether this process is a Hugging Face Space (which sets SPACE_ID)."""
    return "SPACE_ID" in os.environ


def how_to_set(dest: str, value: str) -> str:
    """How a user sets option `dest` to `value` here: the flag, or on a Space the variable."""
    if on_space():
        kind = "secret" if dest == "api_key" else "variable"
        return f"the Space {kind} {ENVIRONMENT[dest]}={value} (in the Space's settings)"
    return f"--{dest.replace('_', '-')}" + (f" {value}" if value != "1" else "")


def read_environment(p: argparse.ArgumentParser) -> None:
    """Make each ENVIRONMENT variable that is set the default of its option, converted and checked as the
    flag would be; a bad value is a usage error naming the variable."""
    for action in p._actions:
        name = ENVIRONMENT.get(action.dest)
        if name is None:
            continue
        action.help = f"{action.help or ''} [env: {name}]".strip()
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if raw.lower() not in TRUE + FALSE:
                p.error(f"{name}={raw!r}: expected one of {', '.join(TRUE + FALSE)}")
            value = raw.lower() in TRUE
        else:
            try:
                value = action.type(raw) if action.type else raw
            except ValueError:
                p.error(f"{name}={raw!r}: expected {'a whole number' if action.type is int else 'a value'}")
            if action.choices and value not in action.choices:
                p.error(f"{name}={raw!r}: expected one of {', '.join(map(str, action.choices))}")
        p.set_defaults(**{action.dest: value})


def default_adapter(home: Path) -> Path:
    """The adapter served when none is named: checkpoints/alpaca-lora in the app's folder."""
    return home / "checkpoints" / "alpaca-lora"


def parse_args(argv: list[str] | None = None, prog: str = "python app.py") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="MiniGPT chat: GPT-2 from scratch and its Alpaca LoRA, "
                                                     "with panels that look inside")
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hub repo id, or a local folder")
    adapter = p.add_mutually_exclusive_group()
    adapter.add_argument("--adapter", default=None,
                         help="PEFT GPT-2 LoRA adapter: a folder or a Hub repo id (default: checkpoints/alpaca-lora "
                              "in the app's folder, if it is there and fits the model)")
    adapter.add_argument("--no-adapter", action="store_true", help="serve the base model alone, even if "
                                                                   "checkpoints/alpaca-lora is there")
    p.add_argument("--host", default="0.0.0.0" if on_space() else "127.0.0.1",  # a Space serves from its container
                   help="address to bind")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also open a temporary public *.gradio.live link")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    add_precision_arguments(p)
    p.add_argument("--speculative", action="store_true",
                   help="an int8 copy proposes tokens, the model checks several per pass: same model, faster on CPU")
    p.add_argument("--concurrency", type=int, default=8,
                   help="replies decoded together in one batch, chat and API together; the rest wait in "
                        "arrival order (minigpt/serve/engine.py: DEFAULT_ROWS)")
    p.add_argument("--queue-size", type=int, default=256,
                   help="replies that may wait for a free row; more are refused as busy (503 on the API)")
    p.add_argument("--sessions-kept", type=int, default=64,
                   help="keep the per-session state (last reply, panels) of this many most recent browser "
                        "sessions; older ones start over: memory levels off")
    p.add_argument("--api-key", default=None,
                   help="every /v1 (OpenAI-compatible API) request must send it as a bearer token, and the chat "
                        "page asks for it as a login password (none: /v1 is open on loopback, off beyond it, and "
                        "the page is open to whoever can reach it)")
    p.add_argument("--open-api", action="store_true",
                   help="serve /v1 without a key even when bound beyond loopback (--host 0.0.0.0, a Space)")
    read_environment(p)
    args = p.parse_args(argv)
    if args.no_adapter:
        args.adapter = None  # --no-adapter wins over MINIGPT_ADAPTER
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be between 1 and 65535, got {args.port}")
    for name in ("concurrency", "sessions_kept", "queue_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.speculative and args.precision in ("int8", "int4"):
        p.error("--speculative checks an int8 draft with the float model: use it with a float --precision")
    return args


def main(argv: list[str] | None = None, home: Path | None = None, prog: str = "minigpt-chat") -> int:
    """Parse the options, then load and serve. home: the folder whose checkpoints/alpaca-lora is the default
    adapter (app.py passes its own folder, whatever the cwd; the installed command uses the cwd)."""
    args = parse_args(argv, prog)
    try:
        from minigpt.serve.app import serve  # Gradio and torch: seconds of imports, after --help has answered

        return serve(args, None if args.no_adapter else default_adapter(home or Path.cwd()))
    except KeyboardInterrupt:  # Ctrl-C while importing, building the page, starting Gradio's server or serving
        print("\ninterrupted", file=sys.stderr)
        exit_cli(INTERRUPTED)  # at once: Gradio's and the API's threads would hold a normal exit
