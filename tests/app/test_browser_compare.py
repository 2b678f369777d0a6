"""The Compare and Score tabs and the LoRA scale slider in a real browser (headless Chromium, Playwright),
against app.py serving a tiny checkpoint and adapter; transformers, peft and the perplexity CLI as oracles.
Set MINIGPT_SCREENSHOT=1 to refresh assets/compare.png, assets/scale.png and assets/score.png."""
import json
import re

import pytest
import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from minigpt import perplexity
from tests.app.conftest import FINISHED, fill_box, needs_chromium, save_screenshot, set_number
from tests.app.test_browser import error_badges, stop_mid_reply, wait_for_reply

pytestmark = [pytest.mark.slow, pytest.mark.browser, needs_chromium]


def test_both_sides_stream_each_stops_alone_and_the_diff_follows(page):
    from playwright.sync_api import expect
    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Settings (both sides)").click()
    set_number(page, "cmp_max_new_tokens", 500)  # a long pair; stop the base side
    tuned = page.locator("#cmp_tuned_stats")

    def stop_tuned_too() -> None:
        """The tuned side may stream on for minutes on a busy machine: it is stopped once it has had its chance."""
        if not FINISHED.search(tuned.inner_text()):
            page.locator("#cmp_tuned_stop").dispatch_event("click")
        expect(page.locator("#cmp_send")).to_be_enabled()

    def start(attempt: int) -> None:
        if attempt:
            stop_tuned_too()
        page.locator("#cmp_msg textarea").fill("Tell me a long story.")
        fill_box(page, "cmp_seed", str(100 + attempt))
        page.locator("#cmp_send").click()
        expect(page.locator("#cmp_note")).to_contain_text(f"Both sides: seed {100 + attempt}, LoRA scale 1")
        expect(page.locator("#cmp_base textarea")).not_to_have_value("")  # streaming: now stop it
    stop_mid_reply(page, start, "#cmp_base_stop", "#cmp_base_stats")
    assert "stopped" not in tuned.inner_text()  # the base side's Stop left the tuned side alone
    stop_tuned_too()

    set_number(page, "cmp_max_new_tokens", 96)  # several frames (replies.FRAME_S) even on a fast machine
    page.locator("#cmp_msg textarea").fill("Write a short poem about the sea.")
    fill_box(page, "cmp_seed", "5")
    # Every value the page gives either side's box, recorded by the box's own value setter from before Send: a
    # poll from the test process needs a round trip per sample, and a timer in the page (every 10 ms) fired 16
    # times in a whole reply when the suite's other worker kept the machine busy. The first send's texts stand
    # still until this send clears them.
    page.evaluate("""() => { window.lengths = {base: [], tuned: []};
        const value = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value');
        Object.defineProperty(HTMLTextAreaElement.prototype, 'value', {configurable: true,
            get() { return value.get.call(this); },
            set(text) { value.set.call(this, text);
                const side = this.closest('#cmp_base, #cmp_tuned')?.id.slice(4);
                if (side) window.lengths[side].push(text.length); }}); }""")
    page.locator("#cmp_send").click()
    expect(page.locator("#cmp_note")).to_contain_text("seed 5,")  # this send's outputs were cleared
    for key in ("base", "tuned"):
        expect(page.locator(f"#cmp_{key}_stats")).to_contain_text(FINISHED)
    lengths = page.evaluate("window.lengths")
    for key, seen in lengths.items():  # a side that streamed showed part of its reply before the whole
        final = len(page.locator(f"#cmp_{key} textarea").input_value())
        assert any(0 < n < final for n in seen), f"{key} did not stream: {seen}"
    expect(page.locator("#cmp_base_stats")).to_contain_text("Base GPT-2 · cpu float32")
    expect(page.locator("#cmp_tuned_stats")).to_contain_text("Alpaca LoRA · cpu float32")
    expect(page.locator("#cmp_note")).to_have_text("Both sides: seed 5, LoRA scale 1.")
    expect(page.locator("#cmp_send")).to_be_enabled()
    expect(page.locator("#cmp_send")).to_have_text("Send to both")  # the side that ended first changed nothing

    page.locator("#diff_btn").click()
    expect(page.locator("#diff_summary")).to_contain_text(re.compile(
        r"Alpaca LoRA's reply, \d+ tokens, scored by both models.*Mean log-prob: base -\d+\.\d+, tuned -\d+\.\d+"))
    tokens = page.locator("#diff_tokens .textfield .token")
    expect(tokens.first).to_be_visible()
    n_tokens = int(re.search(r"reply, (\d+) tokens", page.locator("#diff_summary").inner_text()).group(1))
    assert tokens.count() == n_tokens
    assert "background" in tokens.first.get_attribute("style")
    chart = page.locator("#diff_chart .js-plotly-plot")
    expect(chart).to_be_visible()
    assert chart.locator(".bars .point").count() == n_tokens  # one bar per token, drawn by Plotly in the page
    assert "tuned − base (nats)" in chart.inner_text() and "KL(tuned ‖ base)" in chart.inner_text()
    expect(page.locator("#diff_ranked")).to_contain_text("base top-5")
    expect(page.locator("#diff_ranked")).to_contain_text("%")  # a random adapter changes the top-1 somewhere
    save_screenshot(page, "compare.png")

