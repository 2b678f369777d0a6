"""The Compare and Score handlers in process: two sides from one message and seed, the diff of a reply,
the Score tab's numbers against the perplexity CLI, and sessions at different scales at once."""
import json
import re
import threading
from pathlib import Path

import pytest

from minigpt import perplexity
from minigpt.scoring import compare_ids
from minigpt.serve.compare import CompareHandlers, CompareSession, side_outputs
from minigpt.serve.conversation import BASE, TUNED
from minigpt.serve.engine import load_engine
from minigpt.serve.handlers import ChatHandlers
from minigpt.serve.inspect_panels import InspectHandlers
from minigpt.serve.score import ScoreHandlers
from minigpt.serve.session import Session
from tests.helpers import run_async, updates
from tests.helpers.app_server import make_adapter


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    adapter = make_adapter(tiny_checkpoint[0], tmp_path_factory.mktemp("adapter"))
    return load_engine(str(tiny_checkpoint[0]), str(adapter), "cpu", "float32"), adapter


def last(sent: list[dict]) -> dict:
    """Each output's last value, from a streaming handler's updates."""
    return {name: value for update in sent for name, value in update.items()}


def run_side(handlers, session, mode):
    """The side's last (text, stats line)."""
    last = updates(handlers.respond(session, mode))[-1]
    return tuple(last[name] for name in side_outputs(mode))


def test_both_sides_answer_with_one_seed_and_the_diff_rescores_a_reply(setup):
    engine, _ = setup
    handlers, session = CompareHandlers(engine), CompareSession()
    out = handlers.start(session, "Name a colour.", 1.0, 0, 1.0, 12, "", 0.5)
    seed = re.search(r"seed (\d+)", out["cmp_note"]).group(1)
    assert all(len(side.in_flight) == 1 for side in session.sides.values())  # both Stop flags registered
    texts = {mode: run_side(handlers, session, mode) for mode in (BASE, TUNED)}
    assert "Alpaca LoRA at scale 0.5" in texts[TUNED][1] and not session.busy
    # the same seed in the chat gives the same tuned reply
    chat_reply = session.sides[TUNED].reply
    again = last(updates(ChatHandlers(engine).respond(Session(), [{"role": "user", "content": "Name a colour."}], TUNED,
                                                   1.0, 0, 1.0, 12, seed, 0.5)))["chat"][-1]["content"]
    assert again == texts[TUNED][0]
    summary, tokens, chart, ranked, table = handlers.diff(session, TUNED).values()
    expected = compare_ids(engine.model(BASE), engine.model(TUNED, 0.5), chat_reply.prompt_ids + chat_reply.token_ids,
                           len(chat_reply.prompt_ids))
    assert f"base {expected.mean_logprob_base:.3f}, tuned {expected.mean_logprob_tuned:.3f}" in summary
    assert len(tokens) == len(table["data"]) == len(chat_reply.token_ids)
    assert [row[4] for row in table["data"]] == [round(t.diff, 3) for t in expected.tokens]
    assert [row[1] for row in ranked["data"]] == [t.position for t in expected.changed_minds()]
    bars, kl = chart.data  # the chart's numbers are the comparison's
    assert list(bars.y) == pytest.approx([t.diff for t in expected.tokens], abs=1e-6)
    assert list(kl.y) == pytest.approx([t.kl for t in expected.tokens], abs=1e-6)
    assert chart.layout.yaxis.title.text == "tuned − base (nats)" and chart.layout.yaxis2.title.text == "KL (nats)"


def test_stop_ends_one_side_only(setup):
    engine, _ = setup
    handlers, session = CompareHandlers(engine), CompareSession()
    handlers.start(session, "Tell a story.", 1.0, 0, 1.0, 40, "1", 1.0)
    session.sides[BASE].stop()
    assert run_side(handlers, session, BASE)[1].endswith("stopped by you")
    assert "stopped" not in run_side(handlers, session, TUNED)[1]


