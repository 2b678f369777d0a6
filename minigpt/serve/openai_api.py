"""An OpenAI-compatible API beside the chat: /v1/models, /v1/completions and /v1/chat/completions, and at
the root /tokenize, /detokenize and /tokenizer_info (vLLM's and llama.cpp's shapes), /health and /metrics.

A Starlette app that app.py mounts at /v1 in the Gradio server, so it shares the process, the port
and the Engine: the same models, the same scheduler (requests are served in arrival order, decoded in
one batch with the chat's replies) and the same generation path (Engine.replies). Chat messages are
framed by the chat's own build_prompt, so each model reads exactly what the app would give it.
Streaming is server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client that
disconnects stops its computation, as the Stop button does. A waiting request holds no thread; reading
and tokenizing a body runs in a worker thread, never on the event loop. Every error is OpenAI's error
shape, never a traceback: a full queue is 503 with Retry-After, a body over MAX_BODY_BYTES 413.

Every field is read, ignored by design (IGNORED), or refused with a 400 that names it (REFUSED, and any
field not listed: docs/openai-api.md has the table). A request's prompts (several on /v1/completions) and
their n choices each are queued at once, so the scheduler decodes them in one batch.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from ..generation import prompt_logprobs
from ..json_output import ANY_OBJECT, SchemaError, compile_schema
from ..request import MAX_SEED, Mode, ReplyRequest
from ..sampling import MAX_PENALTY, MAX_REPETITION_PENALTY, SamplingParams, read_logit_bias
from ..tokenizer import EOT
from .conversation import (
    MAX_NEW_TOKENS,
    TUNED,
    ChatInputError,
    MessageTooLong,
    Prompt,
    as_chat_text,
    build_prompt,
)
from .engine import Engine
from .metrics import Metrics
from .replies import Reply
from .launch import how_to_set
from .scheduler import ServerBusy

MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_STOPS = 4
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions `logprobs`
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions `top_logprobs`
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's finish_reason
DISCONNECT_POLL_S = 0.1
MAX_BODY_BYTES = 4 * 2**20  # a 1,024-token window needs a few kB; lm-eval's longest requests stay far below
RETRY_AFTER_S = 5  # what a refused (503) client is told to wait
MAX_CHOICES = 64  # prompts x best_of (or n) in one request: each is a row of the batch or waits for one
MIN_SEED = -2**63  # seeds are 64-bit, signed or not, as OpenAI's and vLLM's; a negative one counts modulo 2**64

# The fields each endpoint reads; IGNORED ones are accepted and have no effect here (nothing is stored or
# billed, no tools exist to call in parallel); REFUSED ones are a 400 that says why, unless they ask for
# nothing (null, or the value in HARMLESS); any other field is a 400 too: a typo never passes silently.
SHARED = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stream_options", "stop",
          "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "response_format"}
FIELDS = {"completions": SHARED | {"prompt", "logprobs", "echo", "best_of"},
          "chat": SHARED | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
REFUSED = {"tools": "the models call no tools", "tool_choice": "the models call no tools",
           "functions": "the models call no functions", "function_call": "the models call no functions",
           "suffix": "there is no fill-in-the-middle", "audio": "the models read and write text only",
           "modalities": "the models read and write text only", "prediction": "there are no predicted outputs",
           "reasoning_effort": "the models do not reason apart from their answer",
           "web_search_options": "there is no web search"}
HARMLESS = {"tool_choice": "none", "modalities": ["text"]}
log = logging.getLogger(__name__)


class APIError(Exception):
    """A refused request: becomes OpenAI's error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# --- reading a request body: every refusal names the parameter and what it accepts ---------------------

