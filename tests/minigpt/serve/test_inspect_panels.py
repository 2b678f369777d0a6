"""The "look inside" views behind their handlers, without a browser: every view for a reply, one selected
token shared by all, branching against transformers, export and load, clicks on figures."""
import json
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

from minigpt.serve.conversation import BASE, Prompt, read_request
from minigpt.serve.engine import Engine
from minigpt.serve.handlers import BUTTONS
from minigpt.serve.inspect_panels import SELECTED, VIEW_OUTPUTS, VIEWS, InspectHandlers
from minigpt.serve.panels_lens import reply_column, visible_columns
from minigpt.serve.replies import stream_reply
from minigpt.serve.session import Session
from minigpt.speed.decoder import Decoder

HISTORY = [{"role": "user", "content": "Tell me about foxes."}, {"role": "assistant", "content": "..."}]
from tests.helpers import updates


@pytest.fixture(scope="module")
def inspect(tiny_model):
    model, tokenizer, _ = tiny_model
    return InspectHandlers(Engine({BASE: Decoder(model)}, tokenizer, ""))


def a_reply(inspect, temperature=0.0, n=16):
    tokenizer = inspect.tokenizer
    ids = tokenizer.encode_ordinary("The quick brown fox jumps over the lazy dog. Foxes")
    request = read_request(BASE, temperature, 0, 1.0, n, 5, 1.0, context=128)[0]
    return list(stream_reply(inspect.engine.models[BASE], tokenizer, Prompt("", ids, 0, ("\nUser:",)), request,
                             threading.Event()))[-1]


def session_with(reply) -> Session:
    session = Session()
    session.show(reply)
    return session


def outputs(values: dict) -> dict:
    """Every view output by name: None where the handler left it unchanged."""
    assert set(values) <= set(VIEW_OUTPUTS)
    return {name: values.get(name) for name in VIEW_OUTPUTS}


def select(index, value=None) -> gr.SelectData:
    return gr.SelectData(None, {"index": index, "value": value, "selected": True})


@pytest.mark.parametrize("view", VIEWS[:4])
def test_every_view_is_drawn_for_the_selected_token_and_only_on_screen(inspect, view):
    reply = a_reply(inspect, temperature=0.8)
    session = session_with(reply)
    out = outputs(inspect.opener(view)(session, 1, -1))
    assert session.position == len(reply.token_ids)  # the last token is selected after a reply
    assert out["tokens"][-1][1] == SELECTED and all(label != SELECTED for _, label in out["tokens"][:-1])
    assert f"Token {session.position} of {len(reply.token_ids)}" in out["caption"]
    shown = {"Sampling": ("pipeline", "pipeline_note"), "Logit lens": ("lens", "lens_table"),
             "Attention": ("heatmap", "attention_note", "entropy", "similarity"),
             "Timeline": ("timeline", "timeline_note")}
    for name in ("pipeline", "lens", "heatmap", "timeline"):
        on_screen = name in shown[view]
        assert (out[name] is not None) == on_screen, name
    out = outputs(inspect.select(session, 3, 1, -1))  # the slider moves every view
    assert session.position == 3 and out["tokens"][2][1] == SELECTED
    assert "Token 3 of" in out["caption"]


def test_sampling_view_counts_survivors_with_the_sampler_settings(inspect):
    reply = a_reply(inspect, temperature=0.8)
    session = session_with(reply)
    out = outputs(inspect.opener("Sampling")(session, 0, -1))
    assert out["pipeline_note"].startswith("Tokens left at each stage: raw: **50,257** → temperature 0.8: **50,257**")
    assert "Drawn:" in out["pipeline_note"]


