"""The OpenAI-compatible API's share of the load test (bench/load.py): streaming clients on the official
openai client, some of which hang up mid-stream, and the checks on what they received.

Each API client streams several turns, alternating /v1/chat/completions (its own growing conversation)
and /v1/completions, and minigpt-base and minigpt-tuned, with seeded sampling. Client i % 4 == 3 drops
its connection after the first chunk of its last turn. A completed stream must be well-formed: chunks
from one id, finish_reason only on the last, stop or length, usage as the last chunk, and its text the
same as a non-streamed replay with the same seed (so no other request's tokens reached it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import openai

LONG_REPLY = 256  # a stream that will be dropped is long, so it is still running then


@dataclass
class ApiRequest:
    client: int
    turn: int
    args: dict  # the create() arguments, stream excluded
    chat: bool
    action: str = "finish"  # finish or disconnect
    outcome: str = ""  # done, disconnected, error: ...
    chunks: list = field(default_factory=list)
    first_token_s: float | None = None
    tokens: int = 0


def api(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)


def warm_up(url: str) -> None:
    """One short streamed completion and chat completion, from this thread, before the clients' threads
    start: the openai client builds its response models' pydantic schemas on first use, and threads doing
    that at once can fail ("type object 'Choice' has no attribute '__pydantic_core_schema__'")."""
    client = api(url)
    for create, prompt in ((client.completions.create, {"prompt": "Hi"}),
                           (client.chat.completions.create, {"messages": [{"role": "user", "content": "Hi"}]})):
        for _ in create(model="minigpt-base", max_tokens=1, stream=True, stream_options={"include_usage": True},
                        **prompt):
            pass
    client.close()


def text_of(choice, chat: bool) -> str:
    if chat:
        return (choice.message.content if hasattr(choice, "message") else choice.delta.content) or ""
    return choice.text


def run_api_client(url: str, index: int, turns: int, max_new_tokens: int, requests: list, lock) -> None:
    client = api(url)
    messages: list[dict] = []
    for turn in range(turns):
        chat = (index + turn) % 2 == 0
        action = "disconnect" if index % 4 == 3 and turn == turns - 1 else "finish"
        args = dict(model=("minigpt-base", "minigpt-tuned")[index % 2], temperature=0.9, top_p=0.95,
                    seed=index * 100 + turn, max_tokens=max_new_tokens if action == "finish" else LONG_REPLY,
                    extra_body={"top_k": 50})
        if chat:
            messages = [*messages, {"role": "user", "content": f"API client {index}, turn {turn}: tell me more."}]
            args["messages"] = messages
        else:
            args["prompt"] = f"API client {index} writes, turn {turn}:"
        request = ApiRequest(index, turn, args, chat, action)
        with lock:
            requests.append(request)
        try:
            stream(client, request)
        except Exception as e:  # recorded, reported and counted as a failure
            request.outcome = f"error: {type(e).__name__}: {e}"
        if chat and request.outcome == "done":
            messages = [*messages, {"role": "assistant", "content": streamed_text(request)}]
    client.close()


def stream(client: openai.OpenAI, request: ApiRequest) -> None:
    create = client.chat.completions.create if request.chat else client.completions.create
    start = time.perf_counter()
    chunks = create(**request.args, stream=True, stream_options={"include_usage": True})
    for chunk in chunks:
        request.chunks.append(chunk)
        if request.first_token_s is None and chunk.choices and text_of(chunk.choices[0], request.chat):
            request.first_token_s = time.perf_counter() - start
            if request.action == "disconnect":
                chunks.close()  # hang up mid-stream
                request.outcome = "disconnected"
                return
    request.outcome = "done"
    request.tokens = request.chunks[-1].usage.completion_tokens if request.chunks[-1].usage else 0


def streamed_text(request: ApiRequest) -> str:
    return "".join(text_of(c.choices[0], request.chat) for c in request.chunks if c.choices)


def check_api_requests(url: str, requests: list[ApiRequest]) -> list[str]:
    """Problems: failed requests, malformed streams, streams unlike a non-streamed replay."""
    problems = [f"API client {r.client} turn {r.turn}: {r.outcome}" for r in requests if r.outcome.startswith("error")]
    client = api(url)
    for r in requests:
        if r.outcome != "done":
            continue
        name = f"API client {r.client} turn {r.turn}"
        with_choices = [c for c in r.chunks if c.choices]
        finishes = [c.choices[0].finish_reason for c in with_choices]
        if len({c.id for c in r.chunks}) != 1 or not with_choices or finishes[-1] not in ("stop", "length") \
                or any(finishes[:-1]) or r.chunks[-1].choices or r.chunks[-1].usage is None:
            problems.append(f"{name}: a malformed stream (finish reasons {finishes}, last chunk {r.chunks[-1]})")
            continue
        create = client.chat.completions.create if r.chat else client.completions.create
        solo = create(**r.args)
        if text_of(solo.choices[0], r.chat) != streamed_text(r) or solo.usage != r.chunks[-1].usage:
            problems.append(f"{name}: streamed {streamed_text(r)!r} differs from the replay "
                            f"{text_of(solo.choices[0], r.chat)!r}")
    client.close()
    return problems
