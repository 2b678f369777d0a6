"""Int8 decoding through int8_decode.c: one C call per token instead of ~500 PyTorch ops.

native_step(model) compiles the C file for this CPU (0.3 s, once per process; it needs a C
compiler, OpenMP, glibc's libmvec and AVX-512) and returns the step that decodes the model's
single tokens through it (inference.py wraps it in a Decoder). Prompts, batches and the attention
panel's steps keep the PyTorch path; both read and write the same KVCache. Build it on the final
model: it holds pointers to the model's tensors as they are now.
"""
from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from ..model import GPT, KVCache
from .quantize import Int8Embedding, Int8Linear

SOURCE = Path(__file__).with_name("int8_decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lmvec", "-lm"]  # libmvec: glibc's vectorized tanhf


class NativeUnavailable(RuntimeError):
    """The C decode step cannot serve this model or machine; the message says why."""


# The structs of int8_decode.c, field for field.
class Int8LinearStruct(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64)]


class _Block(ctypes.Structure):
    _fields_ = [("ln_1_weight", ctypes.c_void_p), ("ln_1_bias", ctypes.c_void_p),
                ("c_attn", Int8LinearStruct), ("attn_proj", Int8LinearStruct),
                ("ln_2_weight", ctypes.c_void_p), ("ln_2_bias", ctypes.c_void_p),
                ("c_fc", Int8LinearStruct), ("mlp_proj", Int8LinearStruct)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layer", ctypes.c_int64), ("n_head", ctypes.c_int64), ("n_embd", ctypes.c_int64),
                ("mlp_dim", ctypes.c_int64), ("eps", ctypes.c_float), ("wpe", ctypes.c_void_p),
                ("ln_f_weight", ctypes.c_void_p), ("ln_f_bias", ctypes.c_void_p), ("lm_head", Int8LinearStruct),
                ("blocks", ctypes.POINTER(_Block))]


@functools.cache
def library() -> ctypes.CDLL:
    """int8_decode.c compiled for this CPU (with $CC, default cc) and loaded; the file is deleted once mapped."""
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(prefix="minigpt-") as folder:
        target = Path(folder) / "int8_decode.so"
        try:
            built = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(target), *LIBS],
                                   capture_output=True, text=True)
        except OSError as e:
            raise NativeUnavailable(f"no C compiler to build {SOURCE.name}: {compiler!r}: {e.strerror}") from None
        if built.returncode:
            raise NativeUnavailable(f"{compiler} could not build {SOURCE.name}: {built.stderr.strip()[-600:]}")
        lib = ctypes.CDLL(str(target))
    lib.gpt2_int8_step.restype = ctypes.c_int
    lib.gpt2_int8_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.int8_linear.restype = None  # one matrix-vector product alone, for bench/matmul.py
    lib.int8_linear.argtypes = [ctypes.POINTER(Int8LinearStruct), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


class NativeDecoder:
    """The C step bound to one int8 model's tensors; call it as model(idx, cache) would be for one token."""

    def __init__(self, model: GPT):
        self.lib = library()
        self.keep: list[torch.Tensor] = []  # every tensor the C structs point into stays alive with us
        config = model.config
        blocks = [_Block(self._ptr(b.ln_1.weight), self._ptr(b.ln_1.bias), self._linear(b.attn.c_attn),
                         self._linear(b.attn.c_proj), self._ptr(b.ln_2.weight), self._ptr(b.ln_2.bias),
                         self._linear(b.mlp.c_fc), self._linear(b.mlp.c_proj)) for b in model.transformer.h]
        self.blocks = (_Block * len(blocks))(*blocks)
        ln_f = model.transformer.ln_f
        self.model = _Model(config.n_layer, config.n_head, config.n_embd, config.mlp_dim, config.layer_norm_epsilon,
                            self._ptr(model.transformer.wpe.weight), self._ptr(ln_f.weight), self._ptr(ln_f.bias),
                            self._linear(model.lm_head), self.blocks)
        self.vocab_size = config.vocab_size
        self.cache_shape = (config.n_layer, 1, config.n_head, config.head_dim)  # KVCache's shape less max_len

    def _ptr(self, t: torch.Tensor) -> int:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise NativeUnavailable(f"the C decode step reads float32 CPU tensors, got {t.dtype} on {t.device}")
        t = t.detach().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _linear(self, layer: torch.nn.Module) -> Int8LinearStruct:
        if not isinstance(layer, Int8Linear):
            raise NativeUnavailable(f"the C decode step needs int8 Linears (quantize_int8), got {type(layer).__name__}")
        if layer.in_features % 64:
            raise NativeUnavailable(f"the C decode step needs widths that are multiples of 64, got {layer.in_features}")
        weight = layer.weight.contiguous()
        self.keep.append(weight)
        bias = 0 if layer.bias is None else self._ptr(layer.bias)
        return Int8LinearStruct(weight.data_ptr(), self._ptr(layer.scales.float()), bias, layer.out_features,
                                layer.in_features)

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (1, 1, vocab) of the one token idx (1, 1) after the cache, which it extends by that token."""
        token = int(idx)
        if not 0 <= token < self.vocab_size:  # C would read outside the embedding
            raise IndexError(f"token id {token} is outside the vocabulary of {self.vocab_size}")
        shape = cache.k.shape[:3] + cache.k.shape[4:]
        if shape != self.cache_shape or cache.k.dtype != torch.float32 or not cache.k.is_contiguous():
            raise ValueError(f"the C decode step takes this model's float32 cache for one sequence, got "
                             f"{tuple(cache.k.shape)} {cache.k.dtype}")
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {cache.length + 1} requested")
        logits = torch.empty(1, 1, self.vocab_size)
        status = self.lib.gpt2_int8_step(self.model, token, cache.length, cache.k.data_ptr(), cache.v.data_ptr(),
                                         cache.max_len, logits.data_ptr(), torch.get_num_threads())
        if status:
            raise MemoryError("the C decode step could not allocate its working memory")
        cache.length += 1
        return logits


def native_step(model: GPT) -> NativeDecoder:
    """The C decode step for this int8 CPU model (a speed.decoder.Step); NativeUnavailable says why not."""
    if not isinstance(model.transformer.wte, Int8Embedding) or model.transformer.wte.lm_head is not model.lm_head:
        raise NativeUnavailable("the C decode step needs an int8 model (quantize_int8) with its tied embedding")
    return NativeDecoder(model)
