"""The Score tab's handler: a pasted text's per-token surprisal and perplexity under base and tuned.

The windows are the CLI's defaults (python -m minigpt.perplexity): max-length = the model's context,
stride 512 or the context if shorter, so the tab and the command give the same numbers.
"""
from __future__ import annotations

import gradio as gr

from ..scoring import DEFAULT_STRIDE, Perplexity, ScoringError, score_ids
from .conversation import BASE, TUNED, ChatInputError
from .engine import Engine
from .panels import token_text

MAX_SCORE_TOKENS = 8192  # a pasted text's limit: scoring costs a forward pass per window on the shared server
SURPRISAL_SCALE = 10.0  # nats of surprisal at which a token's colour saturates


class ScoreHandlers:
    def __init__(self, engine: Engine):
        self.engine = engine

    def score(self, text: str, scale):
        """{"score_summary", "score_base", "score_tuned"}: the perplexities, and each model's tokens coloured."""
        ids = self.engine.tokenizer.encode_ordinary(text or "")
        if len(ids) > MAX_SCORE_TOKENS:
            raise gr.Error(f"The text is {len(ids)} tokens long; the Score tab takes up to {MAX_SCORE_TOKENS} "
                           "(python -m minigpt.perplexity takes any length).", print_exception=False)
        max_length = self.engine.n_positions
        stride = min(DEFAULT_STRIDE, max_length)
        try:
            results = {mode: self.engine.compute(score_ids, self.engine.model(mode, scale), ids, max_length, stride)
                       for mode in (BASE, TUNED) if mode in self.engine.models}
        except (ScoringError, ChatInputError) as e:
            raise gr.Error(f"{str(e)[0].upper()}{str(e)[1:].rstrip('.')}.", print_exception=False) from None
        base = results[BASE]
        lines = [f"**{base.tokens} tokens scored** (windows of {max_length}, stride {stride}).",
                 f"- {BASE}: perplexity **{base.perplexity:.2f}**, mean NLL {base.mean_nll:.4f} nats"]
        if TUNED in results:
            tuned = results[TUNED]
            lines += [(f"- {TUNED} (scale {float(scale):g}): perplexity **{tuned.perplexity:.2f}**, "
                       f"mean NLL {tuned.mean_nll:.4f} nats"),
                      (f"- tuned − base: perplexity {tuned.perplexity - base.perplexity:+.2f}, "
                       f"mean NLL {tuned.mean_nll - base.mean_nll:+.4f} nats")]
        else:
            lines.append(f"- {TUNED}: off ({self.engine.adapter_hint})")
        return {"score_summary": "\n".join(lines), "score_base": self.highlights(base),
                "score_tuned": self.highlights(results.get(TUNED))}

    def highlights(self, result: Perplexity | None) -> list[tuple[str, float | None]]:
        """Each token coloured by its surprisal (−log p): white when expected, red when surprising."""
        if result is None:
            return []
        return [(token_text(self.engine.tokenizer, t), None if nll is None else min(nll / SURPRISAL_SCALE, 1.0))
                for t, nll in zip(result.token_ids, result.nll)]
