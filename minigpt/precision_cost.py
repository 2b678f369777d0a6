"""What the served precision costs against float32, measured on the loaded model at start-up (the app's
Model card and its start-up log): the bytes of weights it reads for each token, and how far its next-token
distributions move from float32's over a built-in text (KL divergence and top-1 agreement, as
`python -m minigpt.perplexity --kl-base float32` measures them on a text of your own).
"""
from __future__ import annotations

from dataclasses import dataclass

import tiktoken

from .model import GPT
from .scoring import Divergence, divergence, log_probs
from .speed.decoder import Decoder
from .weights import load_pretrained

# A plain English paragraph (about 130 GPT-2 tokens): the positions the divergence is averaged over.
PROBE_TEXT = ("The village sat at the edge of a wide valley, where the river slowed and spread into marshes full "
              "of reeds and birds. Every spring the farmers waited for the water to fall before they planted "
              "barley and beans, and every autumn they carried the harvest up the hill to the old mill. The "
              "miller kept a book of each year's weather, the price of flour and the names of the children born "
              "in the village, and when he grew too old to climb the stairs, his granddaughter read it aloud to "
              "him by the fire.")


@dataclass(frozen=True)
class PrecisionCost:
    precision: str
    weight_bytes: int  # what one token's decode step reads (shared tensors once)
    float32_bytes: int
    divergence: Divergence | None  # against float32 over PROBE_TEXT; None for float32 itself

    def describe(self) -> str:
        size = f"weights {self.weight_bytes / 1e6:,.0f} MB"
        if self.divergence is None:
            return f"{self.precision} · {size} · the reference precision"
        d = self.divergence
        # Below 1e-6 nats the float32 log-probabilities' own rounding (each row sums to 1 only within it) is
        # as large as the divergence, which can then come out slightly negative.
        kl = f"{d.mean_kl:.3g} nats" if d.mean_kl >= 1e-6 else "below 1e-6 nats"
        return (f"{self.precision} · {size} (float32: {self.float32_bytes / 1e6:,.0f} MB) · against float32, "
                f"over the {len(d.kl)} positions of a built-in text: KL divergence {kl} per token, "
                f"the same top token at {100 * d.top1_agreement:.1f}% of them")


def weight_bytes(model: GPT) -> int:
    """The bytes of the model's weights, each tensor once (the tied lm_head and wte are one)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure_cost(model: str, served: Decoder, tokenizer: tiktoken.Encoding) -> PrecisionCost:
    """The served decoder's cost against float32: a float32 copy of `model` (the checkpoint it was loaded
    from) is read again for the comparison and freed at once."""
    ids = tokenizer.encode_ordinary(PROBE_TEXT)
    served_bytes = weight_bytes(served.model)
    if served.precision == "float32":
        return PrecisionCost("float32", served_bytes, served_bytes, None)
    reference, _ = load_pretrained(model, device=served.device)
    float32_bytes, reference_logp = weight_bytes(reference), log_probs(reference, ids)
    del reference
    return PrecisionCost(served.precision, served_bytes, float32_bytes,
                         divergence(log_probs(served, ids), reference_logp))
