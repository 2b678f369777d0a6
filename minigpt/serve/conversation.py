"""The chat's core, free of any UI: conversation -> prompt for each mode (framed by minigpt.prompts),
context-window fitting, and the user's sampling settings -> validated values or a message that says
what is wrong. The app and the API share it.
"""
from __future__ import annotations

import html
import json
import math
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass

import tiktoken

from ..lora_scale import check_scale
from ..prompts import STOP_STRINGS, Exchange, render_prompt, transcript
from ..request import MAX_SEED, Mode, ReplyRequest
from ..sampling import SamplingParams, read_logit_bias

BASE, TUNED = Mode.BASE, Mode.TUNED
MODES = tuple(Mode)

MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 2.0
# A request's history is bounded before anything is tokenized: 500 exchanges, 1 MB of text, far more
# than a 1024-token window keeps (only the newest exchanges that fit are ever encoded).
MAX_HISTORY_MESSAGES = 1000
MAX_HISTORY_CHARS = 1_000_000
ROLES = ("system", "user", "assistant")  # the chat sends no system message; the API may
FIELD_NAMES = {"temperature": "Temperature", "top_k": "Top-k", "top_p": "Top-p", "min_p": "Min-p",
               "repetition_penalty": "Repetition penalty", "presence_penalty": "Presence penalty",
               "frequency_penalty": "Frequency penalty", "logit_bias": "Logit bias"}  # as the controls say


class ChatInputError(ValueError):
    """Input the app refuses; the message is meant for the user, as is."""


class MessageTooLong(ChatInputError):
    """The new message and the framing alone take more than the prompt's token budget."""

    def __init__(self, tokens: int, budget: int):
        super().__init__(f"Your message is too long: with its template it takes {tokens} tokens, but only "
                         f"{budget} fit beside the reply. Shorten it or lower 'Max new tokens'.")
        self.tokens, self.budget = tokens, budget


@dataclass(frozen=True)
class Prompt:
    text: str  # exactly what the model reads
    ids: list[int]
    dropped: int  # oldest exchanges left out so the prompt and the reply fit the context window
    stop: tuple[str, ...]


def as_chat_text(text: str) -> str:
    """Text as a chat message holds it: HTML-escaped, because the Chatbot renders HTML (sanitised). So a
    reply that contains <script> or <img onerror=...> is shown as those characters and never runs."""
    return html.escape(text, quote=False)


def message_text(message: dict) -> str:
    """The plain text of one Gradio 6 chat message (content a str or a list of typed parts); undoes as_chat_text."""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return html.unescape(content) if isinstance(content, str) else ""


