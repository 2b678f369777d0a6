"""GPT-2 in one file: embeddings, pre-LayerNorm blocks, causal self-attention, tied lm_head.

Parameter names mirror the Hugging Face checkpoint (`transformer.h.0.attn.c_attn.weight`, ...), so
loading real weights is a transpose list (see weights.py), not a rename table, and LoRA adapter keys
match PEFT's. Nothing here knows how the model is accelerated: minigpt/speed/ swaps modules (int8,
oneDNN) and picks the one-token decode step at load time, behind speed.decoder.Decoder.

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
from torch.utils.checkpoint import checkpoint

from .config import GPTConfig


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x (B, T, C), each (B, nh, T, hs)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, hs) -> the projected (B, T, C)."""
        B, _, T, _ = y.size()
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))

    def forward(self, x: torch.Tensor, cache: KVCache | list[KVCache] | None = None,
                return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self.heads(x)
        if isinstance(cache, list):  # GPT.decode_rows: one new token per row, each row with its own cache
            y = torch.cat([self.attend(q[i:i + 1], *c.update(self.layer_idx, k[i:i + 1], v[i:i + 1]))[0]
                           for i, c in enumerate(cache)])
            return self.output(y), None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs)
        y, att = self.attend(q, k, v, return_attn)
        return self.output(y), att

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(q k^T / sqrt(hs)) v for the T queries (B, nh, T, hs) that are the last T of the S keys;
        also the probabilities with return_attn."""
        T, S = q.size(2), k.size(2)
        att = None
        if return_attn or T == 1:
            # Explicit path: the only place the attention probabilities exist. It also serves one new
            # token: for a single query SDPA's CPU kernel is within a few microseconds of it in float32
            # and 2-7x slower in bfloat16 (torch 2.13, 2-core AVX-512 machine; see docs/speed.md).
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
            if T > 1:  # a single new token may see everything before it: no mask needed
                scores = scores.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
            y = probs @ v  # (B, nh, T, hs)
            if return_attn:
                att = probs
        elif T == S:  # plain prefill
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # several new tokens after a cached prefix: is_causal would align the mask wrongly
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device))
        return y, att


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool mask for T queries that are the last T of S positions: True where attending is allowed."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_dim)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"; exact erf GELU would drift from the reference
        self.c_proj = nn.Linear(config.mlp_dim, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | list[KVCache] | None = None,
                return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, att = self.attn(self.ln_1(x), cache, return_attn)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att


def empty_embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """An nn.Embedding whose weight is left as allocated (torch.empty), for weights that are read next."""
    return nn.Embedding.from_pretrained(torch.empty(num_embeddings, embedding_dim), freeze=False)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, initialise: bool = True):
        """initialise=False leaves the embeddings empty, for a model whose weights are read next: PyTorch's
        random normal_ on the meta device imports torch._dynamo, 2.3 s of every start that loads a checkpoint."""
        super().__init__()
        self.config = config
        embedding = nn.Embedding if initialise else empty_embedding
        self.transformer = nn.ModuleDict(dict(
            wte=embedding(config.vocab_size, config.n_embd),
            wpe=embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.grad_checkpoint = False  # training: keep only block inputs, recompute the rest in backward

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T); with a cache, idx continues the cached tokens.

        last_only computes logits for the final position only (B, 1, vocab): generation needs nothing
        else, and the vocab projection of a long prompt is the costliest matmul of a prefill.
        """
        logits, _ = self._run(idx, cache, last_only, return_attn=False)
        return logits

    def decode_rows(self, idx: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Logits (B, 1, vocab) for one new token per row of idx (B, 1), row i continuing caches[i]: B
        independent sequences, each at its own position (continuous batching). The Linears read their
        weights once for all rows; attention reads each row's own cache."""
        return self._run(idx, caches, last_only=False, return_attn=False)[0]

    def prefill_rows(self, prompts: list[list[int]], caches: list[KVCache]) -> torch.Tensor:
        """Read several prompts, each into its own empty cache, in one pass (continuous batching: requests
        that arrive together); logits (B, vocab) after each prompt. The prompts are right-padded to the
        longest: causal attention keeps the padding out of every real position, and each cache takes only
        its prompt's keys and values."""
        if any(c.length for c in caches):
            raise ValueError("prefill_rows reads prompts into empty caches")
        T, device = max(map(len, prompts)), self.device
        idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)
        together = KVCache(self.config, T, len(prompts), device, caches[0].k.dtype)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        logits, _ = self._run(idx, together, last_only=False, return_attn=False, last=last)
        for i, (prompt, cache) in enumerate(zip(prompts, caches)):
            n = len(prompt)
            cache.k[:, 0, :, :n], cache.v[:, 0, :, :n] = together.k[:, i, :, :n], together.v[:, i, :, :n]
            cache.length = n
        return logits[:, 0]

    def forward_with_attention(self, idx: torch.Tensor, cache: KVCache | None = None,
                               last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Like forward, through the explicit attention path; also returns the attention
        probabilities of every layer, stacked as (n_layer, B, nh, T, S)."""
        logits, atts = self._run(idx, cache, last_only, return_attn=True)
        return logits, torch.stack(atts)

    def _run(self, idx: torch.Tensor, cache: KVCache | list[KVCache] | None, last_only: bool, return_attn: bool,
             last: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The forward pass, after one cache for all rows or a list of one cache per row (decode_rows); logits
        for every position, the last (last_only), or row i's position last[i]."""
        B, T = idx.size()
        caches = cache if isinstance(cache, list) else [] if cache is None else [cache]
        for c in caches:
            if c.length + T > self.config.n_positions:
                raise ValueError(f"cannot attend to {c.length + T} tokens: the context window is "
                                 f"{self.config.n_positions}")
            if c.length + T > c.max_len:
                raise ValueError(f"KV cache holds {c.max_len} tokens; {c.length + T} requested")
        if T > self.config.n_positions:
            raise ValueError(f"cannot attend to {T} tokens: the context window is {self.config.n_positions}")
        starts = torch.tensor([c.length for c in caches] or [0], device=idx.device)[:, None]  # (1 or B, 1)
        pos = starts + torch.arange(T, device=idx.device)  # (1 or B, T): each row at its own position
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        atts = []
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:
                x, att = checkpoint(block, x, cache, return_attn, use_reentrant=False)
            else:
                x, att = block(x, cache, return_attn)
            atts.append(att)
        for c in caches:
            c.length += T
        x = self.transformer.ln_f(x)
        if last is not None:
            x = x[torch.arange(B, device=x.device), last][:, None]  # (B, 1, C): each row's own last token
        elif last_only:
            x = x[:, [-1], :]  # a list index keeps the time dimension
        return self.lm_head(x), atts

    def copy_sharing_weights(self) -> "GPT":
        """New modules around this model's tensors: nothing is copied, and replacing a module or a
        parameter of the copy (a LoRA merge, int8 quantization) leaves this model as it was."""
        memo = {id(t): t for t in itertools.chain(self.parameters(), self.buffers())}
        return copy.deepcopy(self, memo=memo)

    def new_cache(self, max_len: int | None = None, batch_size: int = 1) -> KVCache:
        """An empty cache on this model's device and dtype, sized for max_len tokens (default: the context)."""
        w = self.transformer.ln_f.weight  # never quantized: its dtype is the compute dtype
        return KVCache(self.config, max_len or self.config.n_positions, batch_size, w.device, w.dtype)