def test_lens_clicks_select_reply_tokens(inspect):
    reply = a_reply(inspect)
    session = session_with(reply)
    inspect.opener("Logit lens")(session, 0, -1)
    clicks = session.clicks["lens"]
    columns = visible_columns(session.lens, reply_column(reply, session.position))
    assert clicks.rows == inspect.engine.models[BASE].config.n_layer + 1
    wanted = len(reply.token_ids) - 3
    x, y = clicks.centre(0, columns.index(len(reply.prompt_ids) + wanted - 2))  # the column that predicted it
    out = outputs(inspect.click_lens(session, 0, -1, select([x, y])))
    assert session.position == wanted
    assert f"the next token was `{out['tokens'][wanted - 1][0].replace(' ', '␣')}`" in out["lens_table"]
    assert clicks.cell(clicks.left - 5, y) is None


def test_entropy_click_picks_a_layer_and_head_and_hiding_the_sink_renormalises(inspect):
    reply = a_reply(inspect)
    session = session_with(reply)
    inspect.opener("Attention")(session, 0, -1)
    x, y = session.clicks["entropy"].centre(1, 2)
    assert inspect.head_clicker("entropy")(session, 0, -1, select([x, y])) == {"layer": 1, "head": 2}
    x, y = session.clicks["similarity"].centre(3, 0)
    assert inspect.head_clicker("similarity")(session, 1, 2, select([x, y])) == {"head": 3}
    out = outputs(inspect.toggle_sink(session, True, 1, 2))
    assert "first token is hidden" in out["attention_note"]
    rows = session.heads.probs
    np.testing.assert_allclose(rows.sum(-1)[..., 1:], 1.0, atol=1e-5)  # each row sums to 1 without the sink
    assert rows.shape[-1] == len(reply.prompt_ids) + len(reply.token_ids) - 2


def test_branching_forces_the_alternative_then_continues_as_transformers_greedy(inspect, tiny_model):
    _, _, hf_model = tiny_model
    reply = a_reply(inspect, temperature=0.0, n=16)
    session = session_with(reply)
    session.position = 5
    label, _ = list(outputs(inspect.views(session, 0, -1))["alternatives"].items())[2]
    sent = updates(inspect.branch(session, HISTORY, 0, -1, select(2, label)))
    new = session.reply
    token = reply.top[4][2][0]
    assert new.token_ids[:5] == reply.token_ids[:4] + [token]
    forced = reply.prompt_ids + new.token_ids[:5]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([forced]), max_new_tokens=11, do_sample=False, pad_token_id=50256)
    assert new.token_ids[5:] == out[0, len(forced):len(forced) + len(new.token_ids) - 5].tolist()
    assert sent[0]["send"].interactive is False and sent[-1]["send"].interactive is True  # Send waits meanwhile
    assert all(set(u) <= {"chat", "stats", "msg", *BUTTONS, *VIEW_OUTPUTS} for u in sent)
    chat, status = sent[-1]["chat"], sent[-1]["stats"]
    assert chat[-1]["content"] != "..." and status.startswith("Branched at token 5")
    assert session.original is reply and session.position == 5
    back = inspect.undo_branch(session, chat, 0, -1)
    assert session.reply is reply and session.original is None
    assert back["tokens"][-1][0] == inspect.tokenizer.decode([reply.token_ids[-1]])


