"""An OpenAI-compatible API beside the chat: /v1/models, /v1/completions and /v1/chat/completions.

A Starlette app that app.py mounts at /v1 in the Gradio server, so it shares the process, the port
and the Engine: the same models, the same scheduler (requests are served in arrival order, decoded in
one batch with the chat's replies) and the same generation path (Engine.replies). Chat messages are
framed by the chat's own build_prompt, so each model reads exactly what the app would give it.
Streaming is server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client that
disconnects stops its computation, as the Stop button does. A waiting request holds no thread; reading
and tokenizing a body runs in a worker thread, never on the event loop. Every error is OpenAI's error
shape, never a traceback: a full queue is 503 with Retry-After, a body over MAX_BODY_BYTES 413.
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
from dataclasses import dataclass

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..generation import prompt_logprobs
from ..request import Mode, ReplyRequest
from ..sampling import SamplingParams
from .conversation import (
    MAX_NEW_TOKENS,
    MAX_SEED,
    TUNED,
    ChatInputError,
    MessageTooLong,
    Prompt,
    as_chat_text,
    build_prompt,
)
from .engine import Engine
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

    def stops(self) -> tuple[str, ...]:
        value = self.get("stop", [])
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
            raise APIError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings, got {value!r}.",
                           "stop")
        return tuple(s for s in stops if s)


@dataclass(frozen=True)
class Job:
    """One validated request."""
    request: ReplyRequest
    prompt: Prompt
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # alternatives per token; None: no log-probs at all
    echo: bool = False  # completions: return the prompt, scored, before the completion
    complete: bool = True  # False: echo alone (max_tokens 0), scoring and no completion


def read_common(body: Body, engine: Engine) -> tuple[Mode, SamplingParams, int | None, bool, bool]:
    """Fields both endpoints share: (mode, sampling, seed, stream, include_usage)."""
    model_id = body.get("model")
    modes = {mode.api_id: mode for mode in engine.models}
    if not isinstance(model_id, str):
        raise APIError(400, f"model must be a model id (a string): {', '.join(modes)}.", "model")
    if model_id not in modes:
        hint = f" ({engine.adapter_hint})" if model_id == TUNED.api_id else ""
        raise APIError(404, f"The model {model_id!r} does not exist{hint}; this server has {', '.join(modes)}.",
                       "model", "model_not_found")
    if body.whole("n", 1, 1, 1) != 1:
        raise APIError(400, "n must be 1.", "n")
    params = SamplingParams(body.number("temperature", 1.0, 0, MAX_TEMPERATURE),
                            body.whole("top_k", 0, 0, engine.tokenizer.n_vocab),
                            body.number("top_p", 1.0, 0, 1, low_open=True))
    options = body.get("stream_options", {})
    if not isinstance(options, dict):
        raise APIError(400, f"stream_options must be an object, got {options!r}.", "stream_options")
    include_usage = Body(options).flag("include_usage")
    return modes[model_id], params, body.whole("seed", None, 0, MAX_SEED), body.flag("stream"), include_usage


def read_completion(body: Body, engine: Engine) -> Job:
    mode, params, seed, stream, include_usage = read_common(body, engine)
    text = body.get("prompt")
    if not isinstance(text, str):
        raise APIError(400, f"prompt must be a string, got {type(text).__name__}.", "prompt")
    context = engine.n_positions
    echo = body.flag("echo")
    max_tokens = body.whole("max_tokens", 16, 0 if echo else 1, context - 1)
    ids = engine.tokenizer.encode(text, allowed_special="all")  # as written: "<|endoftext|>" is the token
    if len(ids) + max_tokens > context:
        raise APIError(400, f"This model's context window is {context} tokens: the prompt takes {len(ids)} and "
                            f"max_tokens asks for {max_tokens} more. Shorten the prompt or lower max_tokens.",
                       "prompt", "context_length_exceeded")
    top = body.whole("logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    return Job(ReplyRequest(mode, params, max(max_tokens, 1), seed), Prompt(text, ids, 0, body.stops()), stream,
               include_usage, top, echo, complete=max_tokens > 0)


def read_chat(body: Body, engine: Engine) -> Job:
    mode, params, seed, stream, include_usage = read_common(body, engine)
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
    top = body.whole("top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if body.flag("logprobs") else None
    return Job(ReplyRequest(mode, params, max_tokens, seed), prompt, stream, include_usage, top)


def chat_history(messages: object) -> list[dict]:
    """OpenAI messages -> the chat's history (text escaped as the chat holds it), for build_prompt."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects.", "messages")
    history = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}.", "messages")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
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

def queue(engine: Engine, job: Job, request: Request) -> AsyncIterator[Reply]:
    """Queue the job's reply now (ServerBusy when the queue is full: before any response has started)."""
    if not job.complete:  # echo alone: scoring, no completion
        return finished(Reply(job.request, list(job.prompt.ids), finish_reason="length"))
    stop = threading.Event()
    return replies(job, engine.replies(job.request, job.prompt, stop, top_n=job.top_logprobs or 0), stop, request)