class Body:
    def __init__(self, fields: object):
        if not isinstance(fields, dict):
            raise APIError(400, "The request body must be a JSON object.")
        self.fields = fields

    def get(self, name: str, default: object = None) -> object:
        value = self.fields.get(name)
        return default if value is None else value

    def whole(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise APIError(400, f"{name} must be a whole number from {low} to {high}, got {value!r}.", name)
        return value

    def number(self, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
        value = self.get(name, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (low < value if low_open else
                                                                                   low <= value) and value <= high
        if not ok:
            bound = f"greater than {low:g} and at most {high:g}" if low_open else f"from {low:g} to {high:g}"
            raise APIError(400, f"{name} must be a number {bound}, got {value!r}.", name)
        return float(value)

    def flag(self, name: str) -> bool:
        value = self.get(name, False)
        if not isinstance(value, bool):
            raise APIError(400, f"{name} must be true or false, got {value!r}.", name)
        return value

    def check_fields(self, endpoint: str) -> None:
        """Every field is read, ignored or refused by name (the module's docstring says how)."""
        for name, value in self.fields.items():
            if name in FIELDS[endpoint] or name in IGNORED or value is None or HARMLESS.get(name) == value:
                continue
            if name in REFUSED:
                raise APIError(400, f"{name} is not supported by this server: {REFUSED[name]}.", name,
                               "unsupported_parameter")
            raise APIError(400, f"Unknown field {name!r}: this endpoint reads {', '.join(sorted(FIELDS[endpoint]))} "
                                f"(and ignores {', '.join(sorted(IGNORED))}).", name, "unknown_parameter")

    def stops(self) -> tuple[str, ...]:
        value = self.get("stop", [])
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
            raise APIError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings, got {value!r}.",
                           "stop")
        return tuple(s for s in stops if s)


@dataclass(frozen=True)
class Job:
    """One validated request: its prompts (one for chat), each answered by n choices, the best n of best_of
    samples by their log-probability."""
    request: ReplyRequest  # its seed is the first sample's; sample i of every prompt gets seed + i
    prompts: list[Prompt]
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # alternatives per token; None: no log-probs at all
    n: int = 1
    best_of: int = 1
    echo: bool = False  # completions: return the prompt, scored, before the completion
    complete: bool = True  # False: echo alone (max_tokens 0), scoring and no completion

    def sample(self, i: int) -> ReplyRequest:
        """The request of each prompt's sample i."""
        return self.request if self.request.seed is None else replace(self.request,
                                                                      seed=(self.request.seed + i) % (MAX_SEED + 1))


def read_common(body: Body, engine: Engine, endpoint: str) -> tuple[Mode, SamplingParams, int | None, bool, bool]:
    """Fields both endpoints share: (mode, sampling, seed, stream, include_usage)."""
    body.check_fields(endpoint)
    model_id = body.get("model")
    modes = {mode.api_id: mode for mode in engine.models}
    if model_id is None:
        raise APIError(400, f"model is required: this server has {', '.join(modes)}.", "model")
    if not isinstance(model_id, str):
        raise APIError(400, f"model must be a model id (a string): {', '.join(modes)}.", "model")
    if model_id not in modes:
        hint = f" ({engine.adapter_hint})" if model_id == TUNED.api_id else ""
        raise APIError(404, f"The model {model_id!r} does not exist{hint}; this server has {', '.join(modes)}.",
                       "model", "model_not_found")
    params = SamplingParams(body.number("temperature", 1.0, 0, MAX_TEMPERATURE),
                            body.whole("top_k", 0, 0, engine.tokenizer.n_vocab),
                            body.number("top_p", 1.0, 0, 1, low_open=True),
                            body.number("min_p", 0.0, 0, 1),
                            body.number("presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
                            body.number("frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
                            body.number("repetition_penalty", 1.0, 0, MAX_REPETITION_PENALTY, low_open=True),
                            logit_bias(body, engine.tokenizer.n_vocab),
                            response_schema(body, engine))
    options = body.get("stream_options", {})
    if not isinstance(options, dict):
        raise APIError(400, f"stream_options must be an object, got {options!r}.", "stream_options")
    include_usage = Body(options).flag("include_usage")
    seed = body.whole("seed", None, MIN_SEED, MAX_SEED)
    return (modes[model_id], params, None if seed is None else seed % (MAX_SEED + 1), body.flag("stream"),
            include_usage)


def logit_bias(body: Body, n_vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> ((id, bias), ...)."""
    try:
        return read_logit_bias(body.get("logit_bias", {}), n_vocab)
    except ValueError as e:
        raise APIError(400, f"{e}.", "logit_bias") from None


def response_schema(body: Body, engine: Engine) -> str | None:
    """response_format -> the JSON schema (text) the reply must validate against; None for plain text.
    json_object is any object; a json_schema is enforced whether or not it says strict."""
    value = body.get("response_format")
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        schema = ANY_OBJECT
    elif kind == "json_schema" and isinstance(spec := value.get("json_schema"), dict) and isinstance(
            spec.get("schema", {}), dict):
        schema = json.dumps(spec.get("schema", {}))
    else:
        raise APIError(400, "response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}, "
                            f"got {value!r}.", "response_format")
    try:
        compile_schema(schema, engine.tokenizer)
    except SchemaError as e:
        raise APIError(400, f"response_format: the schema cannot be enforced: {e}.", "response_format") from None
    return schema


def read_choices(body: Body, prompts: int, stream: bool, with_best_of: bool) -> tuple[int, int]:
    """(n, best_of): n choices per prompt, the best of best_of samples (by log-probability); chat has no
    best_of (with_best_of False: it is n)."""
    n = body.whole("n", 1, 1, MAX_CHOICES)
    best_of = body.whole("best_of", n, n, MAX_CHOICES) if with_best_of else n
    if best_of > n and stream:
        raise APIError(400, "best_of cannot be streamed: the best samples are known only at the end.", "best_of")
    if prompts * best_of > MAX_CHOICES:
        name = "best_of" if with_best_of else "n"
        raise APIError(400, f"A request may ask for at most {MAX_CHOICES} samples, prompts x {name}: {prompts} x "
                            f"{best_of} is {prompts * best_of}.", name)
    return n, best_of


def read_prompts(body: Body, engine: Engine) -> list[tuple[str, list[int]]]:
    """`prompt` as a string, a list of strings, a list of token ids, or a list of such lists -> (text, ids)
    for each; text is encoded as written ("<|endoftext|>" in it is the token), ids are decoded for echo."""
    value = body.get("prompt")
    tokenizer = engine.tokenizer

    def is_ids(x: object) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

    if isinstance(value, str) or is_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or not (all(isinstance(p, str) for p in value) or all(
            is_ids(p) for p in value)):
        raise APIError(400, "prompt must be a string, a list of strings, a non-empty list of token ids, or a list "
                            "of such lists.", "prompt")
    prompts = []
    for k, prompt in enumerate(value):
        if isinstance(prompt, str):
            prompts.append((prompt, tokenizer.encode(prompt, allowed_special="all")))
            continue
        if not all(0 <= i < tokenizer.n_vocab for i in prompt):
            where = f"prompt[{k}]" if len(value) > 1 else "prompt"
            raise APIError(400, f"{where} has a token id outside 0 to {tokenizer.n_vocab - 1}.", "prompt")
        prompts.append((tokenizer.decode(prompt), list(prompt)))
    return prompts


def read_completion(body: Body, engine: Engine) -> Job:
    mode, params, seed, stream, include_usage = read_common(body, engine, "completions")
    texts = read_prompts(body, engine)
    n, best_of = read_choices(body, len(texts), stream, with_best_of=True)
    context = engine.n_positions
    echo = body.flag("echo")
    max_tokens = body.whole("max_tokens", 16, 0 if echo else 1, context - 1)
    for k, (_, ids) in enumerate(texts):
        if len(ids) + max_tokens > context:
            which = f"prompt {k}" if len(texts) > 1 else "the prompt"
            raise APIError(400, f"This model's context window is {context} tokens: {which} takes {len(ids)} and "
                                f"max_tokens asks for {max_tokens} more. Shorten it or lower max_tokens.",
                           "prompt", "context_length_exceeded")
    top = body.whole("logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    stops = body.stops()
    return Job(ReplyRequest(mode, params, max(max_tokens, 1), seed), [Prompt(t, ids, 0, stops) for t, ids in texts],
               stream, include_usage, top, n, best_of, echo, complete=max_tokens > 0)


def read_chat(body: Body, engine: Engine) -> Job:
    mode, params, seed, stream, include_usage = read_common(body, engine, "chat")
    context = engine.n_positions
    history = chat_history(body.get("messages"))
    default = min(MAX_NEW_TOKENS, context // 2)  # the chat's own limit: half the window stays for the conversation
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.whole(name, default, 1, context - 1)
    try:
        prompt = build_prompt(mode, history, engine.tokenizer, context - max_tokens)
    except MessageTooLong as e:
        raise APIError(400, f"This model's context window is {context} tokens: the last message with its template "
                            f"takes {e.tokens}, but beside {name}={max_tokens} only {e.budget} fit. Shorten it or "
                            f"lower {name}.", "messages", "context_length_exceeded") from None
    except ChatInputError as e:
        raise APIError(400, str(e), "messages") from None
    prompt = Prompt(prompt.text, prompt.ids, prompt.dropped, prompt.stop + body.stops())
    if not body.flag("logprobs") and body.get("top_logprobs") is not None:
        raise APIError(400, "top_logprobs needs logprobs: true.", "top_logprobs")
    top = body.whole("top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if body.flag("logprobs") else None
    n, _ = read_choices(body, 1, stream, with_best_of=False)
    return Job(ReplyRequest(mode, params, max_tokens, seed), [prompt], stream, include_usage, top, n, n)


def chat_history(messages: object) -> list[dict]:
    """OpenAI messages -> the chat's history (text escaped as the chat holds it), for build_prompt."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects.", "messages")
    history = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system message
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, developer, user or assistant, got {role!r}: "
                                "the models call no tools.", "messages")
        for name in ("tool_calls", "function_call", "audio"):
            if message.get(name) is not None:
                raise APIError(400, f"messages[{i}].{name} is not supported by this server: the models call no "
                                    "tools and read text only.", "messages")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise APIError(400, f"messages[{i}].content[{j}] is a {kind!r} part: the models read text "
                                        "parts only.", "messages")
            if all(isinstance(p.get("text"), str) for p in content):
                content = " ".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts.", "messages")
        history.append({"role": role, "content": as_chat_text(content)})
    if history[-1]["role"] != "user":
        raise APIError(400, "The last message must be the user's: there is nothing to reply to.", "messages")
    return history


# --- running a job -------------------------------------------------------------------------------------

def queue(engine: Engine, job: Job) -> tuple[list[AsyncIterator[Reply]], list[threading.Event]]:
    """Queue every sample's reply now, all before any is awaited, so the scheduler starts them together and
    decodes them in one batch: (their growing Replies, in the order prompt by prompt, sample by sample; their
    stop flags). ServerBusy when the queue is full, with none of them left queued."""
    if not job.complete:  # echo alone: scoring, no completion
        return [finished(Reply(job.request, list(p.ids), finish_reason="length")) for p in job.prompts], []
    updates, stops = [], []
    try:
        for prompt in job.prompts:
            for i in range(job.best_of):
                stops.append(threading.Event())
                updates.append(engine.replies(job.sample(i), prompt, stops[-1], top_n=job.top_logprobs or 0))
    except ServerBusy:
        for stop in stops:
            stop.set()
        raise
    return updates, stops


async def finished(reply: Reply) -> AsyncIterator[Reply]:
    yield reply


Update = tuple[int, Reply]  # (sample number, its Reply as it grows)


async def follow(job: Job, updates: list[AsyncIterator[Reply]], stops: list[threading.Event],
                 request: Request) -> AsyncIterator[Update]:
    """Every sample's growing Reply after every token, as they come from the scheduler; awaiting them holds
    no thread. A disconnected client sets the stop flags (also while they wait in the queue); leaving early
    (cancelled, or the consumer stops) ends every computation, which frees their rows and KV caches."""
    arrived: asyncio.Queue[tuple[int, Reply | BaseException | None]] = asyncio.Queue()

    async def pump(k: int, replies: AsyncIterator[Reply]) -> None:
        try:
            async for reply in replies:
                if reply.ahead is None:  # still waiting: nothing to send yet
                    arrived.put_nowait((k, reply))
            arrived.put_nowait((k, None))
        except Exception as e:  # noqa: BLE001  (the request's handler raises it)
            arrived.put_nowait((k, e))
        finally:
            await replies.aclose()

    watcher = asyncio.create_task(watch_disconnect(request, stops))
    pumps = [asyncio.create_task(pump(k, replies)) for k, replies in enumerate(updates)]
    last: dict[int, Reply] = {}
    try:
        for _ in pumps:
            while (item := await arrived.get())[1] is not None:
                k, reply = item
                if isinstance(reply, BaseException):
                    raise reply
                if reply.finish_reason == "stopped":
                    return
                last[k] = reply
                yield k, reply
    finally:
        for stop in stops:
            stop.set()
        watcher.cancel()
        for task in pumps:
            task.cancel()
        left = [reply for reply in last.values() if reply.finish_reason in (None, "stopped")]
        if left or (stops and len(last) < len(updates)):
            reply = left[0] if left else None
            print(f"API: {job.request.mode.api_id} stopped after {len(reply.token_ids) if reply else 0} of "
                  f"{job.request.max_new_tokens} tokens: the client left", flush=True)


async def watch_disconnect(request: Request, stops: list[threading.Event]) -> None:
    while not all(stop.is_set() for stop in stops):
        if await request.is_disconnected():
            for stop in stops:
                stop.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


Scores = list[tuple[float | None, list[tuple[int, float]] | None]]


async def echo_scores(engine: Engine, job: Job) -> list[Scores]:
    """For each prompt, (log-prob, alternatives) of its tokens; the first has no context, so None for both."""
    if not job.echo or job.top_logprobs is None:
        return [[] for _ in job.prompts]
    model = engine.model_for(job.request)
    return [[(None, None), *await engine.compute_async(prompt_logprobs, model, p.ids, job.top_logprobs or 0)]
            if p.ids else [] for p in job.prompts]


# --- OpenAI's shapes -------------------------------------------------------------------------------------

def token_text(engine: Engine, token_id: int) -> str:
    return engine.tokenizer.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


def completion_logprobs(engine: Engine, ids: Sequence[int], scores: Sequence[tuple[float | None, list | None]],
                        offset: int, top_n: int) -> dict:
    """/v1/completions `logprobs`: tokens, their log-probs, top alternatives, and each token's offset in
    the text (the first at `offset`)."""
    tokens = [token_text(engine, i) for i in ids]
    offsets = [offset + sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    top = [None if alts is None or not top_n else {token_text(engine, i): lp for i, lp in alts[:top_n]}
           for _, alts in scores]
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in scores], "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(engine: Engine, ids: Sequence[int], scores: Sequence[tuple[float, list]], top_n: int) -> dict:
    """/v1/chat/completions `logprobs`: per token its text, bytes, log-prob and top alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        raw = engine.tokenizer.decode_single_token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**entry(i, lp), "top_logprobs": [entry(a, alp) for a, alp in alts[:top_n]]}
                        for i, (lp, alts) in zip(ids, scores)], "refusal": None}


def usage(job: Job, replies: Sequence[Reply]) -> dict:
    """Every prompt token once, and every token generated, the samples best_of dropped included."""
    prompt, completion = sum(len(p.ids) for p in job.prompts), sum(len(r.token_ids) for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Sent:
    """What a choice's stream has sent so far."""
    tokens: int = 0
    chars: int = 0
    started: bool = False  # chat: leading whitespace is dropped until the content starts
    offset: int = 0  # completions: where the next token's text starts (the prompt's length unless echoed)
    finished: bool = False


class Renderer:
    """Turns a job's replies into OpenAI's objects: the whole response, or its stream of chunks. Choice
    `index` counts prompt by prompt, n per prompt (as OpenAI and vLLM number them)."""

    def __init__(self, engine: Engine, job: Job, chat: bool, echoed: list[Scores]):
        self.engine, self.job, self.chat, self.echoed = engine, job, chat, echoed
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.sent = [Sent(offset=0 if job.echo else len(p.text)) for p in job.prompts for _ in range(job.n)]

    def envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.job.request.mode.api_id,
                "choices": choices}

    def prompt(self, index: int) -> Prompt:
        return self.job.prompts[index // self.job.n]

    def logprobs(self, index: int, reply: Reply, start: int, end: int, echoed: Sequence = ()) -> dict | None:
        """Log-probs of reply tokens start:end, after the `echoed` prompt tokens' (completions with echo)."""
        top_n = self.job.top_logprobs
        if top_n is None:
            return None
        scores = list(zip(reply.logprobs[start:end], reply.top[start:end]))
        if self.chat:
            return chat_logprobs(self.engine, reply.token_ids[start:end], scores, top_n)
        ids = [*self.prompt(index).ids[:len(echoed)], *reply.token_ids[start:end]]
        logprobs = completion_logprobs(self.engine, ids, [*echoed, *scores], self.sent[index].offset, top_n)
        self.sent[index].offset += sum(len(t) for t in logprobs["tokens"])
        return logprobs

    def content(self, index: int, text: str) -> str:
        sent = self.sent[index]
        if self.chat and not sent.started:
            text = text.lstrip()
            sent.started = bool(text)
        return text

    def whole(self, replies: Sequence[Reply]) -> dict:
        """The response to replies (every sample, prompt by prompt): each prompt's n most likely samples."""
        choices = []
        for p, prompt in enumerate(self.job.prompts):
            samples = replies[p * self.job.best_of:(p + 1) * self.job.best_of]
            if len(samples) > self.job.n:  # best_of: the n likeliest; otherwise sample i stays choice i (seed + i)
                samples = sorted(samples, key=lambda r: -sum(r.logprobs))[:self.job.n]
            for index, reply in enumerate(samples, start=p * self.job.n):
                text = self.content(index, reply.text)
                logprobs = self.logprobs(index, reply, 0, len(reply.token_ids), self.echoed[p])
                choice: dict = {"index": index, "logprobs": logprobs, "finish_reason": FINISH[reply.finish_reason]}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": text, "refusal": None}
                else:
                    choice["text"] = (prompt.text if self.job.echo else "") + text
                choices.append(choice)
        return {**self.envelope("chat.completion" if self.chat else "text_completion", choices),
                "usage": usage(self.job, replies)}

    def first_chunks(self) -> list[dict]:
        """Chat: the assistant's role; completions with echo: each prompt and its scores."""
        if self.chat:
            return [self.chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(len(self.sent))]
        if self.job.echo:
            return [self.chunk(i, self.prompt(i).text, self.logprobs(i, Reply(self.job.request, []), 0, 0,
                                                                       self.echoed[i // self.job.n]), None)
                    for i in range(len(self.sent))]
        return []

    def next_chunk(self, index: int, reply: Reply) -> dict | None:
        """What reply added since choice index's last chunk (None when nothing worth sending)."""
        sent = self.sent[index]
        if sent.finished:
            return None
        start, end = sent.tokens, len(reply.token_ids)
        text = self.content(index, reply.text[sent.chars:])
        sent.tokens, sent.chars = end, len(reply.text)
        finish = FINISH.get(reply.finish_reason or "")
        sent.finished = finish is not None
        if not text and finish is None and (self.job.top_logprobs is None or start == end):
            return None
        return self.chunk(index, {"content": text} if self.chat else text, self.logprobs(index, reply, start, end),
                          finish)

    def chunk(self, index: int, delta: dict | str, logprobs: dict | None, finish: str | None) -> dict:
        choice = {"index": index, "delta" if self.chat else "text": delta, "logprobs": logprobs,
                  "finish_reason": finish}
        chunk = self.envelope(self.kind, [choice])
        return {**chunk, "usage": None} if self.job.include_usage else chunk

    def usage_chunk(self, replies: Sequence[Reply]) -> dict:
        return {**self.envelope(self.kind, []), "usage": usage(self.job, replies)}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def respond(engine: Engine, job: Job, request: Request, chat: bool, metrics: Metrics) -> Response:
    renderer = Renderer(engine, job, chat, await echo_scores(engine, job))
    updates, stops = queue(engine, job)
    last: dict[int, Reply] = {}

    def done() -> list[Reply] | None:
        """Every sample's finished Reply, counted in the metrics; None if any did not finish (the client left)."""
        for reply in last.values():
            metrics.reply(len(reply.prompt_ids), reply)
        if len(last) < len(updates) or any(r.finish_reason not in FINISH for r in last.values()):
            return None
        return [last[k] for k in range(len(updates))]

    if not job.stream:
        async for k, reply in follow(job, updates, stops, request):
            last[k] = reply
        if (replies := done()) is None:  # the client left: nobody reads an answer
            return Response(status_code=499)
        return JSONResponse(renderer.whole(replies))

    async def events() -> AsyncIterator[str]:
        for first in renderer.first_chunks():
            yield sse(first)
        async for k, reply in follow(job, updates, stops, request):
            last[k] = reply
            if (chunk := renderer.next_chunk(k, reply)) is not None:
                yield sse(chunk)
        if (replies := done()) is not None:
            if job.include_usage:
                yield sse(renderer.usage_chunk(replies))
            yield sse("[DONE]")
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- routes, access and errors ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """Who may use /v1 (and /tokenize, /detokenize, /tokenizer_info, /metrics): with a key, bearers of it;
    without, anyone, unless the API is off. With a key the chat page asks for it too (login)."""
    key: str | None
    enabled: bool
    off_reason: str = ""

    def check(self, request: Request) -> None:
        if not self.enabled:
            raise APIError(403, f"The API is off: {self.off_reason}", code="api_off", kind="permission_error")
        if self.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.is_key(token.strip()):
            raise APIError(401, "Missing or wrong API key: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key", kind="authentication_error")

    def is_key(self, secret: str) -> bool:
        return self.key is not None and secrets.compare_digest(secret.encode(), self.key.encode())

    def login(self) -> Callable[[str, str], bool] | None:
        """Gradio's auth for the chat page and every Gradio route: any user name, the API key as password."""
        return None if self.key is None else lambda _user, password: self.is_key(password)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def access_for(host: str, shared: bool, key: str | None, open_api: bool) -> Access:
    """Bound beyond loopback (or shared through a public link) with no key, /v1 is off unless open_api."""
    if key or open_api or (host in LOOPBACK or host.startswith("127.")) and not shared:
        return Access(key or None, True)
    return Access(None, False, f"the server is reachable beyond this machine ({'a share link' if shared else host}) "
                               f"and has no API key: set one with {how_to_set('api_key', 'KEY')}, or serve /v1 "
                               f"to anyone with {how_to_set('open_api', '1')}.")


def describe(access: Access, url: str, host: str, shared: bool) -> str:
    """The start-up log's lines that say what is open to whom: the chat page, the API, /health."""
    local = (host in LOOPBACK or host.startswith("127.")) and not shared
    who = "this machine only" if local else f"anyone who can reach {'the share link' if shared else host}"
    page = ("log in with any user name and the API key as password" if access.key else
            f"open to {who} (no --api-key)")
    lines = [f"Chat page and Gradio's routes: {url} ({page})"]
    if not access.enabled:
        lines.append(f"OpenAI-compatible API: off, because {access.off_reason}")
    else:
        api = ("a bearer API key is required" if access.key else
               f"no API key: open to {who}")
        lines.append(f"OpenAI-compatible API: {url.rstrip('/')}/v1, with /tokenize, /detokenize, /tokenizer_info and "
                     f"/metrics ({api})")
    lines.append(f"Health check: {url.rstrip('/')}/health (open to {who})")
    return "\n".join(lines)


Handler = Callable[[Request], Awaitable[Response]]


def endpoint(access: Access | None, metrics: Metrics, handle: Handler) -> Handler:
    """A route: access checked first (None: open); refusals in OpenAI's error shape; anything unexpected a
    plain 500, logged on one line, with no traceback sent. Every answer is counted in the metrics."""
    async def route(request: Request) -> Response:
        try:
            if access is not None:
                access.check(request)
            response = await handle(request)
        except APIError as e:
            response = e.response()
        except ServerBusy as e:
            response = APIError(503, f"{str(e)[0].upper()}{str(e)[1:]}; retry after {RETRY_AFTER_S} s.",
                                code="server_busy", kind="server_error",
                                headers={"Retry-After": str(RETRY_AFTER_S)}).response()
        except Exception as e:  # noqa: BLE001  (the last line of defence: the client gets no traceback)
            log.error("API request %s failed: %s: %s", request.url.path, type(e).__name__, e)
            response = APIError(500, "The server failed on this request.", kind="server_error").response()
        metrics.answered(request.url.path, response.status_code)
        return response
    return route


async def read_body(request: Request) -> Body:
    """The JSON body, at most MAX_BODY_BYTES (413 beyond, before more is read), parsed in a worker thread."""
    too_large = APIError(413, f"The request body is larger than {MAX_BODY_BYTES // 2**20} MiB.",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise too_large
    try:
        return Body(await anyio.to_thread.run_sync(json.loads, bytes(data)))
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise APIError(400, "The request body is nested too deeply.") from None


def tokenize(body: Body, engine: Engine) -> dict:
    """vLLM's {"prompt"} or llama.cpp's {"content"} (with_pieces: each token's text too) -> the token ids, in
    both servers' shapes at once. The text is encoded as written: "<|endoftext|>" is the token."""
    text = body.get("prompt", body.get("content"))
    if not isinstance(text, str):
        raise APIError(400, "Send the text to tokenize as prompt (vLLM) or content (llama.cpp), a string.", "prompt")
    ids = engine.tokenizer.encode(text, allowed_special="all")
    result: dict = {"tokens": ids, "count": len(ids), "max_model_len": engine.n_positions}
    if body.flag("with_pieces"):
        result["tokens"] = [{"id": i, "piece": token_text(engine, i)} for i in ids]
    return result


def detokenize(body: Body, engine: Engine) -> dict:
    """{"tokens": [ids]} -> the text, as vLLM's "prompt" and llama.cpp's "content"."""
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            and 0 <= i < engine.tokenizer.n_vocab for i in ids):
        raise APIError(400, f"tokens must be a list of token ids from 0 to {engine.tokenizer.n_vocab - 1}.", "tokens")
    text = engine.tokenizer.decode(ids)
    return {"prompt": text, "content": text}


def api_routes(engine: Engine, access: Access) -> list[BaseRoute]:
    """What app.py adds to the FastAPI app Gradio builds, before Gradio's own routes: /v1 and the root routes."""
    created = int(time.time())
    metrics = Metrics(engine.scheduler)

    def card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "minigpt",
                "max_model_len": engine.n_positions}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [card(mode.api_id) for mode in engine.models]})

    async def model(request: Request) -> Response:
        model_id = request.path_params["model"]
        if model_id not in (mode.api_id for mode in engine.models):
            raise APIError(404, f"The model {model_id!r} does not exist.", "model", "model_not_found")
        return JSONResponse(card(model_id))

    async def completions(request: Request) -> Response:
        job = await anyio.to_thread.run_sync(read_completion, await read_body(request), engine)  # it tokenizes
        return await respond(engine, job, request, False, metrics)

    async def chat_completions(request: Request) -> Response:
        job = await anyio.to_thread.run_sync(read_chat, await read_body(request), engine)
        return await respond(engine, job, request, True, metrics)

    def worker(read: Callable[[Body, Engine], dict]) -> Handler:
        async def handle(request: Request) -> Response:
            return JSONResponse(await anyio.to_thread.run_sync(read, await read_body(request), engine))
        return handle

    async def tokenizer_info(request: Request) -> Response:
        return JSONResponse({"tokenizer_class": "GPT2Tokenizer", "eos_token": EOT, "bos_token": EOT,
                             "pad_token": None, "model_max_length": engine.n_positions,
                             "vocab_size": engine.tokenizer.n_vocab})

    async def health(request: Request) -> Response:
        return Response(status_code=200)  # the models are loaded before the server starts

    async def prometheus(request: Request) -> Response:
        return Response(metrics.text(), media_type=metrics.content_type)

    async def http_error(request: Request, e: Exception) -> Response:
        status = e.status_code if isinstance(e, HTTPException) else 500
        return APIError(status, f"{request.method} {request.url.path}: {getattr(e, 'detail', 'server error')}",
                        kind="invalid_request_error" if status < 500 else "server_error").response()

    def route(path: str, handle: Handler, methods: list[str] | None = None, guarded: bool = True) -> Route:
        return Route(path, endpoint(access if guarded else None, metrics, handle), methods=methods)

    v1 = Starlette(routes=[route("/models", models), route("/models/{model:path}", model),
                           route("/completions", completions, ["POST"]),
                           route("/chat/completions", chat_completions, ["POST"])],
                   exception_handlers={HTTPException: http_error})
    return [Mount("/v1", v1), route("/tokenize", worker(tokenize), ["POST"]),
            route("/detokenize", worker(detokenize), ["POST"]), route("/tokenizer_info", tokenizer_info),
            route("/metrics", prometheus), route("/health", health, guarded=False)]