def test_an_exported_conversation_loads_back_to_the_same_panels(inspect, tmp_path):
    reply = a_reply(inspect, temperature=0.9)
    session = session_with(reply)
    exported = inspect.export(session, HISTORY)
    path, note = exported["export_file"], exported["export_note"]
    assert note.startswith("Ready: 2 messages")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    assert data["seed"] == 5 and data["mode"] == BASE and data["settings"]["temperature"] == 0.9
    token = data["reply"]["tokens"][0]
    assert token["id"] == reply.token_ids[0] and len(token["top"]) == 5 and token["logprob"] == reply.logprobs[0]
    for view in VIEWS[:4]:
        before = outputs(inspect.opener(view)(session, 1, 0))
        loaded = Session()
        shown = inspect.load(loaded, path, 1, 0)
        chat, message = shown["chat"], shown["export_note"]
        loaded.position = session.position
        after = outputs(inspect.opener(view)(loaded, 1, 0))
        assert chat == [{"role": "user", "content": "Tell me about foxes."}, {"role": "assistant", "content": "..."}]
        assert message.startswith("Loaded 2 messages")
        for name in VIEW_OUTPUTS:
            if isinstance(before[name], np.ndarray):
                np.testing.assert_array_equal(before[name], after[name])
            elif name not in ("pipeline", "heatmap", "position"):  # Figures and Slider updates compare by identity
                assert before[name] == after[name], (view, name)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "Could not load: not a JSON file"),
    (b'{"format": "something-else"}', "not a MiniGPT conversation"),
    (b'\xff\xfe\x00', "not UTF-8"),
    (b'{"format": "minigpt-conversation", "version": 1, "conversation": []}', "has no 'mode' field"),
])
def test_a_malformed_or_foreign_file_gives_a_message_and_changes_nothing(inspect, tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    session = Session()
    shown = inspect.load(session, str(path), 0, -1)
    assert message in shown["export_note"] and session.reply is None
    assert set(shown) == {"export_note"}  # nothing else on screen changes


def test_out_of_vocabulary_ids_are_refused(inspect, tmp_path):
    session = session_with(a_reply(inspect))
    path = inspect.export(session, HISTORY)["export_file"]
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["prompt_ids"][0] = 10**6
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert "token ids between 0 and 50256" in inspect.load(Session(), str(bad), 0, -1)["export_note"]


def test_the_sampling_view_replays_the_stages_that_read_the_sequence(inspect):
    """A reply drawn under a JSON schema with penalties: at every position the view rebuilds what the sampler
    saw (the grammar's state, the tokens so far), so the drawn token survives every stage it shows."""
    from minigpt.serve.conversation import MoreSampling
    from minigpt.serve.panels_sampling import position_history, position_logits, sampling_pipeline
    tokenizer = inspect.tokenizer
    more = MoreSampling(0.02, 1.3, 0.4, 0.2, '{"90": 2}', True, '{"type": "object", "properties": {"a": '
                        '{"type": "integer"}}, "required": ["a"], "additionalProperties": false}')
    request = read_request(BASE, 0.9, 0, 1.0, 12, 3, 1.0, context=128, more=more)[0]
    ids = tokenizer.encode_ordinary("JSON:")
    reply = list(stream_reply(inspect.engine.models[BASE], tokenizer, Prompt("", ids, 0, ()), request,
                              threading.Event()))[-1]
    if reply.finish_reason == "eos":
        assert isinstance(json.loads(reply.text)["a"], int)
    for position in range(1, len(reply.token_ids) + 1):
        logits = position_logits(inspect.engine.models[BASE], reply, position)
        history = position_history(reply, position, tokenizer)
        pipeline = sampling_pipeline(logits, request.params, reply.token_ids[position - 1], history)
        penalties = ["frequency penalty", "presence penalty"] if position > 1 else []  # nothing generated yet
        assert pipeline.names == ["raw", "JSON grammar", "logit bias", "repetition penalty", *penalties,
                                  "temperature", "min-p", "renormalised"]
        assert all(probs[reply.token_ids[position - 1]] > 0 for probs in pipeline.probs)


def test_an_export_keeps_every_sampler_stage_setting(inspect):
    from minigpt.serve.conversation import MoreSampling
    from minigpt.serve.replies import Reply
    from minigpt.serve.transcript import export_conversation, load_conversation
    more = MoreSampling(0.1, 1.2, -0.5, 0.5, '{"13": -100, "50256": 3}', True, '{"type": "object"}')
    request = read_request(BASE, 0.9, 0, 1.0, 4, 7, 1.0, context=128, more=more)[0]
    reply = Reply(request, [1, 2], "x", [3], [-1.0], [[(3, -1.0)]], "length")
    _, loaded = load_conversation(export_conversation(HISTORY, reply, inspect.tokenizer), 50257, 128)
    assert loaded.request == request


def crafted(inspect, tmp_path, edit_text=None, edit_data=None) -> str:
    """An export of a real reply, edited as an attacker would: its JSON text, or its data."""
    session = session_with(a_reply(inspect))
    text = Path(inspect.export(session, HISTORY)["export_file"]).read_text(encoding="utf-8")
    path = tmp_path / "crafted.json"
    path.write_text(edit_text(text) if edit_text else json.dumps(edit_data(json.loads(text))))
    return str(path)


def set_in(data: dict, keys: tuple, value) -> dict:
    target = data
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return data


def first_time_after_second(data: dict) -> dict:
    times = data["reply"]["token_times"]
    times[0] = times[1] + 1.0
    return data


CRAFTED_TEXT = {
    "infinite max_new_tokens": (lambda t: t.replace('"max_new_tokens": 16', '"max_new_tokens": Infinity'),
                                "holds Infinity, which is not a JSON number"),
    "NaN temperature": (lambda t: t.replace('"temperature": 0.0', '"temperature": NaN'),
                        "holds NaN, which is not a JSON number"),
    "NaN token time": (lambda t: t.replace('"token_times": [', '"token_times": [NaN, '), "not a JSON number"),
    "500k-deep nesting": (lambda t: t.replace('"stop": [', '"deep": ' + "[" * 500_000 + "]" * 500_000 + ', "stop": ['),
                          "nested too deeply"),
}
CRAFTED_DATA = {
    "fractional max_new_tokens": (lambda d: set_in(d, ("settings", "max_new_tokens"), 1.5),
                                  "max_new_tokens must be a whole number"),
    "huge log-prob": (lambda d: set_in(d, ("reply", "tokens", 0, "logprob"), 1e300),
                      "log-probability must be a number <= 0"),
    "positive log-prob": (lambda d: set_in(d, ("reply", "tokens", 0, "top", 1, "logprob"), 0.5),
                          "log-probability must be a number <= 0"),
    "inf token time": (lambda d: set_in(d, ("reply", "token_times", 0), 1e999), "holds Infinity"),
    "negative token time": (lambda d: set_in(d, ("reply", "token_times", 0), -127.0), "finite number of seconds >= 0"),
    "decreasing token times": (first_time_after_second, "must not decrease"),
    "too many messages": (lambda d: {**d, "conversation": [{"role": "user", "content": "hi"}] * 1800},
                          "the conversation has 1800 messages; the chat takes at most 1,000 messages"),
}


@pytest.mark.parametrize("case", [*CRAFTED_TEXT, *CRAFTED_DATA])
def test_a_crafted_conversation_file_is_refused_with_a_message(inspect, tmp_path, case):
    if case in CRAFTED_TEXT:
        edit, message = CRAFTED_TEXT[case]
        path = crafted(inspect, tmp_path, edit_text=edit)
    else:
        edit, message = CRAFTED_DATA[case]
        path = crafted(inspect, tmp_path, edit_data=edit)
    session = Session()
    shown = inspect.load(session, path, 0, -1)
    assert shown["export_note"].startswith("Could not load: ") and message in shown["export_note"], shown
    assert set(shown) == {"export_note"} and session.reply is None  # nothing else on screen changes


def test_figure_clicks_need_a_pixel(inspect):
    session = session_with(a_reply(inspect))
    for click in (inspect.click_lens, inspect.click_timeline, inspect.head_clicker("entropy")):
        for index in ("abc", [1.0], [1, "x"], None, [float("nan"), 1.0]):
            with pytest.raises(gr.Error, match=r"the pixel clicked as \[x, y\]"):
                click(session, 0, -1, select(index))
    for which in ("entropy", "similarity"):  # no figure drawn yet: nothing changes
        assert inspect.head_clicker(which)(Session(), 0, -1, select([5.0, 5.0])) == {}