def test_score_tab_numbers_are_the_clis(setup, tiny_checkpoint, tmp_path, capsys):
    engine, adapter = setup
    text = "Scoring a text under both models, token by token. " * 30  # longer than one 128-token window
    (tmp_path / "t.txt").write_text(text)
    summary, base_tokens, tuned_tokens = ScoreHandlers(engine).score(text, 1.5).values()
    for extra, label in (([], BASE), (["--adapter", str(adapter), "--lora-scale", "1.5"], TUNED)):
        assert perplexity.main(["--model", str(tiny_checkpoint[0]), "--file", str(tmp_path / "t.txt"),
                                "--device", "cpu", "--json", *extra]) == 0
        cli = json.loads(capsys.readouterr().out)
        assert re.search(rf"{label}[^\n]*perplexity \*\*{cli['perplexity']:.2f}\*\*, mean NLL {cli['nll']:.4f}",
                         summary)
        assert f"{cli['tokens']} tokens scored" in summary and "windows of 128, stride 128" in summary
    assert len(base_tokens) == len(tuned_tokens) == len(engine.tokenizer.encode_ordinary(text))
    assert base_tokens[0][1] is None and sum(v is not None for _, v in tuned_tokens) == cli["tokens"]


def test_two_chat_sessions_at_different_scales_at_once_each_get_their_own(setup):
    engine, _ = setup
    chat = ChatHandlers(engine)
    history = [{"role": "user", "content": "Name a colour."}]
    replies = {}

    def reply(scale):
        replies[scale] = last(updates(chat.respond(Session(), history, TUNED, 0.0, 0, 1.0, 10, "", scale)))

    threads = [threading.Thread(target=reply, args=(s,)) for s in (0.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for scale, out in replies.items():
        alone = last(updates(chat.respond(Session(), history, TUNED, 0.0, 0, 1.0, 10, "", scale)))["chat"]
        assert out["chat"] == alone and f"scale {scale:g}" in out["stats"]
    assert replies[0.0]["chat"] != replies[2.0]["chat"]


def test_bad_scale_or_empty_text_is_a_message(setup):
    import gradio as gr
    engine, _ = setup
    with pytest.raises(gr.Error, match="LoRA scale must be between 0 and 2"):
        CompareHandlers(engine).check("Hi", 1.0, 0, 1.0, 8, "", 2.5)
    with pytest.raises(gr.Error, match="Type a message first"):
        CompareHandlers(engine).check("  ", 1.0, 0, 1.0, 8, "", 1.0)
    with pytest.raises(gr.Error, match="Seed must be a number"):
        CompareHandlers(engine).check("Hi", 1.0, 0, 1.0, 8, "abc", 1.0)
    CompareHandlers(engine).check("Hi", 1.0, 0, 1.0, 8, "", 1.0)  # a blank seed is fine: start draws one
    with pytest.raises(gr.Error, match="at least 2"):
        ScoreHandlers(engine).score("", 1.0)


def test_a_reply_at_scale_0_is_inspected_exported_and_loaded_at_scale_0(setup):
    engine, _ = setup
    chat, inspect, session = ChatHandlers(engine), InspectHandlers(engine), Session()
    updates(chat.respond(session, [{"role": "user", "content": "Name a colour."}], TUNED, 0.0, 0, 1.0, 12, "3", 0.0))
    reply = session.reply
    assert (reply.request.mode, reply.request.scale) == (TUNED, 0.0)
    sampling = json.loads(session.payload)["sampling"]
    # greedy: each drawn token is the argmax of the logits the views show, if they are the right ones
    assert [shown[0] for shown in sampling["shown"]] == reply.token_ids
    path = inspect.export(session)["export_file"]
    saved = json.loads(Path(path).read_text())
    assert (saved["mode"], saved["scale"], saved["seed"]) == (TUNED, 0.0, 3)
    loaded = Session()
    run_async(inspect.load(loaded, path))
    assert loaded.reply.request == reply.request
    assert json.loads(loaded.payload)["sampling"] == sampling
