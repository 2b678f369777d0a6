"""The chat app in a real browser: headless Debian Chromium driven by Playwright, against app.py serving a
tiny checkpoint and adapter. The panels beside the chat have their own tests (test_browser_inspect.py)."""
import re

import pytest

from tests.app.conftest import (
    FINISHED,
    assert_no_error_shown,
    fill_box,
    needs_chromium,
    open_page,
    sampling_stage_titles,
    save_screenshot,
    set_number,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser, needs_chromium]


def wait_for_reply(page, users_before: int) -> None:
    """Wait until the message sent after `users_before` user messages is in the chat and its reply has finished."""
    from playwright.sync_api import expect
    expect(page.locator("#chat [data-testid=user]")).to_have_count(users_before + 1)  # the input is locked now
    expect(page.locator("#send")).to_be_enabled()  # and unlocked again: the reply has finished
    expect(page.locator("#stats")).to_contain_text(FINISHED)


def watch_last_reply(page) -> None:
    """From now on the page records every text the last reply bubble shows (a MutationObserver: the page sees
    each update as it is drawn, however slowly the test process polls on a busy machine)."""
    page.evaluate("""() => { window.shown = []; const chat = document.querySelector('#chat');
        new MutationObserver(() => {
            const text = [...chat.querySelectorAll('[data-testid=bot]')].pop()?.innerText.trim() ?? '';
            if (text && text !== window.shown[window.shown.length - 1]) window.shown.push(text);
        }).observe(chat, {subtree: true, childList: true, characterData: true}); }""")


def streamed(page) -> list[str]:
    """The texts the last reply showed before its final one: a reply that streamed showed part of itself first."""
    shown = page.evaluate("window.shown")
    final = page.locator("#chat [data-testid=bot]").last.inner_text().strip()
    return [text for text in shown if text != final and final.startswith(text)]


def stop_mid_reply(page, start, stop: str, stats: str, attempts: int = 5) -> str:
    """start(attempt) sends a long reply and returns once its first tokens are on screen; then Stop is pressed.
    Returns the stats line once the reply has ended: 'stopped by you'.

    What is checked is what Stop does, not how fast: on a busy machine the reply may reach its token limit
    before the click lands, and the random model may end it (<|endoftext|>), neither of which says anything about
    Stop, so the reply is asked for again."""
    from playwright.sync_api import expect
    for attempt in range(attempts):
        start(attempt)
        page.locator(stop).dispatch_event("click")  # at once: click() waits for animation frames
        expect(page.locator(stats)).to_contain_text(FINISHED)
        line = page.locator(stats).inner_text()
        if "stopped by you" in line:
            return line
        assert "hit the token limit" in line or "ended by the model" in line, line  # ended before Stop landed
    raise AssertionError(f"every one of {attempts} long replies ended before Stop landed")


def error_badges(page, selector: str) -> int:
    """Gradio's error badges ("Error" over a component whose event failed) inside selector: the page's own
    element, not the word, which a random model can write."""
    return page.locator(f"{selector} [data-testid=status-tracker] .error").count()


def test_chat_streams_switches_mode_and_shows_the_token_and_attention_panels(page):
    from playwright.sync_api import expect
    page.get_by_role("button", name="What is the capital of France?").click()  # an example fills the box
    expect(page.locator("#msg textarea")).to_have_value("What is the capital of France?")
    watch_last_reply(page)
    page.locator("#msg textarea").press("Enter")
    expect(page.locator("#stats")).to_contain_text(FINISHED)
    assert streamed(page), f"the reply did not stream: it showed {page.evaluate('window.shown')}"
    expect(page.locator("#stats")).to_contain_text("Base GPT-2 · cpu float32")
    expect(page.locator("#send")).to_be_enabled()

    page.get_by_label("Alpaca LoRA").check()
    page.locator("#msg textarea").fill("Write a short poem about the sea.")
    page.locator("#send").click()
    wait_for_reply(page, 1)
    expect(page.locator("#stats")).to_contain_text("Alpaca LoRA")
    page.get_by_role("button", name="Prompt sent to the model").click()
    expect(page.locator("#prompt textarea")).to_have_value(re.compile(
        r"### Instruction:\nWrite a short poem about the sea\.\n\n### Input:\nUser: What is the capital"))

    tokens = page.locator("#reply_panel .tok")
    expect(tokens.first).to_be_visible()
    assert "background" in tokens.first.get_attribute("style")  # coloured by its probability band
    tokens.first.click()
    expect(page.locator("#reply_panel .caption")).to_contain_text(re.compile(r"Token 1 of \d+: chose"))
    expect(page.locator("#reply_panel .alternatives")).to_contain_text("%")

    page.locator("#tab_attention").click()
    heatmap = page.locator("#view_attention .chart.js-plotly-plot")
    expect(heatmap).to_be_visible()
    expect(page.locator("#view_attention .chart")).to_contain_text("average over heads")
    page.locator("#att_head").select_option(label="Head 2")
    expect(page.locator("#view_attention .chart")).to_contain_text("Layer 1, head 2")  # redrawn for one head


