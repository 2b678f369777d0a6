"""The models a command or the app serves: the base and the LoRA-tuned one, in one chosen precision,
each behind a Decoder that picked its fastest decode step here, once."""
from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import tiktoken
import torch

from .adapters import AdapterError, adapter_deltas, merge_deltas, read_adapter, resolve_adapter
from .model import GPT
from .speed.decoder import Decoder, as_decoder
from .speed.hugepages import move_to_huge_pages
from .speed.native import NativeUnavailable, native_available, native_step
from .speed.onednn import KERNEL_ENV, onednn_is_faster, use_onednn
from .speed.int4 import quantize_int4
from .speed.quantize import Int8Linear, int8_drafts, quantize_int8
from .lora_scale import AdapterScale
from .weights import load_pretrained

# Precision name -> the dtype the model is loaded in; int8 and int4 load float32, then quantize the Linears.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32,
              "int4": torch.float32}
QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}  # in place, on models that share weights together


OnAdapterError = Callable[[AdapterError], None]


def load_for_inference(name_or_path: str | Path, adapter: str | Path | None = None, device: str | None = None,
                       precision: str = "float32", on_adapter_error: OnAdapterError | None = None,
                       ) -> tuple[Decoder, Decoder | None, tiktoken.Encoding]:
    """(base decoder, tuned decoder or None without an adapter, tokenizer); see load_with_scale."""
    base, lora, tokenizer = load_with_scale(name_or_path, adapter, device, precision, on_adapter_error)
    return base, lora.tuned if lora is not None else None, tokenizer


def load_with_scale(name_or_path: str | Path, adapter: str | Path | None = None, device: str | None = None,
                       precision: str = "float32", on_adapter_error: OnAdapterError | None = None,
                       ) -> tuple[Decoder, AdapterScale | None, tiktoken.Encoding]:
    """(base decoder, the adapter at any scale (None without an adapter), tokenizer).

    An adapter that cannot be used raises AdapterError, unless on_adapter_error is given: then it gets
    the error and the base is served alone (for an adapter that is only a convenience, such as a default).

    The tuned model shares every tensor with the base except the merged LoRA targets. Order matters:
    the merge needs float weights, so int8 and int4 quantize both models afterwards (their shared weights
    once), and each decode step is built on its final model.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    base, tokenizer = load_pretrained(name_or_path, device=device, dtype=PRECISIONS[precision])
    deltas = None
    if adapter:
        try:
            deltas = adapter_deltas(base, *read_adapter(resolve_adapter(adapter)))
        except AdapterError as e:
            if on_adapter_error is None:
                raise
            on_adapter_error(e)
    if deltas is None:
        loaded = with_precision([base], precision)[0], None, tokenizer
    else:
        loaded = *with_adapter(base, deltas, precision), tokenizer
    if precision in QUANTIZERS:
        return_freed_memory()
    return loaded


def with_adapter(base: GPT, deltas: dict[str, torch.Tensor], precision: str) -> tuple[Decoder, AdapterScale]:
    """Merge the adapter's float32 updates into a weight-sharing copy of a float base, apply the precision
    to both, and keep what other scales need: (base decoder, the adapter at any scale)."""
    float_targets = {name: base.get_submodule(name) for name in deltas}  # quantizing replaces them: kept here
    tuned = merge_deltas(base, deltas)
    base_decoder, tuned_decoder = with_precision([base, tuned], precision)
    finish = partial(_finish, precision=precision)
    return base_decoder, AdapterScale(base_decoder, tuned_decoder, deltas, float_targets, finish)


def with_precision(models: list[GPT], precision: str) -> list[Decoder]:
    """Apply the precision to models that share weights (together: shared weights are quantized once),
    move their weights to huge pages, and build their decoders. A float32 model that will not decode in C
    multiplies through oneDNN where that measured faster (the C step reads (out, in) weights, the order
    oneDNN changes)."""
    if precision in QUANTIZERS:
        QUANTIZERS[precision](*models)
    elif precision == "float32" and not (float32_in_c(models[0]) and native_available()) \
            and onednn_is_faster(models[0]):
        for model in models:
            use_onednn(model)
    move_to_huge_pages(*models)  # before the C step takes the weights' addresses
    return decoders_for(*models)


def return_freed_memory() -> None:
    """Give the memory of the float32 weights that int8 or int4 replaced back to the system. glibc keeps freed
    heap blocks for reuse, so without this an int8 process held about as much as a float32 one
    (gpt2-medium shape: 1.97 GB resident after loading, 0.78 GB after malloc_trim; its int8 weights are
    0.39 GB). Without glibc, nothing is done."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _finish(model: GPT, precision: str) -> Decoder:
    """The decoder of a copy merged at another scale. Its Linears are copies of the base's, so in float32
    they already multiply through the kernel loading chose for the base; int8 and int4 quantize the merged ones."""
    if precision in QUANTIZERS:
        QUANTIZERS[precision](model)
    return decoders_for(model)[0]


def decoders_for(*models: GPT) -> list[Decoder]:
    """A Decoder per model: int8, int4 and float32 CPU models decode single tokens in C where the step builds
    for this machine (float32 unless $MINIGPT_FLOAT32_KERNEL asks for a PyTorch kernel); otherwise (and
    for every other model) PyTorch does, after one warning line. (An int4 model's lm_head is int8.)"""
    in_c = [m for m in models if (m.device.type == "cpu" and isinstance(m.lm_head, Int8Linear)) or float32_in_c(m)]
    try:
        steps = {id(m): native_step(m) for m in in_c}
    except NativeUnavailable as e:
        warnings.warn(f"decoding stays on PyTorch: {e}", stacklevel=2)
        steps = {}
    return [Decoder(m, steps[id(m)], "C decode step") if id(m) in steps else Decoder(m) for m in models]


def float32_in_c(model: GPT) -> bool:
    """Whether a float32 model should decode in C: on CPU, unless $MINIGPT_FLOAT32_KERNEL asks for PyTorch's."""
    return (model.device.type == "cpu" and model.lm_head.weight.dtype == torch.float32
            and os.environ.get(KERNEL_ENV) not in ("onednn", "pytorch"))


def speculative_drafts(*models: GPT | Decoder) -> list[Decoder]:
    """int8 drafts of float models for speculative decoding (quantize.int8_drafts), decoding in C where it builds."""
    return decoders_for(*int8_drafts(*(as_decoder(m).model for m in models)))
