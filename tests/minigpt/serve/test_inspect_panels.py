"""One state for the conversation, behind the handlers and without a browser: after every action the panels'
numbers, the stats line and Export describe the chat's last reply, or say there is none; branching from
an alternative against transformers; export and load."""
import html
import json
import re
from pathlib import Path

import pytest
import torch

from minigpt.serve.conversation import BASE, message_text
from minigpt.serve.engine import Engine
from minigpt.serve.handlers import BUTTONS, NO_REPLY, UNDONE, WRITING, ChatHandlers
from minigpt.serve.inspect_panels import STALE, InspectHandlers
from minigpt.serve.session import Session
from minigpt.speed.decoder import Decoder
from tests.helpers import run_async, updates

QUESTION = [{"role": "user", "content": "Tell me about foxes."}]
CONTROLS = (BASE, 0.0, 0, 1.0, 12, "5")  # greedy: branching is checked against transformers' greedy


@pytest.fixture(scope="module")
def handlers(tiny_model):
    model, tokenizer, _ = tiny_model
    engine = Engine({BASE: Decoder(model)}, tokenizer, "")
    return ChatHandlers(engine), InspectHandlers(engine)


def payload(outputs: dict) -> dict:
    """The panels' numbers (or note) as the page's script reads them from #inspect_data."""
    return json.loads(html.unescape(re.fullmatch(r'<div class="payload"[^>]*>(.*)</div>', outputs["inspect_data"],
                                                 re.S).group(1)))


def converse(chat: ChatHandlers, session: Session, history=QUESTION) -> tuple[list, dict]:
    """Send: add the message, stream the reply; (the chat, the last outputs of each name)."""
    sent = chat.add_message(session, message_text(history[-1]), history[:-1])
    assert payload(sent)["note"] == WRITING  # the panels never show the previous reply beside a new one
    last = {}
    for update in updates(chat.respond(session, sent["chat"], *CONTROLS)):
        last.update(update)
    return last["chat"], last


def test_a_finished_reply_is_what_the_panels_stats_and_export_describe(handlers):
    chat, inspect = handlers
    session = Session()
    history, last = converse(chat, session)
    numbers = payload(last)
    reply = session.reply
    assert numbers["tokens"] == reply.token_ids and numbers["key"] == session.key
    assert numbers["select"] == len(reply.token_ids)  # the last token is selected
    assert f"{len(reply.token_ids)} tokens" in last["stats"] or f"{len(reply.token_ids)} token " in last["stats"]
    assert message_text(history[-1]) == reply.text.strip()
    exported = json.loads(Path(inspect.export(session)["export_file"]).read_text())
    assert [m["content"] for m in exported["conversation"]] == [message_text(m) for m in history]
    assert exported["reply"]["text"] == reply.text and exported["scale"] == 1.0


@pytest.mark.parametrize("action", ["undo", "clear", "retry"])
def test_after_undo_clear_or_retry_no_panel_describes_the_gone_reply(handlers, action):
    chat, inspect = handlers
    session = Session()
    history, _ = converse(chat, session)
    old = f"{session.key}:1:{session.reply.top[0][1][0]}"  # an alternative on the panel before the action
    out = {"undo": lambda: chat.undo(session, history), "clear": lambda: chat.clear(session),
           "retry": lambda: chat.retry(session, history)}[action]()
    assert payload(out)["note"] == {"undo": UNDONE, "clear": NO_REPLY, "retry": WRITING}[action]
    assert session.reply is None
    assert inspect.export(session) == {"export_file": None, "export_note": "Nothing to export: the panels show no reply."}
    if action != "retry":
        assert out["stats"] == chat.ready
    note = "Wait for the reply to finish before branching." if action == "retry" else STALE
    assert updates(inspect.branch(session, old)) == [{"branch_note": note}]  # clicked on the old panel: nothing


def test_branching_continues_the_panels_reply_as_transformers_greedy_and_undo_returns(handlers, tiny_model):
    _, _, hf_model = tiny_model
    chat, inspect = handlers
    session = Session()
    history, last = converse(chat, session)
    reply, before = session.reply, payload(last)
    token = reply.top[4][2][0]  # the third most likely token at position 5
    sent = updates(inspect.branch(session, f"{session.key}:5:{token}"))
    new = session.reply
    assert new.token_ids[:5] == reply.token_ids[:4] + [token]
    forced = reply.prompt_ids + new.token_ids[:5]  # the reply's own prompt: not what the browser's chat holds
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([forced]), max_new_tokens=7, do_sample=False, pad_token_id=50256)
    assert new.token_ids[5:] == out[0, len(forced):len(forced) + len(new.token_ids) - 5].tolist()
    assert sent[0]["send"].interactive is False and payload(sent[0])["note"] == WRITING
    final = {k: v for update in sent for k, v in update.items()}
    assert final["send"].interactive is True and final["stats"].startswith("Branched at token 5")
    assert message_text(final["chat"][-1]) == new.text.strip() and final["chat"][:-1] == history[:-1]
    numbers = payload(sent[-1])
    assert numbers["tokens"] == new.token_ids and numbers["select"] == 5
    assert 'data-branched="1"' in sent[-1]["inspect_data"]
    assert json.loads(Path(inspect.export(session)["export_file"]).read_text())["reply"]["text"] == new.text

    back = inspect.undo_branch(session)
    assert session.reply is reply and session.original is None
    assert payload(back) == before and message_text(back["chat"][-1]) == reply.text.strip()
    assert back["stats"].startswith(f"{len(reply.token_ids)} token")
    again = updates(inspect.branch(session, f"{session.key}:2:{reply.top[1][1][0]}"))  # its alternatives work again
    assert again[0]["branch_note"] == "" and session.reply.token_ids[1] == reply.top[1][1][0]


