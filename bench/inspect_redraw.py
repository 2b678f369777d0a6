"""How fast the "look inside" views redraw in the browser, for a 1,024-token conversation (a 512-token reply
after a 512-token prompt) on the GPT-2 124M shape (random weights): headless Chromium draws each view with
Plotly from the reply's numbers (reply_numbers), first when the numbers arrive, then for another selected
token, another layer and head, and with the attention sink hidden. No server is involved: the page is the
app's own panels (app.py's markup, inspect.js, Plotly) loaded from files.

    python -m bench.inspect_redraw              # 5 repetitions, medians
    python -m bench.inspect_redraw --reps 1     # a smoke test

Target: a redraw in under 100 ms. Needs Debian's Chromium at /usr/bin/chromium and Playwright.
"""
from __future__ import annotations

import argparse
import html
import os
import random
import statistics
import tempfile
from pathlib import Path

import torch

from minigpt.serve.app import HEAD, REPLY_PANEL, SCRIPTS, VIEWS_PANEL
from minigpt.serve.conversation import BASE, read_request
from minigpt.serve.engine import load_engine
from minigpt.serve.replies import Reply
from minigpt.serve.reply_numbers import as_json, reply_numbers
from tests.helpers.checkpoints import make_checkpoint

TARGET_MS = 100
FIRST_DRAW = ("document.querySelectorAll('#views_panel .chart, #views_panel .entropy, #views_panel .similarity')"
              ".forEach((el) => Plotly.purge(el)); s.drawView()")  # from an empty chart, as numbers arrive
ACTIONS = {  # what a user does, as the page's script does it
    "select another token": "s.select(s.state.position > 100 ? 50 : 300)",
    "another layer and head": "s.state.layer = (s.state.layer + 5) % 12; s.state.head = (s.state.head + 4) % 12; "
                              "s.drawView()",
    "hide / show the sink": "s.state.hideSink = !s.state.hideSink; s.drawView()",
}


def a_reply(vocab: int, prompt: int, tokens: int, seed: int = 0) -> Reply:
    """A reply record with random tokens, log-probs and top-5s: the numbers' cost and size do not depend on them."""
    rng = random.Random(seed)
    request = read_request(BASE, 0.7, 40, 0.95, tokens, 1, 1.0, context=1024)[0]
    ids = [rng.randrange(vocab) for _ in range(tokens)]
    return Reply(request, [rng.randrange(vocab) for _ in range(prompt)], token_ids=ids,
                 logprobs=[-rng.random() * 5 for _ in ids],
                 top=[[(rng.randrange(vocab), -rng.random() * 5) for _ in range(5)] for _ in ids],
                 token_times=[0.05 * (i + 1) for i in range(tokens)], finish_reason="length")


def numbers_of_a_reply(tmp: Path, prompt: int, tokens: int) -> dict:
    """The views' numbers (reply_numbers) of a_reply on a random GPT-2 124M checkpoint written into tmp, loaded
    as the app loads it (float32)."""
    folder, _ = make_checkpoint(tmp / "gpt2-random", n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    engine = load_engine(str(folder), None, "cpu", "float32", background=True)
    with torch.inference_mode():
        return reply_numbers(engine.models[BASE], engine.tokenizer, a_reply(engine.tokenizer.n_vocab, prompt, tokens))


def chromium_page(playwright, page_file: Path):
    """(browser, page): headless Debian Chromium at 1280x800 showing page_file, which may load local scripts."""
    browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                         args=["--no-sandbox", "--allow-file-access-from-files"])
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(page_file.as_uri())
    return browser, page


def page_html(payload: str) -> str:
    scripts = "".join(f'<script src="{file.as_uri()}"></script>' for file in SCRIPTS.values())
    style = f"<style>{Path(__file__).parents[1].joinpath('minigpt/serve/app.css').read_text()}</style>"
    assert HEAD  # the app loads the same two scripts
    # standards mode, as Gradio's page (in quirks mode a chart's box grows to the window's height)
    return (f"<!DOCTYPE html><html><head>{scripts}{style}</head><body style='width:560px'>{REPLY_PANEL}"
            f"{VIEWS_PANEL}<div id='inspect_data'><div class='payload'>{html.escape(payload, quote=False)}</div></div>"
            "</body></html>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        payload = as_json({**numbers_of_a_reply(Path(tmp), args.prompt, args.tokens), "key": 1})
        page_file = Path(tmp) / "views.html"
        page_file.write_text(page_html(payload), encoding="utf-8")
        print(f"{args.prompt + args.tokens}-token conversation ({args.tokens}-token reply): numbers "
              f"{len(payload) / 2**20:.1f} MiB of JSON; load average {os.getloadavg()[0]:.2f}", flush=True)
        with sync_playwright() as p:
            browser, page = chromium_page(p, page_file)
            page.wait_for_function("window.Plotly && window.minigptInspect && minigptInspect.state.data")
            timed = """async (action) => {  // ms from the change to the next painted frame
                const s = window.minigptInspect, start = performance.now();
                eval(action);
                await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
                return performance.now() - start; }"""
            print(f"{'view':10s} {'action':28s} {'ms (median)':>12s}  target {TARGET_MS} ms")
            for view in ("sampling", "lens", "attention", "timeline"):
                page.evaluate("view => { minigptInspect.state.view = view; minigptInspect.drawView(); }", view)
                rows = {"first draw": FIRST_DRAW, "select another token": ACTIONS["select another token"]}
                if view == "attention":
                    rows.update(ACTIONS)
                for name, action in rows.items():
                    ms = statistics.median(page.evaluate(timed, action) for _ in range(args.reps))
                    print(f"{view:10s} {name:28s} {ms:12.1f}  {'ok' if ms < TARGET_MS else 'OVER'}", flush=True)
            browser.close()


if __name__ == "__main__":
    main()
