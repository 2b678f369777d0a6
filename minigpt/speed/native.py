"""Decoding through decode_step.c: one C call per token instead of ~500 PyTorch ops, for int8, int4 and
float32 CPU models.

native_step(model) returns the step that decodes the model's single tokens in C (inference.py wraps
it in a Decoder). Batches of sequences and the attention panel's steps keep the PyTorch path; both
read and write the same KVCache. Build it on the final model: it holds pointers to the model's tensors
as they are now. step_rows decodes one token for each of many sequences in one call (continuous
batching): each weight matrix is read once for all the rows that use it, and each row's logits are
bit for bit those of its own step alone. read_tokens reads several tokens of each sequence in one call
(a prompt: one row per token), which int8 uses for prompts where AMX multiplies the rows, and int4 always.

The variant is picked from what the CPU reports (cpu_isas): avx512 or avx2 on x86-64, neon on
aarch64, the portable C loop (generic) on any other x86-64. MINIGPT_ISA=avx512|avx2|neon|generic
(or isa=...) asks for one; a variant the CPU lacks is refused, not run. The avx512 variant multiplies
batched int8 rows in AMX tiles where the CPU and the compiler have them (MINIGPT_NO_AMX=1 or use_amx
turns that off). Each variant is compiled once per machine with the system C compiler ($CC, default
cc; its loops run on a small pthread pool of its own) into a cache folder, $XDG_CACHE_HOME/minigpt/native (default ~/.cache/minigpt/native),
under a name keyed by the source, the compiler, its flags and the CPU's features, written atomically
(compiled to a temporary name, then renamed), so later starts only load it. Where it cannot be built (no compiler, an
architecture it has no variant for), NativeUnavailable says why in one line; the compiler's
output goes to a log file in the cache folder, whose path the message gives.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from ..model import GPT, KVCache
from .int4 import Int4Linear
from .quantize import Int8Embedding, Int8Linear

SOURCE = Path(__file__).with_name("decode_step.c")
FLAGS = ["-O3", "-fopenmp-simd", "-pthread", "-shared", "-fPIC"]
# Per variant: compiler flags. Explicit instruction sets rather than -march=native, so the avx2 and
# generic libraries built on an AVX-512 machine are the ones an AVX2-only or older CPU builds.
ISA_FLAGS = {
    "avx512": ["-DMINIGPT_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c"],
    "avx2": ["-DMINIGPT_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "neon": ["-DMINIGPT_NEON"],  # NEON is part of every aarch64 CPU
    "generic": [],
}
# The /proc/cpuinfo flags each x86 variant's flags above let the compiler use.
X86_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
             "avx2": {"avx2", "fma", "f16c"}}
X86 = ("x86_64", "amd64", "i686", "i386")
ARM64 = ("aarch64", "arm64")


class NativeUnavailable(RuntimeError):
    """The C decode step cannot serve this model or machine; the message says why."""


KIND_FLOAT32, KIND_INT8, KIND_INT4 = range(3)  # decode_step.c's Linear kinds


# The structs of decode_step.c, field for field.
class LinearStruct(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("kind", ctypes.c_int64)]


class _Block(ctypes.Structure):
    _fields_ = [("ln_1_weight", ctypes.c_void_p), ("ln_1_bias", ctypes.c_void_p),
                ("c_attn", LinearStruct), ("attn_proj", LinearStruct),
                ("ln_2_weight", ctypes.c_void_p), ("ln_2_bias", ctypes.c_void_p),
                ("c_fc", LinearStruct), ("mlp_proj", LinearStruct)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layer", ctypes.c_int64), ("n_head", ctypes.c_int64), ("n_embd", ctypes.c_int64),
                ("mlp_dim", ctypes.c_int64), ("eps", ctypes.c_float), ("wpe", ctypes.c_void_p),
                ("ln_f_weight", ctypes.c_void_p), ("ln_f_bias", ctypes.c_void_p), ("lm_head", LinearStruct),
                ("blocks", ctypes.POINTER(_Block))]


def cpu_features() -> set[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo), else as PyTorch's dispatch sees them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return {"AVX512": X86_NEEDS["avx512"], "AVX2": X86_NEEDS["avx2"]}.get(capability, set())


def cpu_isas() -> list[str]:
    """The variants this CPU can run, fastest first (empty on an architecture there is no variant for)."""
    machine = platform.machine().lower()
    if machine in X86:
        flags = cpu_features()
        return [isa for isa in ("avx512", "avx2") if X86_NEEDS[isa] <= flags] + ["generic"]
    if machine in ARM64:
        return ["neon", "generic"]
    return []


def choose_isa(isa: str | None = None) -> str:
    """isa, else $MINIGPT_ISA, else the fastest variant the CPU reports; NativeUnavailable if it cannot run here."""
    isa = isa or os.environ.get("MINIGPT_ISA") or None
    supported = cpu_isas()
    if isa is None:
        if not supported:
            raise NativeUnavailable(f"no C decode step for this CPU architecture ({platform.machine() or 'unknown'})")
        return supported[0]
    if isa not in ISA_FLAGS:
        raise NativeUnavailable(f"unknown instruction set {isa!r} (MINIGPT_ISA): choose from {', '.join(ISA_FLAGS)}")
    if isa != "generic" and isa not in supported:  # the portable loop runs anywhere it compiles
        raise NativeUnavailable(f"this CPU does not support the {isa} decode step (it supports: "
                                f"{', '.join(supported) or 'none'})")
    return isa


def cache_folder() -> Path:
    """Where built libraries are kept: $XDG_CACHE_HOME/minigpt/native, default ~/.cache/minigpt/native."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minigpt" / "native"


