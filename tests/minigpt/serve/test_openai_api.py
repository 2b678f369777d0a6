"""The API's pieces without a server: who may use /v1.
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
    line = describe(access, f"http://{host}:7860")
    if not enabled:
        assert line.startswith("OpenAI-compatible API: off, because") and "--api-key" in line and "--open-api" in line
    else:
        assert line.startswith(f"OpenAI-compatible API: http://{host}:7860/v1 (")


def test_the_api_key_comes_from_the_environment(monkeypatch):
    from minigpt.serve import launch
    monkeypatch.setenv("MINIGPT_API_KEY", "from-env")
    assert launch.parse_args([]).api_key == "from-env"
    assert launch.parse_args(["--api-key", "given"]).api_key == "given"
