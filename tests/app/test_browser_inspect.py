"""The "look inside" panels in a real browser (headless Chromium, Playwright): charts drawn in the page from
the numbers sent once per reply (no server call on a click), one state for the conversation (each action x
each view), errors beside their control, and the layout at 1280x800 and on a 390x844 phone.
Screenshots go to assets/ with MINIGPT_SCREENSHOT=1 (inspect-*.png, screenshot.png, phone-*.png)."""
import json
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
VIEWS = ("sampling", "lens", "attention", "timeline")


@pytest.fixture(scope="module")
def page(app, browser):
    """One page at 1280x800 for the whole module: each test goes on from the last one's reply."""
    page = open_page(browser, app.url, 1280, 800)
    yield page
    page.context.close()


def in_viewport(page, selector: str, width: int = 1280, height: int = 800) -> bool:
    box = page.locator(selector).first.bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= height and box["x"] + box["width"] <= width


def send(page, message: str) -> int:
    """Send a message, wait for the reply and its panels; the reply's token count (from the stats line)."""
    from playwright.sync_api import expect
    page.locator("#msg textarea").fill(message)
    page.locator("#msg textarea").press("Enter")
    expect(page.locator("#stats")).to_contain_text(FINISHED)
    n = int(page.locator("#stats").inner_text().split(" token")[0])
    expect(page.locator("#reply_panel .tok")).to_have_count(n)
    return n


def views_say(page, texts: dict[str, str | re.Pattern]) -> None:
    """Open each view in turn: its note says texts[view]."""
    from playwright.sync_api import expect
    for view in VIEWS:
        page.locator(f"#tab_{view}").click()
        expect(page.locator(f"#view_{view} .note")).to_contain_text(texts[view])
    page.locator("#tab_sampling").click()


def views_describe(page, n: int, position: int) -> None:
    """Every view is about the panels' reply of n tokens, token `position` selected."""
    from playwright.sync_api import expect
    expect(page.locator("#reply_panel .reply-head")).to_contain_text(f"Last reply: {n} tokens")
    expect(page.locator("#reply_panel .caption")).to_contain_text(f"Token {position} of {n}")
    views_say(page, {"sampling": "Tokens left at each stage", "lens": f"Token {position}: what each layer predicts",
                     "attention": re.compile(rf"Rows: (all {n} reply tokens|reply tokens \d+-\d+ of {n}) "
                                             rf"\(token {position} outlined"),
                     "timeline": re.compile(r"Prompt \(\d+ tokens\) \+ first token|No timings")})


def views_are_empty(page, note: str) -> None:
    from playwright.sync_api import expect
    expect(page.locator("#reply_panel .reply-head")).to_have_text(note)
    expect(page.locator("#reply_panel .tok")).to_have_count(0)
    views_say(page, dict.fromkeys(VIEWS, note))
    assert page.locator("#views_panel .main-svg").count() == 0  # no chart of a reply that is gone


def exported(page) -> dict:
    from playwright.sync_api import expect
    if not page.locator("#export").is_visible():
        page.get_by_role("button", name="Export or load the conversation").click()
    link = page.locator("#export_file a").first
    before = link.get_attribute("href") if link.count() else None
    page.locator("#export").click()
    expect(link).to_be_visible()
    if before:
        expect(link).not_to_have_attribute("href", before)  # this export's file, not the last one's
    return json.loads(page.request.get(link.get_attribute("href")).text())


