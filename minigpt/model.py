"""GPT-2 in one file: embeddings, pre-LayerNorm blocks, causal self-attention, tied lm_head.

Parameter names mirror the Hugging Face checkpoint (`transformer.h.0.attn.c_attn.weight`, ...), so
loading real weights is a transpose list (see weights.py), not a rename table, and LoRA adapter keys
match PEFT's.

Notation: B batch, T new tokens in this call, S keys attended to (cached + new), C n_embd,
nh heads, hs head size.
"""
from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig

# PyTorch's bundled oneDNN multiplies float32 activations by a weight matrix about twice as fast as
# the BLAS (MKL) that F.linear calls for float32 on CPU, on the AMD machine we measured; see linear().
ONEDNN = torch.backends.mkldnn.is_available()

# Cache sizes a compiled decode step is built for: multiples of this (GPT-2: 4 graphs at most).
# Larger buckets mean fewer compilations but more masked-out slots read per step.
CACHE_BUCKET = 256


class KVCache:
    """Keys and values of every layer, preallocated once for one generation and written in place.

    A cache belongs to one caller (one request, one chat session); the model itself holds no
    per-request state, so many threads can share one model.
    """

    def __init__(self, config: GPTConfig, max_len: int, batch_size: int = 1,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if max_len > config.n_positions:
            raise ValueError(f"cache of {max_len} tokens exceeds the context window of {config.n_positions}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens stored so far; the next token goes to position `length`

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's (B, nh, T, hs) keys/values after the cached ones; return all of them."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def rewind(self, length: int) -> None:
        """Forget every token from position `length` on; later tokens overwrite their slots.
        Speculative decoding drops the draft tokens the model did not accept this way."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} tokens to {length}")
        self.length = length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one token's keys/values of every layer, (n_layer, B, nh, 1, hs), as GPT.step returns them."""
        self.k[:, :, :, self.length:self.length + 1] = k
        self.v[:, :, :, self.length:self.length + 1] = v
        self.length += 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for float32 inference on CPU: one weight read serves one to a few
    rows at 34-47 GB/s there, against 20-29 GB/s through F.linear (bench/matmul.py). Gradients still
    go through F.linear, as do other dtypes and devices (their F.linear is already oneDNN or cuBLAS),
    and torch.compile'd code (inductor lowers this op only for weights frozen into the graph)."""
    if (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) that multiplies through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v projection
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x (B, T, C), each (B, nh, T, hs)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, hs) -> the projected (B, T, C)."""
        B, _, T, _ = y.size()
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = x.size(1)
        q, k, v = self.heads(x)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs)
        S = k.size(2)

        att = None
        if return_attn or T == 1:
            # Explicit path: the only place the attention probabilities exist. It also serves one new
            # token: for a single query SDPA's CPU kernel is within a few microseconds of it in float32
            # and 2-7x slower in bfloat16 (torch 2.13, 2-core AVX-512 machine; see README, speed).
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
            if T > 1:  # a single new token may see everything before it: no mask needed
                scores = scores.masked_fill(~causal_mask(T, S, x.device), float("-inf"))
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
            y = probs @ v  # (B, nh, T, hs)
            if return_attn:
                att = probs
        elif T == S:  # plain prefill
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # several new tokens after a cached prefix: is_causal would align the mask wrongly
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, x.device))
        return self.output(y), att

    def step(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new token x (B, 1, C) against a whole cache buffer (B, nh, M, hs) of which `visible` (M + 1,)
        marks the filled slots plus the new token (last). Returns the output and the token's k and v;
        the cache is only read, so the shapes, not the position, define the computation."""
        q, k, v = self.heads(x)
        scores = torch.cat([q @ k_cache.transpose(-2, -1), q @ k.transpose(-2, -1)], dim=-1)
        scores = (scores * (1.0 / math.sqrt(k.size(-1)))).masked_fill(~visible, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)  # (B, nh, 1, M + 1)
        y = probs[..., :-1] @ v_cache + probs[..., -1:] * v
        return self.output(y), k, v


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool mask for T queries that are the last T of S positions: True where attending is allowed."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_dim)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"; exact erf GELU would drift from the reference
        self.c_proj = Linear(config.mlp_dim, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, att = self.attn(self.ln_1(x), cache, return_attn)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att

    def step(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attn.step(self.ln_1(x), k_cache, v_cache, visible)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, k, v


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.compiled_step = None  # set by compile_decode()
        self.native_step = None  # set by native.use_native_decode()

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T); with a cache, idx continues the cached tokens.

        last_only computes logits for the final position only (B, 1, vocab): generation needs nothing
        else, and the vocab projection of a long prompt is the costliest matmul of a prefill.
        One new token after a cache goes through the C step after native.use_native_decode() (one
        sequence), or through the compiled step after compile_decode().
        """
        if cache is not None and idx.size(1) == 1:
            if self.native_step is not None and idx.size(0) == 1:
                return self.native_step(idx, cache)
            if self.compiled_step is not None:
                return self._compiled_decode(idx, cache)
        logits, _ = self._run(idx, cache, last_only, return_attn=False)
        return logits

    def forward_with_attention(self, idx: torch.Tensor, cache: KVCache | None = None,
                               last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Like forward, through the explicit attention path; also returns the attention
        probabilities of every layer, stacked as (n_layer, B, nh, T, S)."""
        logits, atts = self._run(idx, cache, last_only, return_attn=True)
        return logits, torch.stack(atts)

    def _run(self, idx: torch.Tensor, cache: KVCache | None, last_only: bool,
             return_attn: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_positions:
            raise ValueError(f"cannot attend to {start + T} tokens: the context window is {self.config.n_positions}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {start + T} requested")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        atts = []
        for block in self.transformer.h:
            x, att = block(x, cache, return_attn)
            atts.append(att)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, [-1], :]  # a list index keeps the time dimension
        return self.lm_head(x), atts

    def step(self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per sequence, idx (B, 1), at position pos (a (1,) tensor) after the tokens in a
        KVCache's k/v buffers, which are read whole and never written. Returns logits (B, vocab) and
        the token's keys and values (n_layer, B, nh, 1, hs) for KVCache.append. With no Python int
        and no shape depending on the position, one compiled graph serves every step."""
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, 1, C)
        slots = torch.arange(k_cache.size(3) + 1, device=idx.device)
        visible = (slots < pos) | (slots == k_cache.size(3))  # the filled slots, and the new token itself
        ks, vs = [], []
        for i, block in enumerate(self.transformer.h):
            x, k, v = block.step(x, k_cache[i], v_cache[i], visible)
            ks.append(k)
            vs.append(v)
        return self.lm_head(self.transformer.ln_f(x))[:, -1], torch.stack(ks), torch.stack(vs)

    def compile_decode(self) -> None:
        """Decode one token at a time through torch.compile(step) from now on. The first step of each cache
        size compiles a graph (seconds to a minute); new_cache rounds sizes up to a few buckets."""
        self.compiled_step = torch.compile(self.step, dynamic=False, fullgraph=True)

    def _compiled_decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {cache.length + 1} requested")
        pos = torch.tensor([cache.length], device=idx.device)
        logits, k, v = self.compiled_step(idx, pos, cache.k, cache.v)
        cache.append(k, v)
        return logits[:, None]  # (B, 1, vocab)

    def copy_sharing_weights(self) -> "GPT":
        """New modules around this model's tensors: nothing is copied, and replacing a module or a
        parameter of the copy (a LoRA merge, int8 quantization) leaves this model as it was.
        The copy decodes through PyTorch: a C step (native.py) points at this model's modules."""
        memo = {id(t): t for t in itertools.chain(self.parameters(), self.buffers())}
        memo[id(self.native_step)] = None
        twin = copy.deepcopy(self, memo=memo)
        if self.compiled_step is not None:  # the copied step is bound to self: it would run self's weights
            twin.compile_decode()
        return twin

    def new_cache(self, max_len: int | None = None, batch_size: int = 1) -> KVCache:
        """An empty cache on this model's device and dtype, sized for max_len tokens (default: the context).

        With a compiled step the size is rounded up to a multiple of CACHE_BUCKET: each size is a graph.
        """
        max_len = max_len or self.config.n_positions
        if self.compiled_step is not None:
            max_len = min(-(-max_len // CACHE_BUCKET) * CACHE_BUCKET, self.config.n_positions)
        w = self.transformer.ln_f.weight  # never quantized: its dtype is the compute dtype
        return KVCache(self.config, max_len, batch_size, w.device, w.dtype)
