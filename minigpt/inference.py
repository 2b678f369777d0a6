"""The models a command or the app serves: the base, the LoRA-tuned one, in one chosen precision."""
from __future__ import annotations

import warnings
from pathlib import Path

import tiktoken
import torch

from lora import load_tuned_model

from .model import GPT
from .native import NativeUnavailable, use_native_decode
from .quantize import int8_drafts, quantize_int8
from .weights import load_pretrained

# Precision name -> the dtype the model is loaded in; int8 loads float32, then quantizes the Linears.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}


def load_for_inference(name_or_path: str | Path, adapter: str | Path | None = None, device: str | None = None,
                       precision: str = "float32", compile: bool = False
                       ) -> tuple[GPT, GPT | None, tiktoken.Encoding]:
    """(base model, tuned model or None without an adapter, tokenizer).

    The tuned model shares every tensor with the base except the merged LoRA targets. Order matters:
    the merge needs float weights, so int8 quantizes both models afterwards (their shared weights
    once), and a compiled decode step is bound to each final model. int8 on CPU decodes in C
    (native.py) unless compile asks for torch.compile's step instead.
    """
    base, tokenizer = load_pretrained(name_or_path, device=device, dtype=PRECISIONS[precision])
    tuned = load_tuned_model(base, adapter) if adapter else None
    models = [m for m in (base, tuned) if m is not None]
    if precision == "int8":
        quantize_int8(*models)
    if compile:
        for model in models:
            model.compile_decode()
    elif precision == "int8":
        try_native_decode(*models)
    return base, tuned, tokenizer


def try_native_decode(*models: GPT) -> None:
    """Decode these int8 models' single tokens in C where the kernel builds for this machine (CPU models
    only); otherwise warn and keep PyTorch's int8 kernel (model.native_step stays None)."""
    if any(model.lm_head.weight.device.type != "cpu" for model in models):
        return
    try:
        for model in models:
            use_native_decode(model)
    except NativeUnavailable as e:
        for model in models:
            model.native_step = None
        warnings.warn(f"int8 decoding stays on PyTorch's kernel: {e}", stacklevel=2)


def speculative_drafts(*models: GPT) -> list[GPT]:
    """int8 drafts of float models for speculative decoding (quantize.int8_drafts), decoding in C where it builds."""
    drafts = int8_drafts(*models)
    try_native_decode(*drafts)
    return drafts
