"""What a step's logits are read for, in C where they are a CPU float32 row: the token greedy sampling takes,
the tokens top-k keeps, and a token's log-prob with the top N alternatives (a TokenEvent's).

PyTorch's max, log_softmax and topk over GPT-2's 50,257 logits took about 0.25 ms of each token in generation,
next to about 2.9 ms for an int4 GPT-2 124M step (docs/speed.md). decode_step.c reads the row in the calling
thread in about 35 us: once for its largest values, once for the sum of exponentials. The log-probs are
PyTorch's formula, (x - max) - log(sum of exp(x - max)), with the sum in double: within float32 rounding of
the exact value (PyTorch's float32 sum is off by up to ~5e-6). Equal values come in index order (the first
of equal maxima first, as argmax takes it); NaN is never taken. Other logits (CUDA, other dtypes, several
rows) and machines without the C library take PyTorch.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import native


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        return native.library()
    except native.NativeUnavailable:
        return None


def _in_c(logits: torch.Tensor) -> ctypes.CDLL | None:
    """The library, if logits is a row it reads (CPU, float32, contiguous, not empty)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 1 or not logits.numel():
        return None
    return _library() if logits.is_contiguous() else None


def first_max(logits: torch.Tensor) -> torch.Tensor:
    """The index of the largest logit of each row of logits (..., vocab), the first of equal maxima, as a
    tensor (..., 1): argmax's choice, faster."""
    lib = _in_c(logits)
    if lib is not None:
        index = torch.empty(1, dtype=torch.int64)
        if lib.minigpt_top(logits.data_ptr(), logits.numel(), 1, index.data_ptr(), ctypes.byref(ctypes.c_float())):
            return index
    # elsewhere, or every logit NaN: max's indices are argmax's, in a third of its time on CPU
    return logits.max(dim=-1, keepdim=True).indices


def top_k_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the logits (vocab,) that top-k keeps, in id order: those at least as large as the k-th
    largest (more than k where others tie with it)."""
    lib = _in_c(logits)
    if lib is not None and k < logits.numel():
        ids, values = torch.empty(k + 1, dtype=torch.int64), torch.empty(k + 1)
        found = lib.minigpt_top(logits.data_ptr(), logits.numel(), k + 1, ids.data_ptr(), values.data_ptr())
        if found == k + 1 and values[k] < values[k - 1]:  # the k-th ties with no other: exactly these k
            return ids[:k].sort().values
    return (logits >= torch.topk(logits, k).values[-1]).nonzero().flatten()


def log_probs(logits: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """log_softmax(logits)[token] and the top_n largest log-probs as (index, log-prob), largest first, for one
    row of logits (vocab,)."""
    if not 0 <= token < logits.size(-1):
        raise IndexError(f"token {token} is outside the {logits.size(-1)} logits")
    top_n = min(top_n, logits.size(-1))
    lib = _in_c(logits)
    if lib is None:
        all_log_probs = logits.log_softmax(dim=-1)
        top = torch.topk(all_log_probs, top_n)
        return float(all_log_probs[token]), list(zip(top.indices.tolist(), top.values.tolist()))
    k = max(top_n, 1)  # the maximum is needed even when no alternatives are
    ids, values, chosen = (ctypes.c_int64 * k)(), (ctypes.c_float * k)(), ctypes.c_float()
    found = lib.minigpt_log_probs(logits.data_ptr(), logits.numel(), token, k, ctypes.byref(chosen), ids, values)
    kept = min(found, top_n)
    return chosen.value, list(zip(ids[:kept], values[:kept]))
