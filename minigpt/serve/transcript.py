"""A conversation as a JSON file: its messages, the last reply's request (mode, LoRA scale, sampling
settings, seed) and every token (id, text, log-prob, top-5), so the file can be loaded back to look at
that reply's panels again, or the reply repeated exactly."""
from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Sequence
from typing import Any

import tiktoken

from ..request import ReplyRequest
from ..sampling import SamplingParams
from .conversation import (
    MAX_HISTORY_CHARS,
    MAX_HISTORY_MESSAGES,
    ChatInputError,
    as_chat_text,
    check_history,
    message_text,
)
from .panels import token_text
from .replies import Reply

FORMAT, VERSION = "minigpt-conversation", 1
FINISH_REASONS = ("eos", "stop", "length", "stopped")


class TranscriptError(ValueError):
    """A file that is not a conversation this app wrote; the message is meant for the user."""


def export_conversation(history: Sequence[dict], reply: Reply, tokenizer: tiktoken.Encoding) -> str:
    request = reply.request
    params = request.params
    return json.dumps({
        "format": FORMAT, "version": VERSION, "mode": request.mode.value, "scale": request.scale,
        "settings": {"temperature": params.temperature, "top_k": params.top_k or 0, "top_p": params.top_p,
                     "max_new_tokens": request.max_new_tokens},
        "seed": request.seed, "stop": list(reply.stop),
        "conversation": [{"role": m["role"], "content": message_text(m)} for m in history],
        "prompt_ids": reply.prompt_ids,
        "reply": {"text": reply.text, "finish_reason": reply.finish_reason, "token_times": reply.token_times,
                  "tokens": [{"id": t, "text": token_text(tokenizer, t), "logprob": lp,
                              "top": [{"id": a, "text": token_text(tokenizer, a), "logprob": alp} for a, alp in top]}
                             for t, lp, top in zip(reply.token_ids, reply.logprobs, reply.top)]},
    }, ensure_ascii=False, indent=1)


def _constant(name: str) -> float:
    """-Infinity is the log-probability of a token the sampler could not draw (json.dumps writes it so);
    Infinity and NaN are never written by this app."""
    if name == "-Infinity":
        return -math.inf
    raise ValueError(f"the file holds {name}, which is not a JSON number")


def load_conversation(text: str, vocab_size: int, n_positions: int) -> tuple[list[dict], Reply]:
    """(chat history, the last reply) from export_conversation's JSON; TranscriptError says what is wrong.

    A file may come from anyone: Infinity and NaN (Python's JSON extensions), deep nesting, positive
    log-probs, non-finite or negative times and histories past the chat's own limits are refused here,
    so no panel ever draws them and the chat can go on from what was loaded."""
    try:
        data = json.loads(text, parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TranscriptError(f"not a JSON file ({e})") from None
    except ValueError as e:  # Infinity, NaN
        raise TranscriptError(f"not a conversation this app wrote: {e}") from None
    except RecursionError:
        raise TranscriptError("not a conversation this app wrote: it is nested too deeply") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TranscriptError(f"not a MiniGPT conversation (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise TranscriptError(f"conversation format version {data.get('version')!r} is not {VERSION}")
    try:
        return _history(data["conversation"]), _reply(data, vocab_size, n_positions)
    except TranscriptError:
        raise
    except KeyError as e:
        raise TranscriptError(f"the conversation file has no {e.args[0]!r} field") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as e:
        raise TranscriptError(f"the conversation file is malformed: {e}") from None


def _history(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError("'conversation' must be a list of {role: user|assistant, content: text}")
    history = [{"role": m["role"], "content": as_chat_text(m["content"])} for m in messages]
    try:  # a conversation the chat could not go on with (more messages or text than it accepts) is refused
        check_history(history)
    except ChatInputError as e:
        raise TranscriptError(f"{str(e).split(';')[0].replace('The chat history', 'the conversation')}; the chat "
                              f"takes at most {MAX_HISTORY_MESSAGES:,} messages and {MAX_HISTORY_CHARS:,} "
                              "characters") from None
    return history


def _ids(values: Any, vocab_size: int, what: str) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int and 0 <= v < vocab_size for v in values):
        raise ValueError(f"{what} must be token ids between 0 and {vocab_size - 1}")
    return values


def _logprob(value: Any) -> float:
    """A log-probability: a number <= 0 (-inf allowed: a token the sampler could not draw)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -math.inf <= value <= 0:
        raise ValueError(f"a log-probability must be a number <= 0, got {reprlib.repr(value)}")
    return float(value)


def _times(values: Any, n_tokens: int) -> list[float]:
    """Seconds from the reply's start to each token: finite, >= 0, in order."""
    if not isinstance(values, list) or len(values) not in (0, n_tokens) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in values):
        raise ValueError("token_times must be one finite number of seconds >= 0 per reply token")
    times = [float(x) for x in values]
    if any(b < a for a, b in zip(times, times[1:])):
        raise ValueError("token_times must not decrease: each is the time since the reply started")
    return times


def _whole(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"{what} must be a whole number, got {reprlib.repr(value)}")
    return int(value)


def _reply(data: dict, vocab_size: int, n_positions: int) -> Reply:
    mode, s = data["mode"], data["settings"]
    request = ReplyRequest(mode, SamplingParams(s["temperature"], s["top_k"], s["top_p"]),
                           _whole(s["max_new_tokens"], "max_new_tokens"),
                           data["seed"] if type(data["seed"]) is int else None, data.get("scale", 1.0))
    reply_data = data["reply"]
    tokens = reply_data["tokens"]
    prompt_ids = _ids(data["prompt_ids"], vocab_size, "prompt_ids")
    token_ids = _ids([t["id"] for t in tokens], vocab_size, "reply token ids")
    if not prompt_ids or not token_ids or len(prompt_ids) + len(token_ids) > n_positions:
        raise ValueError(f"the prompt and the reply must each have a token and fit {n_positions} positions together")
    top = [[(_ids([a["id"]], vocab_size, "top ids")[0], _logprob(a["logprob"])) for a in t["top"]] for t in tokens]
    times = _times(reply_data.get("token_times") or [], len(tokens))
    finish = reply_data.get("finish_reason")
    if finish not in (*FINISH_REASONS, None):
        raise ValueError(f"finish_reason must be one of {', '.join(FINISH_REASONS)}")
    return Reply(request, prompt_ids, text=str(reply_data["text"]), token_ids=token_ids,
                 logprobs=[_logprob(t["logprob"]) for t in tokens], top=top, finish_reason=finish,
                 first_token_s=times[0] if times else None, elapsed_s=times[-1] if times else 0.0,
                 token_times=times,
                 stop=tuple(str(x) for x in data.get("stop", [])))
