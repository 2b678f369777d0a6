"""The "look inside" panels in a real browser (headless Chromium, Playwright) at 1280x800: the layout, one
selected token across every view, each view, clicks on figures, branching, export and load.
Screenshots go to assets/ (inspect-*.png; MINIGPT_SCREENSHOT=1 also refreshes assets/screenshot.png)."""
import json
import re

import pytest

from tests.app.conftest import FINISHED, fill_box, needs_chromium, open_page, save_screenshot, set_number

pytestmark = [pytest.mark.slow, pytest.mark.browser, needs_chromium]


@pytest.fixture(scope="module")
def page(app, browser):
    """One page at 1280x800 for the whole module: each test goes on from the last one's reply."""
    page = open_page(browser, app.url, 1280, 800)
    yield page
    page.context.close()


def in_viewport(page, selector: str) -> bool:
    box = page.locator(selector).bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 800 and box["x"] + box["width"] <= 1280


def click_image_cell(page, selector: str, fx: float, fy: float) -> None:
    """Click an image at a fraction of its displayed size."""
    box = page.locator(f"{selector} img").bounding_box()
    page.locator(f"{selector} img").click(position={"x": box["width"] * fx, "y": box["height"] * fy})


def test_panels_sit_beside_the_chat_and_follow_one_selected_token(page):
    from playwright.sync_api import expect
    fill_box(page, "seed", "7")
    set_number(page, "max_new_tokens", 24)
    page.locator("#msg textarea").fill("What is the capital of France?")
    page.locator("#msg textarea").press("Enter")
    expect(page.locator("#stats")).to_contain_text(FINISHED)
    expect(page.locator("#pipeline_note")).to_contain_text("Tokens left at each stage: raw: 50,257")
    page.evaluate("window.scrollTo(0, 0)")  # as the page opens
    for selector in ("#chat", "#msg textarea", "#tokens", "#alternatives", "#views [role=tablist]"):
        assert in_viewport(page, selector), f"{selector} is not on screen at 1280x800 without scrolling"
    save_screenshot(page, "screenshot.png", full_page=False)
    save_screenshot(page, "inspect-sampling.png", full_page=False)

    tokens = page.locator("#tokens .textfield .token")
    expect(tokens).to_have_count(24)
    note = page.locator("#pipeline_note").inner_text()
    tokens.nth(2).click()  # one click: the caption, the slider and the sampling view all move to token 3
    expect(page.locator("#caption")).to_contain_text("Token 3 of 24")
    expect(page.locator("#position input[type=number]")).to_have_value("3")
    expect(page.locator("#pipeline_note")).not_to_have_text(note)
    expect(page.locator("#pipeline [data-testid=matplotlib] img")).to_be_visible()

    page.get_by_role("tab", name="Logit lens").click()
    expect(page.locator("#lens img")).to_be_visible()
    table = page.locator("#lens_table")
    expect(table).to_contain_text("What each layer predicts")
    expect(table).to_contain_text("embeddings")
    before = table.inner_text()
    click_image_cell(page, "#lens", 0.75, 0.5)  # a column to the right of token 3's: a later reply token
    expect(table).not_to_have_text(before)
    expect(page.locator("#caption")).not_to_contain_text("Token 3 of 24")
    save_screenshot(page, "inspect-logit-lens.png")

    page.get_by_role("tab", name="Attention").click()
    expect(page.locator("#entropy img")).to_be_visible()
    expect(page.locator("#similarity img")).to_be_visible()
    heatmap = page.locator("#heatmap [data-testid=matplotlib] img")
    expect(heatmap).to_be_visible()
    click_image_cell(page, "#entropy", 0.55, 0.75)  # layer 2, a head in the middle
    expect(page.locator("#head input")).to_have_value(re.compile(r"Head \d"))
    expect(page.locator("#layer input")).to_have_value("Layer 2")
    page.locator("#hide_sink input").check()
    expect(page.locator("#attention_note")).to_contain_text("first token is hidden")
    save_screenshot(page, "inspect-attention.png")

    page.get_by_role("tab", name="Timeline").click()
    expect(page.locator("#timeline img")).to_be_visible()
    expect(page.locator("#timeline_note")).to_contain_text("tokens/s")
    click_image_cell(page, "#timeline", 0.5, 0.5)
    expect(page.locator("#caption")).to_contain_text(re.compile(r"Token 1[0-5] of 24"))
    save_screenshot(page, "inspect-timeline.png")


def test_branch_from_an_alternative_undo_export_and_load(page, tmp_path):
    from playwright.sync_api import expect
    bot = page.locator("#chat [data-testid=bot]").last
    original = bot.inner_text()
    page.locator("#tokens .textfield .token").nth(4).click()
    expect(page.locator("#caption")).to_contain_text("Token 5 of 24")
    page.locator("#alternatives .confidence-set").nth(1).click()  # the second most likely token at position 5
    expect(page.locator("#stats")).to_contain_text("Branched at token 5")
    assert bot.inner_text() != original
    expect(page.locator("#caption")).to_contain_text("Token 5 of")
    save_screenshot(page, "inspect-branch.png", full_page=False)
    page.locator("#undo_branch").click()
    expect(bot).to_have_text(original)

    page.get_by_role("tab", name="Export").click()
    page.locator("#export").click()
    link = page.locator("#export_file a").first
    expect(link).to_be_visible()
    data = json.loads(page.request.get(link.get_attribute("href")).text())
    assert data["seed"] == 7 and len(data["reply"]["tokens"]) == 24
    assert all(len(t["top"]) == 5 for t in data["reply"]["tokens"])
    exported = tmp_path / "conversation.json"
    exported.write_text(json.dumps(data))

    page.locator("#clear").click()
    expect(page.locator("#chat [data-testid=bot]")).to_have_count(0)
    page.locator("#load_file input[type=file]").set_input_files(str(exported))
    expect(page.locator("#export_note")).to_contain_text("Loaded 2 messages")
    expect(page.locator("#chat [data-testid=bot]")).to_have_text(original)
    expect(page.locator("#tokens .textfield .token")).to_have_count(24)
    save_screenshot(page, "inspect-export.png")

    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"hello": "world"}')
    page.locator("#load_file button[aria-label='Clear']").first.click()
    page.locator("#load_file input[type=file]").set_input_files(str(foreign))
    expect(page.locator("#export_note")).to_contain_text("Could not load: not a MiniGPT conversation")
    expect(page.locator("#tokens .textfield .token")).to_have_count(24)  # the loaded reply is still there
