"""Data for the chat app's analysis panels: per-token probabilities, top alternatives, attention heatmaps.

Probabilities are the raw model distribution (temperature 1, before top-k/top-p), as generate() reports them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import tiktoken
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..inspection import without_sink
from ..model import GPT
from ..speed.decoder import Decoder
from .replies import Reply

# Probability bands for colouring tokens, most likely first: (lower bound, label, colour).
BANDS = [(0.5, "p ≥ 0.5", "#4caf50"), (0.1, "0.1 ≤ p < 0.5", "#cddc39"),
         (0.01, "0.01 ≤ p < 0.1", "#ff9800"), (0.0, "p < 0.01", "#f44336")]
BAND_COLOURS = {label: colour for _, label, colour in BANDS}
MAX_QUERIES = 32  # heatmap rows: the most recent reply tokens
MAX_KEYS = 48  # heatmap columns: the most recent context tokens


def token_text(tokenizer: tiktoken.Encoding, token_id: int) -> str:
    """One token's text on its own (a byte of a split UTF-8 character shows as U+FFFD)."""
    return tokenizer.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


def axis_label(tokenizer: tiktoken.Encoding, token_id: int) -> str:
    return token_text(tokenizer, token_id).replace("\n", "\\n").replace(" ", "␣") or "∅"


def band(prob: float) -> str:
    return next(label for lower, label, _ in BANDS if prob >= lower)


def token_highlights(reply: Reply, tokenizer: tiktoken.Encoding) -> list[tuple[str, str]]:
    """(token text, probability band) for every generated token, for gr.HighlightedText."""
    return [(token_text(tokenizer, t), band(math.exp(lp))) for t, lp in zip(reply.token_ids, reply.logprobs)]


def alternatives(reply: Reply, tokenizer: tiktoken.Encoding, position: int) -> dict[str, float]:
    """The top alternatives at a 1-based position of the reply: {quoted token text: probability}."""
    if not 1 <= position <= len(reply.token_ids):
        raise ValueError(f"position {position} is outside the reply (1..{len(reply.token_ids)})")
    result: dict[str, float] = {}
    for token_id, logprob in reply.top[position - 1]:
        label = repr(token_text(tokenizer, token_id))
        result[label if label not in result else f"{label} (id {token_id})"] = math.exp(logprob)
    return result


def position_caption(reply: Reply, tokenizer: tiktoken.Encoding, position: int) -> str:
    chosen = reply.token_ids[position - 1]
    return (f"Token {position} of {len(reply.token_ids)}: chose {token_text(tokenizer, chosen)!r} with "
            f"p = {math.exp(reply.logprobs[position - 1]):.3f}. Top {len(reply.top[position - 1])} alternatives, "
            "raw model distribution (temperature 1, before top-k/top-p).")


@dataclass
class AttentionWindow:
    """Attention of the most recent reply tokens over the most recent context tokens."""
    probs: np.ndarray  # (n_layer, n_head, queries, keys)
    query_labels: list[str]  # the reply token each row chose
    key_labels: list[str]
    reply_tokens: int  # the reply's length: the rows are its last ones
    context_tokens: int  # every key the rows could see: the columns are the last ones
    hides_sink: bool = False  # the first token dropped, each row renormalised (see attention_window)

    @property
    def note(self) -> str:
        """Which part of the conversation the window shows."""
        queries, keys = self.probs.shape[-2:]
        shown = (f"the last {queries} of {self.reply_tokens} reply tokens" if queries < self.reply_tokens
                 else f"all {queries} reply tokens")
        context = (f"the last {keys} of {self.context_tokens} context tokens" if keys < self.context_tokens
                   else f"all {keys} context tokens")
        sink = " The first token is hidden and each row renormalised." if self.hides_sink else ""
        return f"Rows: {shown}. Columns: {context}.{sink}"

    def last(self, queries: int, keys: int) -> "AttentionWindow":
        """The most recent `queries` rows over the most recent `keys` keys."""
        q, k = min(queries, self.probs.shape[-2]), min(keys, self.probs.shape[-1])
        return replace(self, probs=self.probs[..., -q:, -k:], query_labels=self.query_labels[-q:],
                       key_labels=self.key_labels[-k:])

    def matrix(self, layer: int, head: int | None) -> np.ndarray:
        """(queries, keys) for one layer: one head, or the average over heads when head is None."""
        per_layer = self.probs[layer]
        return per_layer.mean(axis=0) if head is None else per_layer[head]

    def visible(self) -> np.ndarray:
        """(queries, keys) bool: True where the key is not in the query's future (the causal mask)."""
        queries, keys = self.probs.shape[-2:]
        return np.tri(queries, keys, k=keys - queries, dtype=bool)


@torch.inference_mode()
def attention_window(model: GPT | Decoder, tokenizer: tiktoken.Encoding, reply: Reply, max_queries: int = MAX_QUERIES,
                     max_keys: int = MAX_KEYS, hide_sink: bool = False) -> AttentionWindow:
    """Recompute, through the explicit attention path, the attention rows that chose the reply's tokens.

    Row i is the query at the position before reply token i: the same rows generate(return_attention=True)
    reports while streaming, computed once here, only when the panel asks for them. hide_sink drops
    the conversation's first token (where many heads park their attention) and renormalises each row.
    """
    n = len(reply.token_ids)
    if n == 0:
        raise ValueError("the reply has no tokens")
    sequence = reply.prompt_ids + reply.token_ids[:-1]  # every token that was read as a query or key
    length, queries = len(sequence), min(n, max_queries)
    ids = torch.tensor([sequence], device=model.device)
    cache = model.new_cache(length)
    if length > queries:  # the earlier tokens only need to be in the cache
        model(ids[:, :length - queries], cache, last_only=True)
    _, att = model.forward_with_attention(ids[:, length - queries:], cache, last_only=True)
    rows, key_ids = att[:, 0].float().cpu().numpy(), sequence  # (n_layer, nh, queries, length)
    hide_sink = hide_sink and length > 1
    if hide_sink:
        rows, key_ids = without_sink(rows), sequence[1:]
    window = AttentionWindow(rows, [axis_label(tokenizer, t) for t in reply.token_ids[n - queries:]],
                             [axis_label(tokenizer, t) for t in key_ids], n, len(key_ids), hide_sink)
    return window.last(queries, max_keys)


def heatmap(window: AttentionWindow, layer: int, head: int | None, selected_row: int | None = None) -> Figure:
    """Query x key heatmap with token labels, the selected token's row outlined; OO matplotlib (no
    pyplot state: safe across threads)."""
    matrix = window.matrix(layer, head)
    q, k = matrix.shape
    fig = Figure(figsize=(max(6.0, 0.2 * k + 2), max(3.5, 0.18 * q + 1.8)), layout="constrained")
    ax = fig.add_subplot()
    shown = np.ma.masked_array(matrix, mask=~window.visible())  # future keys stay blank
    image = ax.imshow(shown, cmap="magma", vmin=0.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(k), window.key_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(q), window.query_labels, fontsize=7)
    ax.set_xlabel("key token (what was looked at)")
    ax.set_ylabel("reply token (being chosen)")
    ax.set_title(f"Layer {layer + 1}, {'average over heads' if head is None else f'head {head + 1}'}", fontsize=10)
    if selected_row is not None and 0 <= selected_row < q:
        ax.add_patch(Rectangle((-0.5, selected_row - 0.5), k, 1, fill=False, edgecolor="#29b6f6", linewidth=1.5))
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="attention probability")
    return fig