def check_history(history: object) -> None:
    """Refuse a history of the wrong shape or size, in our words, before anything reads or tokenizes it.

    A message is {"role": "system" | "user" | "assistant", "content": text or a list of {"type": "text", "text": ...}}
    (other keys, such as Gradio's "metadata", are ignored). The chat takes text only: a file part is
    refused without being read, and no value sent is echoed back.
    """
    if not isinstance(history, list):
        raise ChatInputError("The chat history must be a list of messages.")
    if len(history) > MAX_HISTORY_MESSAGES:
        raise ChatInputError(f"The chat history has {len(history)} messages; at most {MAX_HISTORY_MESSAGES} are "
                             "accepted. Clear the chat or start again with the recent messages.")
    chars = 0
    for number, message in enumerate(history, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatInputError(f"Message {number} of the chat history must be an object with a role and a content.")
        if message["role"] not in ROLES:
            raise ChatInputError(f"Message {number} of the chat history has an unknown role: use 'system', 'user' "
                                 "or 'assistant'.")
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ChatInputError(f"The content of message {number} must be text or a list of text parts.")
        for part in parts:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatInputError(f"Message {number} of the chat history holds a part that is not text: the "
                                     "chat takes text only.")
            chars += len(part["text"])
    if chars > MAX_HISTORY_CHARS:
        raise ChatInputError(f"The chat history holds {chars:,} characters; at most {MAX_HISTORY_CHARS:,} are "
                             "accepted. Clear the chat or start again with the recent messages.")


def split_history(history: Sequence[dict]) -> tuple[list[Exchange], str]:
    """A Gradio messages history that ends with the user's new message -> (earlier exchanges, that message)."""
    check_history(history)
    if not history or history[-1].get("role") != "user":
        raise ChatInputError("There is no user message to reply to: type a message first.")
    exchanges: list[Exchange] = []
    for message in history[:-1]:
        text = message_text(message)
        if message.get("role") == "user":
            exchanges.append(Exchange(text, ""))
        elif message.get("role") == "assistant" and exchanges:
            last = exchanges[-1]
            exchanges[-1] = Exchange(last.user, f"{last.assistant} {text}".strip())
    return exchanges, message_text(history[-1])


def system_text(history: Sequence[dict]) -> str:
    """The text of the history's system messages, one per line ('' when none: the chat never sends one)."""
    return "\n".join(message_text(m) for m in history if m.get("role") == "system")


def with_user_message(history: Sequence[dict], message: str) -> list[dict]:
    """history plus the user's new message, as the chat shows it."""
    return [*history, {"role": "user", "content": as_chat_text(message)}]


def without_last_reply(history: Sequence[dict]) -> list[dict]:
    """history minus the assistant messages at its end (for Retry and Undo)."""
    history = list(history)
    while history and history[-1].get("role") == "assistant":
        history.pop()
    return history


def build_prompt(mode: str, history: Sequence[dict], tokenizer: tiktoken.Encoding, budget: int) -> Prompt:
    """The prompt for replying to the last message of history in `mode`, at most `budget` tokens.

    The oldest exchanges are dropped whole until it fits; the header and the new message always stay.
    Work is bounded by the window, not the history: exchanges are measured newest first, each encoded
    once, until the budget is spent. The chosen text is then encoded at once (BPE of pieces need not
    add up exactly; if it comes out longer, one more exchange goes), with encode_ordinary so a typed
    "<|endoftext|>" stays text.
    """
    framing = read_mode(mode).framing
    exchanges, message = split_history(history)
    system = system_text(history)
    used = len(tokenizer.encode_ordinary(render_prompt(framing, [], message, system)))
    keep = 0
    for exchange in reversed(exchanges):
        used += len(tokenizer.encode_ordinary(transcript([exchange])))
        if used > budget:
            break
        keep += 1
    while True:
        kept = exchanges[len(exchanges) - keep:]
        text = render_prompt(framing, kept, message, system)
        ids = tokenizer.encode_ordinary(text)
        if len(ids) <= budget:
            return Prompt(text, ids, len(exchanges) - keep, STOP_STRINGS[framing])
        if not keep:
            raise MessageTooLong(len(ids), budget)
        keep -= 1


def context_note(prompt: Prompt, context: int) -> str:
    """What the user should know about the context window for this prompt ('' when nothing was dropped)."""
    if not prompt.dropped:
        return ""
    turns = "exchange" if prompt.dropped == 1 else f"{prompt.dropped} exchanges"
    return (f"The conversation outgrew the {context}-token window: the oldest {turns} "
            f"{'was' if prompt.dropped == 1 else 'were'} left out of the prompt (the header is kept).")


def read_mode(mode: object) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise ChatInputError(f"Unknown mode {reprlib.repr(mode)}: choose {' or '.join(MODES)}.") from None


@dataclass(frozen=True)
class MoreSampling:
    """The chat's "More sampling" controls, as the page sends them (their defaults are off)."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: str = ""  # OpenAI's JSON object {"token id": bias}; blank = none
    as_json: bool = False  # answer as JSON matching `schema`
    schema: str = ""

    def params(self, vocab_size: int) -> dict:
        """SamplingParams' keyword arguments; ChatInputError in the controls' words."""
        more = {name: _number(FIELD_NAMES[name], getattr(self, name))
                for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")}
        bias = (self.logit_bias or "").strip()
        try:
            more["logit_bias"] = read_logit_bias(json.loads(bias) if bias else {}, vocab_size)
        except json.JSONDecodeError:
            raise ChatInputError('Logit bias must be a JSON object such as {"50256": -100}.') from None
        except ValueError as e:
            raise ChatInputError(f"Logit bias: {str(e).removeprefix('logit_bias ')}.") from None
        if self.as_json:
            if not (self.schema or "").strip():
                raise ChatInputError("Answer as JSON needs a schema: write one in the box, or {} for any JSON.")
            more["json_schema"] = self.schema
        return more


def read_request(mode: object, temperature: float, top_k: float | None, top_p: float, max_new_tokens: float,
                 seed: float | str | None, scale: float, context: int, more: MoreSampling = MoreSampling(),
                 vocab_size: int = 50257) -> tuple[ReplyRequest, list[str]]:
    """The page's controls -> (the reply request, notices about values that were clamped).

    Values the sliders cannot produce but that make sense are clamped with a notice; values that make
    no sense (negative temperature, top-p of 0, a fractional seed, a scale beyond 2, ...) raise
    ChatInputError, in the words of the page's controls.
    """
    notices = []
    mode = read_mode(mode)
    temperature = _number("Temperature", temperature)
    if temperature > MAX_TEMPERATURE:
        notices.append(f"Temperature {temperature:g} is above {MAX_TEMPERATURE:g}; used {MAX_TEMPERATURE:g}.")
        temperature = MAX_TEMPERATURE
    top_k = 0 if top_k is None else whole_number("Top-k", top_k)
    max_new = whole_number("Max new tokens", max_new_tokens)
    limit = min(MAX_NEW_TOKENS, context // 2)  # half the window stays for the conversation
    if max_new > limit:
        notices.append(f"Max new tokens {max_new} is above {limit}; used {limit}.")
        max_new = limit
    if max_new < 1:
        raise ChatInputError(f"Max new tokens must be at least 1, got {max_new}.")
    seed = None if seed is None or (isinstance(seed, str) and not seed.strip()) else whole_number("Seed", seed)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ChatInputError(f"Seed must be between 0 and {MAX_SEED} (or blank for random), got {seed}.")
    try:
        params = SamplingParams(temperature, top_k, _number("Top-p", top_p), **more.params(vocab_size))
    except ValueError as e:  # "top_k must be ..." -> "Top-k must be ..."
        field, rest = str(e).split(" ", 1)
        raise ChatInputError(f"{FIELD_NAMES.get(field, field)} {rest}.") from None
    try:
        scale = check_scale(_number("LoRA scale", scale)) if mode is TUNED else 1.0
    except ValueError as e:
        raise ChatInputError(f"{e}.") from None
    return ReplyRequest(mode, params, max_new, seed, scale), notices


def read_choice(name: str, value: object, choices: range) -> int:
    """A whole number among `choices` (a dropdown's values, a token position), or ChatInputError."""
    number = whole_number(name, value)
    if number not in choices:
        raise ChatInputError(f"{name} must be between {choices.start} and {choices.stop - 1}, got {number}.")
    return number


def _number(name: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too big for a float
        raise ChatInputError(f"{name} must be a number, got {reprlib.repr(value)}.") from None
    if not math.isfinite(number):
        raise ChatInputError(f"{name} must be a finite number, got {reprlib.repr(value)}.")
    return number


def whole_number(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().removeprefix("-").isdigit():
        return int(value)  # exactly: a 64-bit seed is beyond a float's 53 bits
    number = _number(name, value)
    if not number.is_integer():
        raise ChatInputError(f"{name} must be a whole number, got {reprlib.repr(value)}.")
    return int(number)
