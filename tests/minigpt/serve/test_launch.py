"""The chat app's options: every one that matters on a Space also reads a variable (a flag wins), bad
values are usage errors naming the variable, and on a Space the messages name variables, not flags."""
import re

import pytest

from minigpt.serve.engine import get_an_adapter
from minigpt.serve.launch import ENVIRONMENT, parse_args
from minigpt.serve.openai_api import access_for
from tests.helpers import REPO


@pytest.fixture(autouse=True)
def no_app_variables(monkeypatch):
    for name in [*ENVIRONMENT.values(), "SPACE_ID"]:
        monkeypatch.delenv(name, raising=False)


def test_each_variable_sets_its_option_and_a_flag_wins(monkeypatch):
    values = {"MINIGPT_MODEL": "gpt2-medium", "MINIGPT_ADAPTER": "me/adapter", "GRADIO_SERVER_NAME": "0.0.0.0",
              "GRADIO_SERVER_PORT": "8080", "MINIGPT_DEVICE": "cpu", "MINIGPT_PRECISION": "int8",
              "MINIGPT_SPECULATIVE": "no", "MINIGPT_CONCURRENCY": "4", "MINIGPT_QUEUE_SIZE": "9",
              "MINIGPT_SESSIONS_KEPT": "3", "MINIGPT_API_KEY": "sk-1", "MINIGPT_OPEN_API": "true"}
    assert set(values) == set(ENVIRONMENT.values())
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    args = vars(parse_args([]))
    assert {dest: args[dest] for dest in ENVIRONMENT} == {
        "model": "gpt2-medium", "adapter": "me/adapter", "host": "0.0.0.0", "port": 8080, "device": "cpu",
        "precision": "int8", "speculative": False, "concurrency": 4, "queue_size": 9, "sessions_kept": 3,
        "api_key": "sk-1", "open_api": True}
    flags = parse_args(["--port", "7000", "--precision", "float32", "--no-adapter", "--concurrency", "2"])
    assert (flags.port, flags.precision, flags.adapter, flags.no_adapter, flags.concurrency) == \
        (7000, "float32", None, True, 2)


@pytest.mark.parametrize("name, value, expected", [
    ("GRADIO_SERVER_PORT", "http", "GRADIO_SERVER_PORT='http': expected a whole number"),
    ("MINIGPT_PRECISION", "int9", "MINIGPT_PRECISION='int9': expected one of float32, bfloat16"),
    ("MINIGPT_OPEN_API", "maybe", "MINIGPT_OPEN_API='maybe': expected one of 1, true"),
    ("MINIGPT_CONCURRENCY", "0", "--concurrency must be >= 1, got 0"),
])
def test_a_bad_variable_is_a_usage_error_naming_it(monkeypatch, capsys, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit:
        parse_args([])
    assert exit.value.code == 2 and expected in capsys.readouterr().err


def test_on_a_space_the_messages_name_variables_not_flags(monkeypatch):
    local_off = access_for("0.0.0.0", False, None, False).off_reason
    assert "--api-key KEY" in local_off and "--open-api" in local_off and "pass `--adapter`" in get_an_adapter()
    monkeypatch.setenv("SPACE_ID", "me/chat")
    assert parse_args([]).host == "0.0.0.0"
    off, adapter = access_for("0.0.0.0", False, None, False).off_reason, get_an_adapter()
    assert "the Space secret MINIGPT_API_KEY=KEY" in off and "the Space variable MINIGPT_OPEN_API=1" in off
    assert "the Space variable MINIGPT_ADAPTER=USER/ADAPTER" in adapter and "python -m minigpt.space" in adapter
    assert "--api-key" not in off and "--open-api" not in off and "pass `--adapter`" not in adapter


def test_the_deploy_doc_lists_every_variable():
    table = (REPO / "docs" / "deploy.md").read_text()
    assert set(re.findall(r"^\| `((?:MINIGPT|GRADIO)_[A-Z_]+)`", table, re.M)) == set(ENVIRONMENT.values())