def test_views_are_drawn_in_the_browser_and_a_click_asks_the_server_nothing(page):
    from playwright.sync_api import expect
    fill_box(page, "seed", "7")
    set_number(page, "max_new_tokens", 48)
    n = send(page, "What is the capital of France?")
    page.evaluate("window.scrollTo(0, 0)")  # as the page opens
    for selector in ("#chat", "#msg textarea", "#mode", "#reply_panel .tokens", "#reply_panel .alternatives",
                     "#view_sampling .chart.js-plotly-plot"):
        assert in_viewport(page, selector), f"{selector} is not on screen at 1280x800 without scrolling"
    assert page.evaluate("(e => e.scrollHeight <= e.clientHeight + 1)(document.querySelector('#reply_panel .tokens'))"), \
        "the last reply's tokens do not all show"
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    save_screenshot(page, "screenshot.png", full_page=False)
    save_screenshot(page, "inspect-sampling.png", full_page=False)

    requests = []
    page.on("request", lambda r: requests.append(r.url) if "/gradio_api/" in r.url and "heartbeat" not in r.url else None)
    views_describe(page, n, n)  # the last token is selected after a reply
    note = page.locator("#view_sampling .note").inner_text()
    page.locator("#reply_panel .tok").nth(2).click()  # one click: the caption, the alternatives and every view
    views_describe(page, n, 3)
    assert page.locator("#view_sampling .note").inner_text() != note
    page.locator("#reply_panel").press("ArrowRight")
    expect(page.locator("#reply_panel .caption")).to_contain_text(f"Token 4 of {n}")
    assert sampling_stage_titles(page) == ["raw", "temperature", "top-k", "top-p", "renormalised"]  # as the data names them

    page.locator("#tab_lens").click()
    lens = page.locator("#view_lens .chart.js-plotly-plot")
    expect(lens).to_be_visible()
    page.locator("#view_lens .chart .nsewdrag").first.scroll_into_view_if_needed()
    box = page.locator("#view_lens .chart .nsewdrag").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.8)  # hover: the exact numbers
    expect(page.locator("#view_lens .hovertext")).to_contain_text(re.compile(r"p\(it\) = .*, rank \d+"))
    expect(page.locator("#view_lens .lens-table")).to_contain_text("embeddings")
    assert "layer read out" in lens.inner_text() and "p(token that" in lens.inner_text()  # axis and legend titles
    save_screenshot(page, "inspect-logit-lens.png", full_page=False)

    page.locator("#tab_attention").click()
    chart = page.locator("#view_attention .chart")
    expect(chart).to_contain_text("Layer 1, average over heads")
    page.locator("#att_layer").select_option(label="Layer 2")
    page.locator("#att_head").select_option(label="Head 3")
    expect(chart).to_contain_text("Layer 2, head 3")
    expect(page.locator("#view_attention .similarity")).to_contain_text("Layer 2: head similarity")
    page.locator("#att_sink").check()
    expect(page.locator("#view_attention .note")).to_contain_text("first token is hidden")
    page.locator("#view_attention .chart .nsewdrag").first.scroll_into_view_if_needed()
    box = page.locator("#view_attention .chart .nsewdrag").first.bounding_box()
    for dx in (0, 2):  # the cell under the pointer, in the last row (every key of its window is in its past)
        page.mouse.move(box["x"] + box["width"] * 0.5 + dx, box["y"] + box["height"] - 4)
    expect(page.locator("#view_attention .hovertext").first).to_contain_text(re.compile(r"looks at .*p = \d"))
    save_screenshot(page, "inspect-attention.png")
    page.locator("#att_sink").uncheck()

    page.locator("#tab_timeline").click()
    bars = page.locator("#view_timeline .bars .point")
    expect(bars).to_have_count(n)
    bars.nth(9).scroll_into_view_if_needed()
    box = bars.nth(9).bounding_box()
    plot = page.locator("#view_timeline .nsewdrag").first.bounding_box()  # log scale: bars reach below the axes
    x, y = box["x"] + box["width"] / 2, plot["y"] + plot["height"] - 4
    page.mouse.move(x - 1, y)
    page.mouse.move(x, y)  # Plotly reports the click on the point it hovers
    expect(page.locator("#view_timeline .hovertext")).to_contain_text("token 10:")
    page.mouse.click(x, y)  # a bar selects its token
    expect(page.locator("#reply_panel .caption")).to_contain_text(f"Token 10 of {n}")
    save_screenshot(page, "inspect-timeline.png", full_page=False)
    page.locator("#tab_sampling").click()
    page.wait_for_timeout(300)
    assert requests == [], f"a click in the views asked the server: {requests}"
    assert_no_error_shown(page)