async def finished(reply: Reply) -> AsyncIterator[Reply]:
    yield reply


async def replies(job: Job, updates: AsyncIterator[Reply], stop: threading.Event,
                  request: Request) -> AsyncIterator[Reply]:
    """The growing Reply after every token, from the scheduler; awaiting it holds no thread. A disconnected
    client sets the stop flag (also while it waits in the queue); leaving early (cancelled, or the consumer
    stops) ends the computation, which frees its row and KV cache."""
    watcher = asyncio.create_task(watch_disconnect(request, stop))
    reply = None
    try:
        async for reply in updates:
            if reply.ahead is not None:  # still waiting: nothing to send yet
                continue
            if reply.finish_reason == "stopped":
                return
            yield reply
    finally:
        stop.set()
        watcher.cancel()
        await updates.aclose()
        if reply is not None and reply.finish_reason in (None, "stopped"):
            print(f"API: {job.request.mode.api_id} stopped after {len(reply.token_ids)} of "
                  f"{job.request.max_new_tokens} tokens: the client left", flush=True)


async def watch_disconnect(request: Request, stop: threading.Event) -> None:
    while not stop.is_set():
        if await request.is_disconnected():
            stop.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def echo_scores(engine: Engine, job: Job) -> list[tuple[float | None, list[tuple[int, float]] | None]]:
    """(log-prob, alternatives) for each prompt token; the first has no context, so None for both."""
    if not job.echo or job.top_logprobs is None or not job.prompt.ids:
        return []
    scored = await engine.compute_async(prompt_logprobs, engine.model_for(job.request), job.prompt.ids,
                                        job.top_logprobs or 0)
    return [(None, None), *scored]


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


def usage(job: Job, reply: Reply) -> dict:
    prompt, completion = len(job.prompt.ids), len(reply.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Renderer:
    """Turns a job's replies into OpenAI's objects: the whole response, or its stream of chunks."""

    def __init__(self, engine: Engine, job: Job, chat: bool, echoed: Sequence):
        self.engine, self.job, self.chat, self.echoed = engine, job, chat, echoed
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.sent_tokens = self.sent_chars = 0
        self.started = False  # chat: leading whitespace is dropped until the content starts
        # completions: where the next token's text starts (the text returned includes the prompt when echoed)
        self.offset = 0 if job.echo else len(job.prompt.text)

    def envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.job.request.mode.api_id,
                "choices": choices}

    def logprobs(self, reply: Reply, start: int, end: int, echoed: Sequence = ()) -> dict | None:
        """Log-probs of reply tokens start:end, after the `echoed` prompt tokens' (completions with echo)."""
        top_n = self.job.top_logprobs
        if top_n is None:
            return None
        scores = list(zip(reply.logprobs[start:end], reply.top[start:end]))
        if self.chat:
            return chat_logprobs(self.engine, reply.token_ids[start:end], scores, top_n)
        ids = [*self.job.prompt.ids[:len(echoed)], *reply.token_ids[start:end]]
        logprobs = completion_logprobs(self.engine, ids, [*echoed, *scores], self.offset, top_n)
        self.offset += sum(len(t) for t in logprobs["tokens"])
        return logprobs

    def content(self, text: str) -> str:
        if self.chat and not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text

    def whole(self, reply: Reply) -> dict:
        text = self.content(reply.text)
        logprobs = self.logprobs(reply, 0, len(reply.token_ids), self.echoed)
        choice: dict = {"index": 0, "logprobs": logprobs, "finish_reason": FINISH[reply.finish_reason]}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = (self.job.prompt.text if self.job.echo else "") + text
        return {**self.envelope("chat.completion" if self.chat else "text_completion", [choice]),
                "usage": usage(self.job, reply)}

    def first_chunk(self) -> dict | None:
        """Chat: the assistant's role; completions with echo: the prompt and its scores."""
        if self.chat:
            return self.chunk({"role": "assistant", "content": ""}, None, None)
        if self.job.echo:
            return self.chunk(self.job.prompt.text, self.logprobs(Reply(self.job.request, []), 0, 0, self.echoed), None)
        return None

    def next_chunk(self, reply: Reply) -> dict | None:
        """What reply added since the last chunk (None when nothing worth sending)."""
        start, end = self.sent_tokens, len(reply.token_ids)
        text = self.content(reply.text[self.sent_chars:])
        self.sent_tokens, self.sent_chars = end, len(reply.text)
        finish = FINISH.get(reply.finish_reason or "")
        if not text and finish is None and (self.job.top_logprobs is None or start == end):
            return None
        return self.chunk({"content": text} if self.chat else text, self.logprobs(reply, start, end), finish)

    def chunk(self, delta: dict | str, logprobs: dict | None, finish: str | None) -> dict:
        choice = {"index": 0, "delta" if self.chat else "text": delta, "logprobs": logprobs, "finish_reason": finish}
        chunk = self.envelope(self.kind, [choice])
        return {**chunk, "usage": None} if self.job.include_usage else chunk

    def usage_chunk(self, reply: Reply) -> dict:
        return {**self.envelope(self.kind, []), "usage": usage(self.job, reply)}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def respond(engine: Engine, job: Job, request: Request, chat: bool) -> Response:
    renderer = Renderer(engine, job, chat, await echo_scores(engine, job))
    updates = queue(engine, job, request)
    if not job.stream:
        reply = None
        async for reply in updates:
            pass
        if reply is None or reply.finish_reason is None:  # the client left: nobody reads an answer
            return Response(status_code=499)
        return JSONResponse(renderer.whole(reply))

    async def events() -> AsyncIterator[str]:
        if (first := renderer.first_chunk()) is not None:
            yield sse(first)
        reply = None
        async for reply in updates:
            if (chunk := renderer.next_chunk(reply)) is not None:
                yield sse(chunk)
        if reply is not None and reply.finish_reason is not None:
            if job.include_usage:
                yield sse(renderer.usage_chunk(reply))
            yield sse("[DONE]")
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- routes, access and errors ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """Who may use /v1: with a key, bearers of it; without, anyone, unless the API is off."""
    key: str | None
    enabled: bool
    off_reason: str = ""

    def check(self, request: Request) -> None:
        if not self.enabled:
            raise APIError(403, f"The API is off: {self.off_reason}", code="api_off", kind="permission_error")
        if self.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key.encode()):
            raise APIError(401, "Missing or wrong API key: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key", kind="authentication_error")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def access_for(host: str, shared: bool, key: str | None, open_api: bool) -> Access:
    """Bound beyond loopback (or shared through a public link) with no key, /v1 is off unless open_api."""
    if key or open_api or (host in LOOPBACK or host.startswith("127.")) and not shared:
        return Access(key or None, True)
    return Access(None, False, f"the server is reachable beyond this machine ({'a share link' if shared else host}) "
                               f"and has no API key: set one with {how_to_set('api_key', 'KEY')}, or serve /v1 "
                               f"to anyone with {how_to_set('open_api', '1')}.")


