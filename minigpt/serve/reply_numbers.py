"""Every number the "look inside" views draw, computed once per reply in one pass over it, and sent to the
browser once: the page's own script (inspect.js) draws the charts from them, so selecting a token, a view,
a layer or a head, or hiding the attention sink, redraws in the browser with no request to the server.

One pass over the prompt and the reply through the explicit attention path gives, at each position
that chose a reply token: the residual stream after every layer (read out through the final LayerNorm
and lm_head: the logit lens; the last read-out is the model's own logits, which the sampler's stages
filter), and every head's attention row. Arrays travel compactly: top-k per row, float16 or uint16,
base64 (see `packed`); token ids go once each into a table of their texts.
"""
from __future__ import annotations

import base64
import json
import math

import numpy as np
import tiktoken
import torch

from ..generation import new_history
from ..inspection import as_gpt, attention_entropy, head_similarity, without_sink
from ..model import GPT
from ..sampling import filter_stages
from ..speed.decoder import Decoder
from .panels import BANDS, band, token_durations, token_text
from .replies import Reply

SHOWN_TOKENS = 10  # bars per sampling stage: the raw distribution's most likely tokens, and the drawn one
LENS_TOP = 5  # each layer's top tokens per position, in the logit lens's hover
TOP_KEYS = 16  # keys sent per attention row (the row's largest); the rest of the row's mass is sent as one number
# Rows of a read-out's logits reduced at a time: 16 x 50,257 floats (3.2 MB) stay in the cores' caches through
# the four reductions (read_out), where the whole (128, 50,257) would come from memory for each of them.
ROWS_IN_CACHE = 16


def packed(array: np.ndarray, dtype: str) -> dict:
    """An array for the browser: {"dtype", "shape", "b64"} of its little-endian bytes (inspect.js unpacks it)."""
    data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(array.shape), "b64": base64.b64encode(data.tobytes()).decode("ascii")}


@torch.inference_mode()
def reply_numbers(model: GPT | Decoder, tokenizer: tiktoken.Encoding, reply: Reply, top_keys: int = TOP_KEYS) -> dict:
    """The views' numbers for a finished reply, as one JSON-ready dict (see docs/inspect.md for its fields)."""
    gpt = as_gpt(model)
    n, p = len(reply.token_ids), len(reply.prompt_ids)
    if n == 0:
        raise ValueError("the reply has no tokens")
    sequence = reply.prompt_ids + reply.token_ids[:-1]  # the last token is only a target
    rows = slice(p - 1, p - 1 + n)  # the positions that chose the reply's tokens
    idx = torch.tensor([sequence], device=gpt.device)
    x = gpt.transformer.wte(idx) + gpt.transformer.wpe(torch.arange(len(sequence), device=gpt.device))
    streams, atts = [x[0, rows]], []
    for block in gpt.transformer.h:
        x, att = block(x, None, True)
        streams.append(x[0, rows])
        atts.append(att[0, :, rows].float())  # (nh, n, keys)
    targets = torch.tensor(reply.token_ids, device=gpt.device)[:, None]
    lens = []
    for stream in streams:
        logits = gpt.lm_head(gpt.transformer.ln_f(stream)).float()  # (n, vocab); the last is the model's own
        blocks = [read_out(rows, ids) for rows, ids in zip(logits.split(ROWS_IN_CACHE), targets.split(ROWS_IN_CACHE))]
        lens.append([torch.cat(column) for column in zip(*blocks)])  # top ids, top p, target p, target rank
    lens_ids, lens_p, target_p, target_rank = zip(*lens)
    attention = torch.stack(atts).cpu().numpy()  # (n_layer, nh, n, keys)
    vocab: set[int] = set(sequence) | set(reply.token_ids) | {t for top in reply.top for t, _ in top}
    sampling = sampling_numbers(logits.cpu(), reply, vocab, tokenizer)
    lens_ids_np = torch.stack(lens_ids).cpu().numpy()
    vocab |= set(lens_ids_np.ravel().tolist())
    return {
        "model": reply.request.describe(),
        "tokens": reply.token_ids, "prompt": reply.prompt_ids,
        "p": [math.exp(lp) for lp in reply.logprobs],
        "band": [band(math.exp(lp)) for lp in reply.logprobs],
        "bands": [[label, colour] for _, label, colour in BANDS],
        "top": [[[t, math.exp(lp)] for t, lp in top] for top in reply.top],
        "sampling": sampling,
        "lens": {"layers": ["embeddings", *(f"layer {i}" for i in range(1, len(streams) - 1)), "output"],
                 "top_ids": packed(lens_ids_np, "uint16"),
                 "top_p": packed(torch.stack(lens_p).cpu().numpy(), "float16"),
                 "target_p": packed(torch.stack(target_p).cpu().numpy(), "float16"),
                 "target_rank": packed(np.minimum(torch.stack(target_rank).cpu().numpy(), 65535), "uint16")},
        "attention": attention_numbers(attention, top_keys),
        "timeline_ms": token_durations(reply).round(3).tolist() if reply.token_times else [],
        "vocab": {str(t): token_text(tokenizer, t) for t in sorted(vocab)},
    }