def test_every_action_leaves_every_view_about_the_chats_last_reply(page, tmp_path):
    from playwright.sync_api import expect
    bot = page.locator("#chat [data-testid=bot]").last
    n = page.locator("#reply_panel .tok").count()

    page.locator("#undo").click()  # the reply is gone: so are its panels, its stats and its export
    views_are_empty(page, "The reply these panels showed was undone.")
    expect(page.locator("#stats")).to_contain_text(re.compile(r"^\s*Ready · "))
    page.get_by_role("button", name="Export or load the conversation").click()
    page.locator("#export").click()
    expect(page.locator("#export_note")).to_contain_text("Nothing to export")

    n = send(page, page.locator("#msg textarea").input_value())  # Undo put the message back in the box
    views_describe(page, n, n)
    original = bot.inner_text()
    page.locator("#reply_panel .tok").nth(4).click()
    page.locator("#reply_panel .alt").nth(1).click()  # the second most likely token at position 5: branch
    expect(page.locator("#stats")).to_contain_text("Branched at token 5")
    expect(page.locator("#reply_panel .caption")).to_contain_text("Token 5 of")
    branched = int(page.locator("#stats").inner_text().split(": ")[1].split(" token")[0])
    views_describe(page, branched, 5)
    assert bot.inner_text() != original
    data = exported(page)
    assert data["conversation"][-1]["content"] == data["reply"]["text"].strip()  # the export agrees with itself
    assert len(data["reply"]["tokens"]) == branched
    save_screenshot(page, "inspect-branch.png", full_page=False)

    page.locator("#reply_panel .undo-branch").click()
    expect(bot).to_have_text(original)
    views_describe(page, n, n)
    expect(page.locator("#reply_panel .undo-branch")).to_be_disabled()  # nothing more to undo
    expect(page.locator("#stats")).not_to_contain_text("Branched")

    page.get_by_label("Alpaca LoRA").check()  # the panels still describe the reply, and say which model drew it
    expect(page.locator("#reply_panel .reply-head")).to_contain_text("from Base GPT-2")
    views_describe(page, n, n)
    page.get_by_label("Base GPT-2").check()

    data = exported(page)
    assert data["reply"]["text"].strip() == original and len(data["reply"]["tokens"]) == n
    assert "scale" in data and data["seed"] == 7
    saved = tmp_path / "conversation.json"
    saved.write_text(json.dumps(data))
    page.locator("#clear").click()
    expect(page.locator("#chat [data-testid=bot]")).to_have_count(0)
    views_are_empty(page, "No reply yet: send a message, or load a conversation under Export.")

    page.locator("#load_file input[type=file]").set_input_files(str(saved))
    expect(page.locator("#export_note")).to_contain_text("Loaded 2 messages")
    expect(page.locator("#chat [data-testid=bot]")).to_have_text(original)
    expect(page.locator("#stats")).to_contain_text("Loaded from a file")
    views_describe(page, n, n)
    save_screenshot(page, "inspect-export.png")

    page.locator("#retry").click()  # a new reply to the same message: the panels follow it
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#stats")).to_contain_text(FINISHED)
    expect(page.locator("#send")).to_be_enabled()
    retried = int(page.locator("#stats").inner_text().split(" token")[0])
    views_describe(page, retried, retried)
    assert_no_error_shown(page)


def test_errors_show_beside_their_control_and_the_conversation_stays(page, tmp_path):
    from playwright.sync_api import expect
    bots = page.locator("#chat [data-testid=bot]").count()
    fill_box(page, "seed", "abc")
    page.locator("#msg textarea").fill("Another question.")
    page.locator("#send").click()
    expect(page.locator("#msg_note")).to_contain_text("Seed must be a number, got 'abc'.")
    expect(page.locator("#chat [data-testid=bot]")).to_have_count(bots)
    expect(page.locator("#reply_panel .tok").first).to_be_visible()  # the panels stay too
    assert_no_error_shown(page)
    fill_box(page, "seed", "7")

    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"hello": "world"}')
    if not page.locator("#load_file").is_visible():
        page.get_by_role("button", name="Export or load the conversation").click()
    page.locator("#load_file button[aria-label='Clear']").first.click()
    page.locator("#load_file input[type=file]").set_input_files(str(foreign))
    expect(page.locator("#export_note")).to_contain_text("Could not load: not a MiniGPT conversation")
    expect(page.locator("#reply_panel .tok").first).to_be_visible()  # the reply on screen is still there
    assert_no_error_shown(page)


def test_on_a_phone_the_chat_send_model_and_tokens_come_first_and_every_view_fits(app, browser):
    from playwright.sync_api import expect
    page = open_page(browser, app.url, 390, 844)
    fill_box(page, "seed", "7")
    set_number(page, "max_new_tokens", 24)
    page.evaluate("window.scrollTo(0, 0)")
    send(page, "Hello!")
    order = [page.locator(s).first.bounding_box()["y"] for s in ("#mode", "#chat", "#send", "#reply_panel",
                                                                 "#views_panel", "#temperature")]
    assert order == sorted(order), f"the phone layout's order is off: {order}"
    for view in VIEWS:
        page.locator(f"#tab_{view}").click()
        expect(page.locator(f"#view_{view} .chart.js-plotly-plot")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, f"{view} is wider than the phone"
        if view == "lens":
            table = page.locator("#view_lens .lens-table").bounding_box()
            assert table["x"] >= 0 and table["x"] + table["width"] <= 390  # the table fits its column
    page.locator("#tab_sampling").click()
    assert len(sampling_stage_titles(page)) == 5
    save_screenshot(page, "phone-chat.png")
    page.locator("#tab_attention").click()
    page.locator("#views_panel").scroll_into_view_if_needed()
    save_screenshot(page, "phone-attention.png", full_page=False)
    page.context.close()
