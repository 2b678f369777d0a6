"""The sampling panel: how the sampler's own stages (sampling.filter_stages) turn the model's distribution
at one position into the one the token was drawn from: the JSON grammar, logit bias and penalties, then the
warpers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
from matplotlib.figure import Figure

from ..model import GPT
from ..generation import new_history
from ..sampling import History, SamplingParams, filter_stages
from ..speed.decoder import Decoder
from .panels import axis_label
from .replies import Reply

SHOWN_TOKENS = 10  # bars per stage: the most likely tokens, and the drawn one


@dataclass
class Pipeline:
    """Each stage's probabilities over the vocabulary: raw, after temperature, then the cuts (a cut token's
    probability is 0, the others keep theirs), and last the renormalised distribution the token was drawn from."""
    names: list[str]
    probs: list[np.ndarray]
    survivors: list[int]
    drawn: int


@torch.inference_mode()
def position_logits(model: GPT | Decoder, reply: Reply, position: int) -> torch.Tensor:
    """The float32 logits (vocab,) that reply token `position` (1-based) was drawn from."""
    ids = reply.prompt_ids + reply.token_ids[:position - 1]
    return model(torch.tensor([ids], device=model.device), None, last_only=True)[0, -1].float().cpu()


def position_history(reply: Reply, position: int, tokenizer: tiktoken.Encoding) -> History | None:
    """What the stages that read the sequence saw when reply token `position` (1-based) was drawn."""
    history = new_history(reply.request.params, tokenizer, reply.prompt_ids)
    for token in reply.token_ids[:position - 1] if history is not None else ():
        history.add(token)
    return history


def sampling_pipeline(logits: torch.Tensor, params: SamplingParams, drawn: int,
                      history: History | None = None) -> Pipeline:
    stages = filter_stages(logits, params, history)
    names = [name for name, _ in stages]
    # The stages up to temperature reshape the distribution (shown as it is after each); the cuts after it
    # act on the temperature's distribution (a cut token's probability is 0, the others keep theirs).
    warped = names.index("temperature") if "temperature" in names else len(stages) - 1
    scaled = stages[warped][1].softmax(-1)
    probs = [(stage.softmax(-1) if i <= warped else scaled.masked_fill(~torch.isfinite(stage), 0.0)).numpy()
             for i, (_, stage) in enumerate(stages)]
    survivors = [int(torch.isfinite(stage).sum()) for _, stage in stages]
    if params.greedy:
        names.append("greedy: the argmax")
        probs.append(np.eye(1, logits.numel(), int(stages[-1][1].argmax()))[0])
        survivors.append(1)
    else:
        names.append("renormalised")
        probs.append(stages[-1][1].softmax(-1).numpy())
        survivors.append(survivors[-1])
    return Pipeline(names, probs, survivors, drawn)


def pipeline_summary(pipeline: Pipeline, tokenizer: tiktoken.Encoding, params: SamplingParams) -> str:
    settings = {"temperature": f"temperature {params.temperature:g}", "top-k": f"top-k {params.top_k}",
                "top-p": f"top-p {params.top_p:g}", "min-p": f"min-p {params.min_p:g}",
                "repetition penalty": f"repetition penalty {params.repetition_penalty:g}",
                "presence penalty": f"presence penalty {params.presence_penalty:g}",
                "frequency penalty": f"frequency penalty {params.frequency_penalty:g}"}
    steps = " → ".join(f"{settings.get(name, name)}: **{n:,}**"
                       for name, n in zip(pipeline.names, pipeline.survivors))
    p = pipeline.probs[-1][pipeline.drawn]
    return (f"Tokens left at each stage: {steps}. Drawn: `{axis_label(tokenizer, pipeline.drawn)}` "
            f"(p = {p:.3f} in the final distribution).")


def pipeline_figure(pipeline: Pipeline, tokenizer: tiktoken.Encoding) -> Figure:
    """One bar chart per stage over the same tokens; the drawn token in pink."""
    order = list(np.argsort(-pipeline.probs[0])[:SHOWN_TOKENS])
    if pipeline.drawn not in order:
        order[-1] = pipeline.drawn
    labels = [axis_label(tokenizer, int(t))[:10] for t in order]
    fig = Figure(figsize=(7.2, 2.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(pipeline.names), sharey=True))
    for ax, name, probs, survivors in zip(axes, pipeline.names, pipeline.probs, pipeline.survivors):
        colours = ["#e91e63" if t == pipeline.drawn else "#5c6bc0" for t in order]
        ax.barh(range(len(order)), probs[order], color=colours)
        ax.set_title(f"{name}\n{survivors:,} left", fontsize=7)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=6)
    axes[0].set_yticks(range(len(order)), labels, fontsize=6)
    axes[0].invert_yaxis()  # shared: the most likely token on top in every stage
    return fig