def describe(access: Access, url: str) -> str:
    """The start-up log line that says whether /v1 is served, and to whom."""
    if not access.enabled:
        return f"OpenAI-compatible API: off, because {access.off_reason}"
    who = "a bearer API key is required" if access.key else "no API key: anyone who can reach the server may use it"
    return f"OpenAI-compatible API: {url.rstrip('/')}/v1 ({who})"


Handler = Callable[[Request], Awaitable[Response]]


def endpoint(access: Access, handle: Handler) -> Handler:
    """A route: access checked first; refusals in OpenAI's error shape; anything unexpected a plain 500,
    logged on one line, with no traceback sent."""
    async def route(request: Request) -> Response:
        try:
            access.check(request)
            return await handle(request)
        except APIError as e:
            return e.response()
        except ServerBusy as e:
            return APIError(503, f"{str(e)[0].upper()}{str(e)[1:]}; retry after {RETRY_AFTER_S} s.", code="server_busy",
                            kind="server_error", headers={"Retry-After": str(RETRY_AFTER_S)}).response()
        except Exception as e:  # noqa: BLE001  (the last line of defence: the client gets no traceback)
            log.error("API request %s failed: %s: %s", request.url.path, type(e).__name__, e)
            return APIError(500, "The server failed on this request.", kind="server_error").response()
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


def api_app(engine: Engine, access: Access) -> Starlette:
    """The /v1 app for app.py to mount in the Gradio server."""
    created = int(time.time())

    def card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "minigpt"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [card(mode.api_id) for mode in engine.models]})

    async def model(request: Request) -> Response:
        model_id = request.path_params["model"]
        if model_id not in (mode.api_id for mode in engine.models):
            raise APIError(404, f"The model {model_id!r} does not exist.", "model", "model_not_found")
        return JSONResponse(card(model_id))

    async def completions(request: Request) -> Response:
        job = await anyio.to_thread.run_sync(read_completion, await read_body(request), engine)  # it tokenizes
        return await respond(engine, job, request, chat=False)

    async def chat_completions(request: Request) -> Response:
        job = await anyio.to_thread.run_sync(read_chat, await read_body(request), engine)
        return await respond(engine, job, request, chat=True)

    async def http_error(request: Request, e: Exception) -> Response:
        status = e.status_code if isinstance(e, HTTPException) else 500
        return APIError(status, f"{request.method} {request.url.path}: {getattr(e, 'detail', 'server error')}",
                        kind="invalid_request_error" if status < 500 else "server_error").response()

    routes = [Route("/models", endpoint(access, models)),
              Route("/models/{model:path}", endpoint(access, model)),
              Route("/completions", endpoint(access, completions), methods=["POST"]),
              Route("/chat/completions", endpoint(access, chat_completions), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
