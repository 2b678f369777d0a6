"""Prompt templates, shared by training, the chat, the CLI and the API: every caller frames text here.

Two framings of a conversation:
- "dialogue", for base GPT-2: a plain transcript after a one-line header; the model continues "Assistant:".
- "alpaca", for the Alpaca LoRA: the Alpaca instruction template; the new message is the instruction
  and the earlier exchanges are its input, so a first message is exactly the format the adapter was
  trained on.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The standard Alpaca prompt, ending in "### Response:\\n"; the `### Input:` block only when input is given."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


DIALOGUE_HEADER = "A conversation between a curious User and a friendly, knowledgeable AI Assistant.\n\n"
FRAMINGS = ("dialogue", "alpaca")
# A reply ends where the model starts writing the next turn.
STOP_STRINGS = {"dialogue": ("\nUser:", "\nAssistant:"), "alpaca": ("\n### ",)}


@dataclass(frozen=True)
class Exchange:
    user: str
    assistant: str


def transcript(exchanges: Sequence[Exchange]) -> str:
    return "".join(f"User: {e.user}\nAssistant: {e.assistant}\n" for e in exchanges)


def render_prompt(framing: str, exchanges: Sequence[Exchange], message: str, system: str = "") -> str:
    """The text a model reads to reply to `message` after `exchanges`, in one of FRAMINGS.

    A system text (the API's system messages; the chat has none) replaces the dialogue's header, and
    leads the Alpaca input (the Alpaca preamble stays as the adapter was trained on it).
    """
    if framing == "dialogue":
        header = f"{system}\n\n" if system else DIALOGUE_HEADER
        return f"{header}{transcript(exchanges)}User: {message}\nAssistant:"
    if framing == "alpaca":
        return alpaca_prompt(message, "\n\n".join(filter(None, [system, transcript(exchanges).rstrip("\n")])))
    raise ValueError(f"unknown framing {framing!r}: choose {' or '.join(FRAMINGS)}")