AMX_FLAGS = ["-mamx-tile", "-mamx-int8"]


@functools.cache
def compiler_accepts(compiler: str, *flags: str) -> bool:
    """Whether compiler builds AMX intrinsics with flags: gcc before 11 and clang before 12 do not, and then
    the avx512 variant is built without its AMX kernel rather than not at all."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe.c"
        probe.write_text("#include <immintrin.h>\nvoid probe(void) { _tile_release(); }\n")
        try:
            built = subprocess.run([compiler, *flags, "-c", str(probe), "-o", str(probe.with_suffix(".o"))],
                                   capture_output=True)
        except OSError:
            return False
    return built.returncode == 0


def build(isa: str, folder: Path | None = None) -> Path:
    """The shared library of this variant, compiled unless a build with the same key is in folder already."""
    compiler = os.environ.get("CC", "cc")
    flags = [*FLAGS, *ISA_FLAGS[isa]]
    if isa == "avx512" and "avx512_vnni" in cpu_features():
        flags.append("-mavx512vnni")  # vpdpwssd: the multiply and the add in one instruction
    libs = ["-lm"]
    if platform.machine().lower() in X86 and platform.libc_ver()[0] == "glibc":
        flags, libs = [*flags, "-DMINIGPT_LIBMVEC"], ["-lmvec", "-lm"]  # glibc's vectorized tanhf
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags, *libs, platform.machine(),
                                     *sorted(cpu_features())]).encode()).hexdigest()[:16]
    folder = folder or cache_folder()
    target = folder / f"decode_step-{isa}-{key}.so"
    if target.exists():
        return target
    # Batched int8 rows in AMX tiles, where Linux grants them. Decided here, not in the key: the compiler's
    # answer follows from its name and the CPU's features, which the key holds, and asking it (a compile)
    # took half a second of every start that loads the library.
    if isa == "avx512" and "amx_int8" in cpu_features() and compiler_accepts(compiler, *AMX_FLAGS):
        flags += AMX_FLAGS
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=target.stem + "-", suffix=".so.partial", dir=folder)
        os.close(fd)
    except OSError as e:
        raise NativeUnavailable(f"cannot write the C decode step's cache folder {folder}: {e.strerror}") from None
    log = target.with_suffix(".log")
    try:
        try:
            built = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial, *libs], capture_output=True, text=True)
        except OSError as e:
            raise NativeUnavailable(f"no C compiler to build {SOURCE.name}: {compiler!r}: {e.strerror}") from None
        if built.returncode:
            log.write_text(f"{' '.join([compiler, *flags, str(SOURCE), '-o', partial, *libs])}\n"
                           f"{built.stdout}{built.stderr}")
            raise NativeUnavailable(f"{compiler} could not build {SOURCE.name} for {isa} "
                                    f"(exit status {built.returncode}; compiler output in {log})")
        os.replace(partial, target)  # atomic: a concurrent start sees no library or a whole one
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def library(isa: str | None = None) -> ctypes.CDLL:
    """decode_step.c built for this CPU (or for isa) and loaded, once per process and variant."""
    return _load(choose_isa(isa))


def native_available(isa: str | None = None) -> bool:
    """Whether the C step builds and loads here (a failure is reported where the step is built)."""
    try:
        library(isa)
    except NativeUnavailable:
        return False
    return True


@functools.cache
def _load(isa: str) -> ctypes.CDLL:
    target = build(isa)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:  # a damaged file in the cache: build it again
        target.unlink(missing_ok=True)
        try:
            lib = ctypes.CDLL(str(build(isa)))
        except OSError as e:
            raise NativeUnavailable(f"cannot load the C decode step {target}: {e}") from None
    lib.minigpt_isa.restype = ctypes.c_char_p
    lib.gpt2_step.restype = ctypes.c_int
    lib.gpt2_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    # gpt2_step_rows(models, n, tokens, positions, k_caches, v_caches, max_lens, logits_from, logits, threads):
    # arrays of n; logits (n - logits_from, vocab) of the rows from logits_from on
    lib.gpt2_step_rows.restype = ctypes.c_int
    lib.gpt2_step_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 5, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_int]
    lib.linear.restype = None  # one matrix-vector product alone, for bench/matmul.py
    lib.linear.argtypes = [ctypes.POINTER(LinearStruct), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.minigpt_amx.restype, lib.minigpt_amx.argtypes = ctypes.c_int, [ctypes.c_int]
    # minigpt_top(x, n, k, ids, values), minigpt_log_probs(x, n, token, k, token_log_prob, ids, values): logits.py
    lib.minigpt_top.restype = ctypes.c_int
    lib.minigpt_top.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.minigpt_log_probs.restype = ctypes.c_int
    lib.minigpt_log_probs.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    use_amx(lib, not os.environ.get("MINIGPT_NO_AMX"))
    return lib


def use_amx(lib: ctypes.CDLL, wanted: bool = True) -> bool:
    """Whether lib's batched int8 steps use AMX from now on: wanted, built in (avx512 on a CPU with amx_int8)
    and granted by Linux. Logits are the same bit for bit either way; MINIGPT_NO_AMX=1 turns it off at load."""
    lib.amx = bool(lib.minigpt_amx(int(wanted)))
    return lib.amx


_FLOAT_SCALES: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(scales) -> (the scales, their float32 copy)


def float_scales(scales: torch.Tensor) -> torch.Tensor:
    """The float32 copy of an int8 Linear's row scales, one per scales tensor while it lives: the base and a
    LoRA-merged copy share their untouched Linears, and the C step reads a shared weight once for both
    models' rows only when they point at the same scales too."""
    entry = _FLOAT_SCALES.get(id(scales))
    if entry is None or entry[0]() is not scales:
        def forget(ref: weakref.ref, key: int = id(scales)) -> None:
            if _FLOAT_SCALES.get(key, (None,))[0] is ref:
                del _FLOAT_SCALES[key]
        entry = _FLOAT_SCALES[id(scales)] = (weakref.ref(scales, forget), scales.float().contiguous())
    return entry[1]