def test_undo_branch_without_a_branch_is_a_note_beside_it(handlers):
    chat, inspect = handlers
    session = Session()
    converse(chat, session)
    out = inspect.undo_branch(session)
    assert out["branch_note"] == "There is no branch to undo."
    assert "chat" not in out and "stats" not in out  # the conversation and the stats line stay


@pytest.mark.parametrize("request_text, note", [
    ("x", "three whole numbers"), ("1:2", "three whole numbers"), ("{key}:999:1", "not among the alternatives"),
    ("{key}:1:50000", "not among the alternatives"), ("{old}:1:{token}", STALE), ("0:1:{token}", STALE)])
def test_a_branch_request_is_checked(handlers, request_text, note):
    chat, inspect = handlers
    session = Session()
    converse(chat, session)
    text = request_text.format(key=session.key, old=session.key - 1, token=session.reply.top[0][1][0])
    assert note in updates(inspect.branch(session, text))[0]["branch_note"]


def test_an_exported_conversation_loads_back_to_the_same_panels(handlers):
    chat, inspect = handlers
    session = Session()
    history, last = converse(chat, session)
    path = inspect.export(session)["export_file"]
    loaded = Session()
    shown = run_async(inspect.load(loaded, path))
    assert shown["chat"] == history and shown["export_note"].startswith("Loaded 2 messages")
    assert shown["stats"].startswith("Loaded from a file: ")
    before, after = payload(last), payload(shown)
    assert {k: v for k, v in before.items() if k not in ("key", "timeline_ms")} == \
        {k: v for k, v in after.items() if k not in ("key", "timeline_ms")}
    assert after["timeline_ms"] == pytest.approx(before["timeline_ms"], abs=1e-3)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "Could not load: not a JSON file"),
    (b'{"format": "something-else"}', "not a MiniGPT conversation"),
    (b'\xff\xfe\x00', "not UTF-8"),
    (b'{"format": "minigpt-conversation", "version": 1, "conversation": []}', "has no 'mode' field"),
])
def test_a_malformed_or_foreign_file_gives_a_message_and_changes_nothing(handlers, tmp_path, content, message):
    _, inspect = handlers
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    session = Session()
    shown = run_async(inspect.load(session, str(path)))
    assert message in shown["export_note"] and session.reply is None
    assert set(shown) == {"export_note"}  # nothing else on screen changes


def test_out_of_vocabulary_ids_are_refused(handlers, tmp_path):
    chat, inspect = handlers
    session = Session()
    converse(chat, session)
    data = json.loads(Path(inspect.export(session)["export_file"]).read_text(encoding="utf-8"))
    data["prompt_ids"][0] = 10**6
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert "token ids between 0 and 50256" in run_async(inspect.load(Session(), str(bad)))["export_note"]


def test_an_export_keeps_every_sampler_stage_setting(handlers):
    from minigpt.serve.conversation import MoreSampling, read_request
    from minigpt.serve.replies import Reply
    from minigpt.serve.transcript import export_conversation, load_conversation
    more = MoreSampling(0.1, 1.2, -0.5, 0.5, '{"13": -100, "50256": 3}', True, '{"type": "object"}')
    request = read_request(BASE, 0.9, 0, 1.0, 4, 7, 1.0, context=128, more=more)[0]
    reply = Reply(request, [1, 2], "x", [3], [-1.0], [[(3, -1.0)]], "length")
    _, loaded = load_conversation(export_conversation(QUESTION, reply, handlers[0].engine.tokenizer), 50257, 128)
    assert loaded.request == request

def test_the_buttons_lock_while_a_reply_streams(handlers):
    chat, _ = handlers
    session = Session()
    sent = chat.add_message(session, "Hi", [])
    assert all(sent[name].interactive is False for name in BUTTONS)


def crafted(handlers, tmp_path, edit_text=None, edit_data=None) -> str:
    """An export of a real reply, edited as an attacker would: its JSON text, or its data."""
    chat, inspect = handlers
    session = Session()
    converse(chat, session)
    text = Path(inspect.export(session)["export_file"]).read_text(encoding="utf-8")
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
    "infinite max_new_tokens": (lambda t: t.replace('"max_new_tokens": 12', '"max_new_tokens": Infinity'),
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
def test_a_crafted_conversation_file_is_refused_with_a_message(handlers, tmp_path, case):
    if case in CRAFTED_TEXT:
        edit, message = CRAFTED_TEXT[case]
        path = crafted(handlers, tmp_path, edit_text=edit)
    else:
        edit, message = CRAFTED_DATA[case]
        path = crafted(handlers, tmp_path, edit_data=edit)
    session = Session()
    shown = run_async(handlers[1].load(session, path))
    assert shown["export_note"].startswith("Could not load: ") and message in shown["export_note"], shown
    assert set(shown) == {"export_note"} and session.reply is None  # nothing else on screen changes
