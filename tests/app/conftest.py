"""What the app suites share: the session's app.py servers (SESSION_APPS) and one headless Chromium, for each
pytest worker's whole run. Each test opens its own browser context or client session, so tests stay
independent; starting a server once instead of once per module saves a model load and a Gradio start-up each."""
import os
import re
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.app_server import RunningApp, running_apps

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
FINISHED = re.compile("ended by the model|ended at the next turn|hit the token limit|stopped by you")
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Debian's Chromium at {CHROMIUM}")


# The session's two apps: the tiny checkpoint with its adapter; and the base model alone, in int8, bound beyond
# loopback with no API key (/v1 is off there, the chat is not).
SESSION_APPS = {"app": {},
                "app_without_adapter": dict(with_adapter=False, app_args=["--host", "0.0.0.0", "--precision", "int8"])}


@pytest.fixture(scope="session")
def session_apps(request, tmp_path_factory) -> dict[str, RunningApp]:
    """Those of SESSION_APPS the collected tests use, started side by side (running_apps)."""
    used = [name for name in SESSION_APPS if any(name in item.fixturenames for item in request.session.items)]
    with running_apps(*[dict(tmp=tmp_path_factory.mktemp(name), **SESSION_APPS[name]) for name in used]) as apps:
        yield dict(zip(used, apps))


@pytest.fixture(scope="session")
def app(session_apps) -> RunningApp:
    return session_apps["app"]


@pytest.fixture(scope="session")
def app_without_adapter(session_apps) -> RunningApp:
    return session_apps["app_without_adapter"]


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=60_000)  # a 2-core machine: the plot chunk and two streaming replies can be slow
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str, width: int = 1400, height: int = 1000):
    """A fresh browser context (its own Gradio session) on the app, once the chat box is there."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#msg textarea")
    return page


@pytest.fixture
def page(app, browser):
    page = open_page(browser, app.url)
    yield page
    page.context.close()


def fill_kept(page, selector: str, text: str, submit: bool = False) -> None:
    """Type text into the first box matching selector (then Enter, with submit) and wait until it keeps it.
    A box whose tab or accordion has just opened may still be taking its initial value, which replaces
    what was typed: a race only a test can lose, typing within milliseconds of the click (CI once sent
    a blank seed, and once the default token limit, this way)."""
    box = page.locator(selector).first
    for _ in range(20):
        box.fill(text)
        if submit:
            box.press("Enter")
        page.wait_for_timeout(100)
        if box.input_value() == text:
            return
    raise AssertionError(f"{selector} did not keep {text!r}")


def fill_box(page, elem_id: str, text: str) -> None:
    """A text box, #elem_id: fill_kept."""
    fill_kept(page, f"#{elem_id} textarea, #{elem_id} input", text)


def set_number(page, elem_id: str, value) -> None:
    """A slider's number box, #elem_id: fill_kept, then Enter, which the slider takes the value on."""
    fill_kept(page, f"#{elem_id} input[type=number]", str(value), submit=True)


def save_screenshot(page, name: str, full_page: bool = True) -> None:
    """With MINIGPT_SCREENSHOT=1, refresh assets/<name> (README and docs show them); otherwise nothing."""
    if os.environ.get("MINIGPT_SCREENSHOT"):
        page.wait_for_timeout(300)  # let images finish painting
        page.screenshot(path=REPO / "assets" / name, full_page=full_page)


# The app's own error elements (never model text, which may say "Error"): an error toast, or the "Error" badge
# Gradio lays over a component whose event failed.
ERROR_ELEMENTS = ".toast-body.error, [data-testid=status-tracker] .error"


def assert_no_error_shown(page) -> None:
    errors = page.locator(ERROR_ELEMENTS)
    shown = [errors.nth(i).inner_text() for i in range(errors.count()) if errors.nth(i).is_visible()]
    assert not shown, f"error elements on screen: {shown}"


def sampling_stage_titles(page) -> list[str]:
    """The Sampling view's stage names, in the order of their titles, once it is checked that the browser drew
    each title wholly inside the chart, over no other title and no axis's labels (the boxes as laid out)."""
    drawn = page.evaluate("""() => {
        const chart = document.querySelector('#view_sampling .chart');
        const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
        const titles = [...chart.querySelectorAll('.annotation-text')];
        return {chart: box(chart), titles: titles.map(box), texts: titles.map((e) => e.textContent),
                labels: [...chart.querySelectorAll('.xaxislayer-above text, .yaxislayer-above text, '
                                                   + '[class^=g-x] text, [class^=g-y] text')].map(box)}; }""")
    overlap = lambda a, b: a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    assert drawn["labels"], "no axis labels found: the check below would pass for nothing"
    left, top, right, bottom = drawn["chart"]
    titles = list(zip(drawn["texts"], drawn["titles"]))
    for k, (text, box) in enumerate(titles):
        assert left <= box[0] and box[2] <= right and top <= box[1] and box[3] <= bottom, f"{text!r} is cut off: {box}"
        for other, other_box in titles[k + 1:]:
            assert not overlap(box, other_box), f"the titles {text!r} and {other!r} overlap: {box}, {other_box}"
        hit = [label for label in drawn["labels"] if overlap(box, label)]
        assert not hit, f"the title {text!r} covers an axis's labels: {box}, {hit}"
    return [re.sub(r"[\d,]+ left$", "", text) for text, _ in titles]  # "top-k40 left": two lines' text
