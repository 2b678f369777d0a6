"""Merge a LoRA adapter into its base model and write a standalone model folder.

    python -m lora.merge --adapter checkpoints/alpaca-lora --out checkpoints/alpaca-merged
    python -m lora.merge --model gpt2 --adapter owner/some-lora --out merged --scale 0.5

Every targeted weight becomes W + scale * (alpha / r) * B A, computed in float32 (as peft's
merge_and_unload). --out is a model folder in the Hub layout (config.json, model.safetensors,
vocab.json, merges.txt): it loads in transformers (GPT2LMHeadModel.from_pretrained), in MiniGPT
(--model DIR), and goes through converters that expect a Hugging Face GPT-2 folder (llama.cpp's
convert_hf_to_gguf.py, vLLM).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minigpt.adapters import adapter_deltas, merge_deltas, read_adapter, resolve_adapter
from minigpt.cli import HelpWithDefaults, ctrl_c_exits_now, exit_cli
from minigpt.errors import CheckpointError
from minigpt.weights import load_pretrained, resolve_snapshot, save_pretrained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora.merge", description=__doc__.splitlines()[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--model", default=None,
                   help="base model: gpt2[-medium|-large|-xl], Hub repo id or folder (default: the adapter's "
                        "base_model_name_or_path)")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter: folder or Hub repo id")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the adapter's update (0: the base model)")
    return p.parse_args(argv)


def merge(model: str, adapter: str, out: Path, scale: float = 1.0) -> Path:
    """Write base model + scale x adapter into the folder out; returns it."""
    if (out / "model.safetensors").exists():
        raise ValueError(f"{out} already holds a model: choose another --out")
    with ctrl_c_exits_now("interrupted while loading; nothing was written"):
        config, tensors = read_adapter(resolve_adapter(adapter))
        model = model or config.base_model_name_or_path
        if not model:
            raise ValueError("the adapter does not name its base model: pass --model")
        snapshot = resolve_snapshot(model)
        base, _ = load_pretrained(snapshot, device="cpu", dtype=torch.float32)
    merged = merge_deltas(base, adapter_deltas(base, config, tensors), scale)
    return save_pretrained(merged, out, snapshot)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        merge(args.model, args.adapter, args.out, args.scale)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged model written to {args.out}: try python -m minigpt.generate --model {args.out} --prompt \"...\"",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_cli(main())
