"""The API's pieces without a server: who may use /v1 and the page, and what the start-up log says.
The endpoints themselves are tested against a running app in tests/app/test_openai_api.py."""
import pytest

from minigpt.serve.openai_api import access_for, describe


@pytest.mark.parametrize("host, shared, key, open_api, enabled, keyed", [
    ("127.0.0.1", False, None, False, True, False),
    ("localhost", False, None, False, True, False),
    ("0.0.0.0", False, None, False, False, False),  # beyond loopback, no key: off
    ("127.0.0.1", True, None, False, False, False),  # a public share link is beyond loopback too
    ("0.0.0.0", False, "k", False, True, True),
    ("0.0.0.0", False, "", False, False, False),  # an empty MINIGPT_API_KEY is no key
    ("0.0.0.0", False, None, True, True, False),
])
def test_the_api_is_off_beyond_loopback_without_a_key_unless_opened(host, shared, key, open_api, enabled, keyed):
    access = access_for(host, shared, key, open_api)
    assert (access.enabled, access.key is not None) == (enabled, keyed)
    page, api, health = describe(access, f"http://{host}:7860", host, shared).splitlines()
    if not enabled:
        assert api.startswith("OpenAI-compatible API: off, because") and "--api-key" in api and "--open-api" in api
    else:
        assert api.startswith(f"OpenAI-compatible API: http://{host}:7860/v1, with /tokenize")
    local = host in ("127.0.0.1", "localhost") and not shared
    who = "this machine only" if local else "anyone who can reach"
    assert page.startswith(f"Chat page and Gradio's routes: http://{host}:7860 (")
    assert ("log in with any user name and the API key" in page) if keyed else (f"open to {who}" in page)
    assert health.startswith(f"Health check: http://{host}:7860/health (open to {who}")
    assert (access.login() is None) != keyed
    if keyed:
        assert access.login()("anyone", "k") and not access.login()("anyone", "x")


def test_the_api_key_comes_from_the_environment(monkeypatch):
    from minigpt.serve import launch
    monkeypatch.setenv("MINIGPT_API_KEY", "from-env")
    assert launch.parse_args([]).api_key == "from-env"
    assert launch.parse_args(["--api-key", "given"]).api_key == "given"