def test_markup_is_shown_as_text_and_stop_ends_a_long_reply(page):
    from playwright.sync_api import expect
    markup = '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> **not bold**'
    page.locator("#msg textarea").fill(markup)
    page.locator("#msg textarea").press("Enter")
    wait_for_reply(page, 0)
    expect(page.locator("#chat [data-testid=user]").last).to_have_text(markup)
    assert page.evaluate("window.__xss") is None
    assert page.locator("#chat img[src=x], #chat script, #chat strong").count() == 0

    set_number(page, "max_new_tokens", 512)
    users, bots = page.locator("#chat [data-testid=user]"), page.locator("#chat [data-testid=bot]")

    def start(attempt: int) -> None:
        page.locator("#msg textarea").fill("Tell me a long story.")
        page.locator("#send").click()
        expect(users).to_have_count(2 + attempt)
        expect(bots.nth(1 + attempt)).not_to_have_text("")  # streaming: its first tokens are there
    tokens = int(stop_mid_reply(page, start, "#stop", "#stats").split(" token")[0])
    assert 0 < tokens < 512
    expect(page.locator("#send")).to_be_enabled()
    settled = bots.last.inner_text()
    page.wait_for_timeout(500)
    assert bots.last.inner_text() == settled  # nothing more arrives
    # the panels describe the stopped reply, as far as it got
    expect(page.locator("#reply_panel .reply-head")).to_contain_text(f"Last reply: {tokens} tokens")
    expect(page.locator("#reply_panel .tok")).to_have_count(tokens)


def test_retry_undo_and_clear(page):
    from playwright.sync_api import expect
    bots, users = page.locator("#chat [data-testid=bot]"), page.locator("#chat [data-testid=user]")
    page.locator("#msg textarea").fill("Say something.")
    page.locator("#msg textarea").press("Enter")
    wait_for_reply(page, 0)
    first = bots.last.inner_text()

    page.locator("#retry").click()  # a fresh random seed: a new reply to the same message
    expect(bots.last).not_to_have_text(first)
    wait_for_reply(page, 0)
    expect(bots).to_have_count(1)

    page.locator("#undo").click()  # the message goes back into the box for editing
    expect(users).to_have_count(0)
    expect(page.locator("#msg textarea")).to_have_value("Say something.")

    page.locator("#msg textarea").press("Enter")
    wait_for_reply(page, 0)
    page.locator("#clear").click()
    expect(bots).to_have_count(0)
    expect(page.locator("#stats")).to_have_text("Ready · cpu float32 (C decode step)")


def send_refused(page, prefix: str, message: str, seed_text: str, refusal: str, where: str = "") -> None:
    """Send `message` with `seed_text` from the tab whose elements are #<prefix>msg, #<prefix>seed and
    #<prefix>send; the refusal shows beside the box (`where`, default #<prefix>msg_note), the message stays
    in the box, and Send is usable again."""
    from playwright.sync_api import expect
    fill_box(page, f"{prefix}seed", seed_text)
    page.locator(f"#{prefix}msg textarea").fill(message)
    page.locator(f"#{prefix}send").click()
    expect(page.locator(where or f"#{prefix}msg_note")).to_contain_text(refusal)
    expect(page.locator(f"#{prefix}msg textarea")).to_have_value(message)  # nothing is lost
    expect(page.locator(f"#{prefix}send")).to_be_enabled()


