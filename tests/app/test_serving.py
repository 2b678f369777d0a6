"""The app as a shared service: API requests served in arrival order, a waiting chat reply told its place,
oversized bodies refused with 413, and while hundreds of requests wait (the scheduler holds no thread for
them), the page and /config answering and a full queue refusing with 503 and Retry-After. One app, one row
decoding at a time, for the whole file."""
import asyncio
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gradio_client import Client

from tests.app.conftest import FINISHED, needs_chromium, open_page, save_screenshot
from tests.app.test_api import chat_args, history
from tests.helpers import run_async
from tests.helpers.app_server import running_app

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

MODEL = dict(n_embd=256, n_layer=4, n_head=4)  # slow enough per token that requests overlap
QUEUE = 500  # hundreds may wait


@pytest.fixture(scope="module")
def one_row(tmp_path_factory):
    """One reply decodes at a time, QUEUE more may wait: a queue builds up at once."""
    with running_app(tmp_path_factory.mktemp("one-row"), concurrency=1, app_args=["--queue-size", str(QUEUE)],
                     **MODEL) as running:
        yield running


def completion(max_tokens: int, stream: bool = True) -> dict:
    return {"model": "minigpt-base", "prompt": "The city of", "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


async def first_token_at(client: httpx.AsyncClient, url: str, max_tokens: int) -> float:
    """Send a streaming completion; the time its first token arrives (then it hangs up)."""
    async with client.stream("POST", url + "v1/completions", json=completion(max_tokens)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                return time.monotonic()
    raise AssertionError("no token arrived")


def test_api_requests_get_their_first_token_in_arrival_order(one_row):
    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = []
            for _ in range(6):  # each reply takes longer than the gap: they queue behind one another
                tasks.append(asyncio.create_task(first_token_at(client, one_row.url, 400)))
                await asyncio.sleep(0.4)
            return await asyncio.gather(*tasks)

    firsts = run_async(run())
    assert firsts == sorted(firsts)


async def whole_reply(client: httpx.AsyncClient, url: str, max_tokens: int) -> int:
    """Send a streaming completion and read it to the end; the number of chunks."""
    async with client.stream("POST", url + "v1/completions", json=completion(max_tokens)) as response:
        return sum([line.startswith("data: {") async for line in response.aiter_lines()])


def test_a_waiting_chat_reply_is_told_its_place(one_row):
    async def behind_the_api():
        async with httpx.AsyncClient(timeout=300) as client:
            ahead = [asyncio.create_task(whole_reply(client, one_row.url, 600)) for _ in range(3)]
            await asyncio.sleep(1)  # the API requests are queued first
            job = Client(one_row.url, verbose=False).submit(*chat_args(history("Hello")), api_name="/chat")
            statuses = await asyncio.to_thread(lambda: [out[1] for out in job])
            await asyncio.gather(*ahead)
            return statuses

    statuses = run_async(behind_the_api())
    waiting = [s for s in statuses if s.startswith("Waiting:")]
    assert waiting and all("ahead" in s or "next in line" in s for s in waiting), statuses
    assert "tokens" in statuses[-1] and not statuses[-1].startswith("Waiting:")


def test_an_oversized_body_is_refused_with_413_before_it_is_read(one_row):
    host, port = one_row.url.removeprefix("http://").rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:  # it says 5 MiB and sends none of it
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {5 * 2**20}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := s.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "request_too_large"


@pytest.mark.browser
@needs_chromium
def test_the_page_shows_a_waiting_reply_its_place_then_the_reply(one_row, browser):
    from playwright.sync_api import expect
    page = open_page(browser, one_row.url, 1280, 800)
    try:
        with httpx.Client(timeout=300) as client:
            ahead = ThreadPoolExecutor(3)
            holders = [ahead.submit(lambda: client.post(one_row.url + "v1/completions", json=completion(700, False)))
                       for _ in range(3)]
            time.sleep(1)  # the API's requests are first in line
            page.locator("#msg textarea").fill("What is the capital of France?")
            page.locator("#send").click()
            expect(page.locator("#stats")).to_contain_text(re.compile(r"Waiting: (\d requests? ahead|next in line)"))
            save_screenshot(page, "waiting.png", full_page=False)
            expect(page.locator("#stats")).to_contain_text(FINISHED, timeout=300_000)
            assert all(h.result().status_code == 200 for h in holders)
    finally:
        page.context.close()


async def answered_at_once(requests: list[asyncio.Task]) -> tuple[set, set]:
    """(answered, waiting): the requests answered until none has been for 5 s (a full queue's refusals come
    back at once; the requests it took wait behind the crowd)."""
    answered, waiting = await asyncio.wait(requests, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    while waiting:
        more, waiting = await asyncio.wait(waiting, timeout=5)
        if not more:
            break
        answered |= more
    return answered, waiting


def test_with_hundreds_waiting_the_page_answers_and_a_full_queue_refuses_with_503(one_row):
    """Last in this file: the crowd's requests are cancelled, and any the server has yet to drop would keep a
    later test waiting."""
    chats = Client(one_row.url, verbose=False)

    async def crowd():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=QUEUE + 100)) as client:
            post = lambda: asyncio.create_task(client.post(one_row.url + "v1/completions", json=completion(200, False)))
            waiting = [post() for _ in range(QUEUE - 50)]
            jobs = [chats.submit(*chat_args(history("Hello"), max_new_tokens=200), api_name="/chat")
                    for _ in range(20)]  # browser sessions' replies wait in the same queue
            await asyncio.sleep(3)  # all sent; most are waiting for a row
            pending = sum(not t.done() for t in waiting) + sum(not job.done() for job in jobs)
            answers = []
            for path in ("config", ""):
                started = time.monotonic()
                response = await client.get(one_row.url + path, timeout=60)
                answers.append((response.status_code, time.monotonic() - started))
            refused, accepted = await answered_at_once([post() for _ in range(60)])  # 30 places were left
            for t in waiting + list(accepted):
                t.cancel()
            for job in jobs:
                job.cancel()
            await asyncio.gather(*waiting, *accepted, return_exceptions=True)
            return pending, answers, [t.result() for t in refused], len(accepted)

    pending, answers, refused, accepted = run_async(crowd())
    chats.close()
    assert pending > 400  # they were really waiting when the page was asked for
    assert [status for status, _ in answers] == [200, 200]
    print(f"with {pending} requests waiting: /config in {answers[0][1]:.2f} s, the page in {answers[1][1]:.2f} s; "
          f"{len(refused)} of 60 more refused")
    # the queue took what fit (about 30 places: a few of the crowd's replies finish meanwhile) and refused the rest
    assert refused and accepted and len(refused) + accepted == 60
    for r in refused:
        assert r.status_code == 503 and r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "server_busy" and "busy" in r.json()["error"]["message"]
    assert "Traceback" not in one_row.log.read_text()