def test_lora_scale_0_in_the_chat_answers_exactly_as_the_base_model(page, app):
    from playwright.sync_api import expect
    page.get_by_label("Alpaca LoRA").check()
    set_number(page, "temperature", 0)
    set_number(page, "max_new_tokens", 16)
    set_number(page, "scale", 0)
    page.locator("#msg textarea").fill("Name a colour.")
    page.locator("#send").click()
    wait_for_reply(page, 0)
    expect(page.locator("#stats")).to_contain_text("Alpaca LoRA at scale 0 · cpu float32")
    page.get_by_role("button", name="Prompt sent to the model").click()
    prompt = page.locator("#prompt textarea").input_value()
    reply = page.locator("#chat [data-testid=bot]").last.inner_text()
    tokenizer = GPT2TokenizerFast.from_pretrained(app.checkpoint)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    base = GPT2LMHeadModel.from_pretrained(app.checkpoint).eval()
    tuned = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(app.checkpoint), app.adapter).eval()
    with torch.no_grad():
        expected, at_one = (tokenizer.decode(m.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=50256)
                                             [0, ids.size(1):], skip_special_tokens=True) for m in (base, tuned))
    assert expected.strip().startswith(reply.strip()) and reply.strip()
    assert at_one.strip() != expected.strip()  # the adapter does change this reply at scale 1
    save_screenshot(page, "scale.png")


def test_score_tab_shows_the_perplexity_the_cli_prints(page, app, tmp_path, capsys):
    from playwright.sync_api import expect
    text = "The sea was calm. Instruction tuning changes what a model expects to read next."
    (tmp_path / "text.txt").write_text(text)
    page.get_by_role("tab", name="Score").click()
    page.locator("#score_text textarea").fill(text)
    set_number(page, "score_scale", 0.5)
    page.locator("#score_btn").click()
    expect(page.locator("#score_summary")).to_contain_text("tokens scored")
    summary = page.locator("#score_summary").inner_text()
    for extra, label in (([], "Base GPT-2"), (["--adapter", str(app.adapter), "--lora-scale", "0.5"], "Alpaca LoRA")):
        assert perplexity.main(["--model", str(app.checkpoint), "--file", str(tmp_path / "text.txt"), "--device", "cpu",
                                "--json", *extra]) == 0
        cli = json.loads(capsys.readouterr().out)
        assert re.search(rf"{label}[^\n]*perplexity {cli['perplexity']:.2f}, mean NLL {cli['nll']:.4f}", summary), \
            (label, cli, summary)
        assert f"{cli['tokens']} tokens scored" in summary
    for elem_id in ("score_base", "score_tuned"):
        tokens = page.locator(f"#{elem_id} .textfield .token")
        expect(tokens.first).to_be_visible()
        assert "background" in tokens.nth(1).get_attribute("style")
    save_screenshot(page, "score.png")


def test_refused_input_in_compare_is_a_message_and_nothing_is_lost(page):
    from tests.app.test_browser import send_refused
    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Settings (both sides)").click()
    for message, seed_text, refusal in [("Hi.", "abc", "Seed must be a number, got 'abc'."),
                                        ("", "", "Type a message first.")]:
        send_refused(page, "cmp_", message, seed_text, refusal, where="#cmp_note")
        for side in ("#cmp_base", "#cmp_tuned"):  # no error badge over the outputs
            assert error_badges(page, side) == 0