def test_refused_input_is_a_message_and_the_conversation_stays(page):
    from playwright.sync_api import expect
    page.locator("#msg textarea").fill("Hello there.")
    page.locator("#msg textarea").press("Enter")
    wait_for_reply(page, 0)
    users, bots = page.locator("#chat [data-testid=user]"), page.locator("#chat [data-testid=bot]")

    refusals = [("A seed that is not a number.", "abc", "Seed must be a number, got 'abc'."),
                ("", "", "Type a message first."),
                ("word " * 1100, "", "Your message is too long: with its template it takes")]
    for message, seed_text, refusal in refusals:
        send_refused(page, "", message, seed_text, refusal)
        expect(users).to_have_count(1)  # the conversation is still there, uncovered
        expect(users.first).to_have_text("Hello there.")
        expect(bots.first).to_be_visible()
        assert_no_error_shown(page)  # no error badge over the chat or the box, no toast
    save_screenshot(page, "refused-input.png")

    fill_box(page, "seed", "")  # and the next good message is served as usual
    page.locator("#msg textarea").fill("Thanks.")
    page.locator("#send").click()
    wait_for_reply(page, 1)


def test_without_an_adapter_the_mode_hint_says_why_and_base_mode_works(app_without_adapter, browser):
    from playwright.sync_api import expect
    assert "note: Alpaca LoRA mode is off: no adapter given." in app_without_adapter.log.read_text()  # the log too
    page = open_page(browser, app_without_adapter.url)
    expect(page.locator("#mode")).to_contain_text(re.compile(
        r"Alpaca LoRA is off: no adapter given\. Train one with\s*python -m lora\.train\s*or pass\s*--adapter"))
    expect(page.get_by_label("Alpaca LoRA")).to_be_disabled()
    page.locator("#msg textarea").fill("Hello.")
    page.locator("#msg textarea").press("Enter")
    wait_for_reply(page, 0)
    save_screenshot(page, "no-adapter.png")
    page.context.close()


def test_the_model_card_shows_the_precision_and_its_measured_cost(app_without_adapter, browser):
    from playwright.sync_api import expect
    log = app_without_adapter.log.read_text()
    assert re.search(r"Precision: int8 · weights \d+ MB \(float32: \d+ MB\) · against float32", log), log
    page = open_page(browser, app_without_adapter.url)
    page.locator("#model_card").get_by_text("Model card").click()
    card = page.locator("#model_card")
    expect(card).to_contain_text("GPT-2, 2 layers × 64 wide")
    expect(card).to_contain_text("cpu int8")
    expect(card).to_contain_text(re.compile(r"int8 · weights \d+ MB \(float32: \d+ MB\) · against float32, over the "
                                            r"\d+ positions of a built-in text: KL divergence .+ per token, the same "
                                            r"top token at \d+\.\d% of them"))
    save_screenshot(page, "model-card.png")
    page.context.close()


def test_more_sampling_answers_as_json_and_the_sampling_view_shows_its_stages(page):
    """The chat's "Answer as JSON matching this schema" with every other stage of the sampler on too: the
    reply parses and validates against the schema in the box, and the Sampling view draws all eleven stages
    with their titles apart, at 1280x800 and on a 390x844 phone."""
    import json

    import jsonschema
    from playwright.sync_api import expect

    from minigpt.serve.app import EXAMPLE_SCHEMA
    page.get_by_role("button", name="More sampling").click()
    set_number(page, "min_p", 0.01)
    set_number(page, "repetition_penalty", 1.3)
    set_number(page, "presence_penalty", 0.2)
    set_number(page, "frequency_penalty", 0.1)
    fill_box(page, "logit_bias", '{"50256": -1}')
    page.locator("#as_json input").check()
    fill_box(page, "msg", "Is the sea blue?")
    page.locator("#send").click()
    wait_for_reply(page, 0)
    expect(page.locator("#stats")).to_contain_text("ended by the model")  # the document was complete
    reply = page.locator("#chat [data-testid=bot]").last.inner_text()
    jsonschema.validate(json.loads(reply), json.loads(EXAMPLE_SCHEMA))
    page.locator("#tab_sampling").click()
    expect(page.locator("#view_sampling .note")).to_contain_text("repetition penalty 1.3")
    for width, height, screenshot in ((1280, 800, "json-answer.png"), (390, 844, "phone-json-answer.png")):
        page.set_viewport_size({"width": width, "height": height})  # the view redraws for the new width
        page.wait_for_function("""(() => { const chart = document.querySelector('#view_sampling .chart');
            const svg = chart.querySelector('.main-svg');  // drawn for the chart's present width
            return svg && Math.abs(svg.getBoundingClientRect().width - chart.clientWidth) < 2; })()""")
        assert sampling_stage_titles(page) == [
            "raw", "JSON grammar", "logit bias", "repetition penalty", "frequency penalty", "presence penalty",
            "temperature", "top-k", "top-p", "min-p", "renormalised"], f"at {width}x{height}"
        save_screenshot(page, screenshot)
