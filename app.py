"""MiniGPT chat: GPT-2 written from scratch, and its Alpaca LoRA, streaming side by side with attention
and log-prob panels. The file a Space (and README) runs; the app is minigpt/serve/ (launch.py: the options,
app.py: the page), also installed as the `minigpt-chat` command.

    python app.py --model gpt2 --adapter checkpoints/alpaca-lora --host 127.0.0.1 --port 7860
"""
import sys
from pathlib import Path

try:
    from minigpt.serve.launch import main
except KeyboardInterrupt:  # Ctrl-C while torch is imported: a line, not a traceback
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    # checkpoints/alpaca-lora beside this file is the default adapter, whatever the cwd
    sys.exit(main(home=Path(__file__).resolve().parent, prog="python app.py"))