def read_out(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """From one layer's logits (rows, vocab): its top tokens and their p, and the p and rank of the token that
    came next (targets (rows, 1)). No (rows, vocab) log-softmax: only a few tokens' p are read."""
    total = logits.logsumexp(-1, keepdim=True)
    top = logits.topk(LENS_TOP, dim=-1)
    target = logits.gather(1, targets)
    rank = 1 + (logits > target).sum(-1, dtype=torch.int32)  # an int64 sum of bools is ~5x slower
    return top.indices, (top.values - total).exp(), (target - total)[:, 0].exp(), rank


def sampling_numbers(logits: torch.Tensor, reply: Reply, vocab: set[int], tokenizer: tiktoken.Encoding) -> dict:
    """The sampler's own stages (sampling.filter_stages) at every position, whatever stages it has: for
    each, the tokens left and the probabilities of the tokens shown (the raw top SHOWN_TOKENS and the drawn one);
    the last stage is the renormalised distribution the token was drawn from. Stages that read the sequence
    (the JSON grammar, penalties) see it as the sampler did: the reply's history replayed to each position."""
    params = reply.request.params
    stages = stages_at_every_position(logits, reply, tokenizer)
    drawn = torch.tensor(reply.token_ids)
    shown = logits.topk(SHOWN_TOKENS, dim=-1).indices
    missing = (shown != drawn[:, None]).all(-1)
    shown[missing, -1] = drawn[missing]  # the drawn token is always among the bars
    vocab |= set(shown.ravel().tolist())
    names = [name for name, _ in stages]
    # Only the shown tokens' probabilities are kept, each stage's gathered from its softmax. The stages up to
    # temperature reshape the distribution (shown as it is after each); the cuts after it act on the
    # temperature's distribution (a cut token's probability is 0, the others keep theirs).
    warped = names.index("temperature") if "temperature" in names else len(stages) - 1
    scaled = stages[warped][1].softmax(-1).gather(1, shown)
    probs = [stage.softmax(-1).gather(1, shown) if i <= warped
             else scaled.masked_fill(~torch.isfinite(stage.gather(1, shown)), 0.0)
             for i, (_, stage) in enumerate(stages)]
    # A stage's logits are finite or -inf (a cut token): counting those above -inf is isfinite's count, 5x sooner
    left = [(stage > float("-inf")).sum(-1, dtype=torch.int32) for _, stage in stages]
    if params.greedy:
        names.append("greedy: the argmax")
        probs.append((shown == stages[-1][1].argmax(-1, keepdim=True)).float())
        left.append(torch.ones(len(drawn), dtype=torch.int32))
    else:
        names.append("renormalised")
        probs.append(stages[-1][1].softmax(-1).gather(1, shown))
        left.append(left[-1])
    shown_p = torch.stack(probs, dim=1)  # (n, stages, shown)
    settings = {"temperature": params.temperature, "top-k": params.top_k, "top-p": params.top_p,
                "min-p": params.min_p, "repetition penalty": params.repetition_penalty,
                "presence penalty": params.presence_penalty, "frequency penalty": params.frequency_penalty}
    return {"stages": names, "settings": {name: settings.get(name) for name in names},
            "left": torch.stack(left, dim=1).tolist(), "shown": shown.tolist(),
            "shown_p": packed(shown_p.numpy(), "float32")}


def stages_at_every_position(logits: torch.Tensor, reply: Reply,
                             tokenizer: tiktoken.Encoding) -> list[tuple[str, torch.Tensor]]:
    """filter_stages over the reply's positions (n, vocab): at once, or, when a stage reads the sequence,
    position by position with its history (a stage that does nothing yet, e.g. a penalty before any token
    was generated, is kept as an unchanged copy so that every position has the same stages)."""
    params = reply.request.params
    history = new_history(params, tokenizer, reply.prompt_ids)
    if history is None:
        return filter_stages(logits, params)
    rows = []
    for row, token in zip(logits, reply.token_ids):
        rows.append(dict(filter_stages(row, params, history)))
        history.add(token)
    names = max((list(r) for r in rows), key=len)  # the stages of a position where every stage acts
    filled = []
    for r in rows:
        previous = r["raw"]
        for name in names:
            previous = r.get(name, previous)
            r[name] = previous
        filled.append(r)
    return [(name, torch.stack([r[name] for r in filled])) for name in names]


def attention_numbers(attention: np.ndarray, top_keys: int) -> dict:
    """Each head's attention rows (n_layer, nh, n, keys), and their average as one more head: the top_keys
    largest keys of each row (ids uint16, probabilities float16), the first key's probability (the sink,
    so the browser can hide it and renormalise), and per layer x head the entropy and the head similarity,
    with and without the sink."""
    n_layer, n_head, n, keys = attention.shape
    heads = np.concatenate([attention, attention.mean(axis=1, keepdims=True)], axis=1)
    k = min(top_keys, keys)
    values, order = (t.numpy() for t in torch.from_numpy(heads).topk(k, dim=-1))  # no full sort of every row
    sinkless = without_sink(attention) if keys > 1 else attention
    return {"heads": n_head, "keys": keys, "top_keys": k,
            "key_ids": packed(order, "uint16"), "key_p": packed(values, "float16"),
            "sink": packed(heads[..., 0], "float16"),
            "entropy": attention_entropy(attention).mean(-1).round(4).tolist(),
            "entropy_sinkless": attention_entropy(sinkless).mean(-1).round(4).tolist(),
            "similarity": [head_similarity(layer).round(4).tolist() for layer in attention],
            "similarity_sinkless": [head_similarity(layer).round(4).tolist() for layer in sinkless]}


def as_json(numbers: dict) -> str:
    return json.dumps(numbers, separators=(",", ":"), ensure_ascii=False)