class NativeDecoder:
    """The C step bound to one int8, int4 or float32 model's tensors; call it as model(idx, cache) would be for one
    token."""

    def __init__(self, model: GPT, isa: str | None = None):
        self.lib = library(isa)
        self.isa = self.lib.minigpt_isa().decode()
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
        self.shape = (config.n_layer, config.n_head, config.n_embd, config.mlp_dim, config.vocab_size)
        self.n_positions = config.n_positions  # rows of wpe: a cache may not be longer
        self.int8 = isinstance(model.transformer.h[0].mlp.c_fc, Int8Linear)
        self.int4 = isinstance(model.transformer.h[0].mlp.c_fc, Int4Linear)
        self.torch_amx = "amx_bf16" in cpu_features()  # PyTorch's bfloat16 matrix products run in AMX tiles

    @property
    def reads_prompts(self) -> bool:
        """Whether a prompt is read faster here, one row per token (read_tokens), than by PyTorch. int4: PyTorch
        dequantizes every Linear for each pass (GPT-2 124M shape, 2 threads: a 32-token prompt 330 ms in
        PyTorch, 32 ms here). int8: PyTorch multiplies in bfloat16, fast only in AMX tiles; so here unless the
        CPU has AMX for PyTorch's bfloat16 and this step does not use AMX for its rows (a 32-token prompt,
        AVX-512 without AMX, 2 threads: 124M shape 130 ms in PyTorch, 25 ms here; gpt2-xl's 2.2 s and 0.31 s;
        docs/speed-cpu.md)."""
        return self.int4 or (self.int8 and (self.lib.amx or not self.torch_amx))

    def _ptr(self, t: torch.Tensor) -> int:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise NativeUnavailable(f"the C decode step reads float32 CPU tensors, got {t.dtype} on {t.device}")
        t = t.detach().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _linear(self, layer: torch.nn.Module) -> LinearStruct:
        """An int8 Linear (its weights and row scales), an int4 one (packed codes and float16 group scales), or
        a plain float32 nn.Linear (scale NULL): a subclass may compute more than its weight says (a LoRA
        layer's update), so it is refused."""
        if layer.in_features % 64:
            raise NativeUnavailable(f"the C decode step needs widths that are multiples of 64, got {layer.in_features}")
        if isinstance(layer, Int8Linear):
            weight, scale, kind = self._keep(layer.weight), self._ptr(float_scales(layer.scales)), KIND_INT8
        elif isinstance(layer, Int4Linear):  # float16 scales as stored: a float32 copy would add a bit per weight
            weight, scale, kind = self._keep(layer.weight), self._keep(layer.scales), KIND_INT4
        elif type(layer) is torch.nn.Linear:
            if not layer.weight.is_contiguous():  # a copy in (out, in) order would double the model's memory
                raise NativeUnavailable("the C decode step reads float32 weights in (out, in) memory order")
            weight, scale, kind = self._ptr(layer.weight), 0, KIND_FLOAT32
        else:
            raise NativeUnavailable(f"the C decode step needs int8 or int4 (quantize_int8, quantize_int4) or plain "
                                    f"float32 Linears, got {type(layer).__name__}")
        bias = 0 if layer.bias is None else self._ptr(layer.bias)
        return LinearStruct(weight, scale, bias, layer.out_features, layer.in_features, kind)

    def _keep(self, t: torch.Tensor) -> int:
        """The address of a quantized tensor as stored (contiguous), kept alive with the step."""
        t = t.contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (1, 1, vocab) of the one token idx (1, 1) after the cache, which it extends by that token."""
        return step_rows([self], [int(idx)], [cache]).view(1, 1, self.vocab_size)


def step_rows(steps: Sequence[NativeDecoder], tokens: Sequence[int], caches: Sequence[KVCache]) -> torch.Tensor:
    """One decode step of several sequences in one C call: row r feeds tokens[r] to steps[r]'s model after
    caches[r] (that model's float32 cache for one sequence), which it extends by that token. Returns the float32
    logits (rows, vocab), row r bit for bit what steps[r] alone gives for that token and cache.

    The rows' models may differ if they have one shape (a base model and its LoRA-tuned copy): a weight
    matrix they share is read once for all their rows. Everything is checked before C runs, so a bad row
    leaves every cache as it was."""
    return read_tokens(steps, [[token] for token in tokens], caches)


def read_tokens(steps: Sequence[NativeDecoder], token_lists: Sequence[Sequence[int]],
                caches: Sequence[KVCache]) -> torch.Tensor:
    """step_rows with several tokens per sequence: sequence r reads token_lists[r] after caches[r] (a prompt, or
    its next chunk) in the same C call, one row per token, and the logits (sequences, vocab) are those after
    each sequence's last token. Every token is computed exactly as when decoded one at a time."""
    n = len(steps)
    if not n or len(token_lists) != n or len(caches) != n or not all(token_lists):
        raise ValueError(f"the C step takes tokens and one cache per step, at least one row; got {n} steps, "
                         f"{len(token_lists)} token lists ({sum(map(len, token_lists))} tokens), {len(caches)} caches")
    first = steps[0]
    if any(step.lib is not first.lib for step in steps):
        raise ValueError(f"one C call decodes with one library: the rows' steps are "
                         f"{', '.join(sorted({step.isa for step in steps}))} builds")
    if any(step.shape != first.shape for step in steps):
        raise ValueError("the rows' models differ in shape (n_layer, n_head, n_embd, mlp_dim, vocab): "
                         f"{', '.join(str(shape) for shape in sorted({step.shape for step in steps}))}")
    if len({id(cache) for cache in caches}) != n:
        raise ValueError("each row needs its own cache: a cache appears in more than one row")
    token_lists = [[int(token) for token in tokens] for tokens in token_lists]

    def where(r: int) -> str:
        return f" (row {r})" if n > 1 else ""

    for r, (step, tokens, cache) in enumerate(zip(steps, token_lists, caches)):
        outside = [token for token in tokens if not 0 <= token < step.vocab_size]
        if outside:  # C would read outside the embedding
            raise IndexError(f"token id {outside[0]} is outside the vocabulary of {step.vocab_size}{where(r)}")
        shape = cache.k.shape[:3] + cache.k.shape[4:]
        if shape != step.cache_shape or cache.v.shape != cache.k.shape or cache.max_len > step.n_positions or any(
                t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
                for t in (cache.k, cache.v)):
            raise ValueError(f"the C decode step takes this model's float32 cache for one sequence, got "
                             f"{tuple(cache.k.shape)} {cache.k.dtype}{where(r)}")
        if cache.length + len(tokens) > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {cache.length + len(tokens)} requested"
                             f"{where(r)}")
    # One C row per token: every sequence's earlier tokens first, then each one's last, whose logits are wanted
    # (rows are independent but for the cache: in each layer all rows write before any attends).
    rows = [(r, i) for r, tokens in enumerate(token_lists) for i in range(len(tokens) - 1)]
    rows += [(r, len(tokens) - 1) for r, tokens in enumerate(token_lists)]
    total, pointers, int64s = len(rows), ctypes.c_void_p * len(rows), ctypes.c_int64 * len(rows)
    logits = torch.empty(n, first.vocab_size)
    status = first.lib.gpt2_step_rows(
        pointers(*(ctypes.addressof(steps[r].model) for r, _ in rows)), total,
        int64s(*(token_lists[r][i] for r, i in rows)), int64s(*(caches[r].length + i for r, i in rows)),
        pointers(*(caches[r].k.data_ptr() for r, _ in rows)), pointers(*(caches[r].v.data_ptr() for r, _ in rows)),
        int64s(*(caches[r].max_len for r, _ in rows)), total - n, logits.data_ptr(), torch.get_num_threads())
    if status == -2:  # checked above; C refuses too rather than read past a smaller model's tensors
        raise ValueError("the rows' models differ in shape")
    if status:
        raise MemoryError("the C decode step could not allocate its working memory")
    for tokens, cache in zip(token_lists, caches):
        cache.length += len(tokens)
    return logits


def native_step(model: GPT, isa: str | None = None) -> NativeDecoder:
    """The C decode step for this int8, int4 or float32 CPU model (a speed.decoder.Step), in the variant for this
    CPU (or isa); NativeUnavailable says why not."""
    wte = model.transformer.wte
    tied = wte.lm_head is model.lm_head if isinstance(wte, Int8Embedding) else wte.weight is model.lm_head.weight
    if not tied:
        raise NativeUnavailable("the C decode step needs GPT-2's tied token embedding and lm_head")
    return NativeDecoder(model, isa)
