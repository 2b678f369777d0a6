"""MiniGPT chat: GPT-2 written from scratch, and its Alpaca LoRA, streaming side by side with attention
and log-prob panels. The file a Space (and README) runs; the app is minigpt/serve/ (launch.py: the options,
app.py: the page), also installed as the `minigpt-chat` command.

    python app.py --model gpt2 --adapter checkpoints/alpaca-lora --host 127.0.0.1 --port 7860
"""
import os
import signal
import sys
from pathlib import Path


def leave_at_once(signum, frame) -> None:
    # Ctrl-C while torch is imported: a KeyboardInterrupt raised inside an extension's import leaves it
    # half-loaded and ends in a traceback, so leave before Python raises one.
    print("\ninterrupted", file=sys.stderr, flush=True)
    os._exit(130)


signal.signal(signal.SIGINT, leave_at_once)
from minigpt.serve.launch import main  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, main turns Ctrl-C into one line

if __name__ == "__main__":
    # checkpoints/alpaca-lora beside this file is the default adapter, whatever the cwd
    sys.exit(main(home=Path(__file__).resolve().parent, prog="python app.py"))
