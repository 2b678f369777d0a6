"""The load test (bench/load.py) in a shorter form: 8 concurrent sessions, 2 turns each, twice."""
import pytest

from bench.load import run_load

pytestmark = pytest.mark.slow


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_eight_concurrent_sessions_are_served_isolated_and_without_leaks(tmp_path):
    result = run_load(tmp_path, clients=8, turns=2, max_new_tokens=16, rss_bound_mib=32, concurrency=2)
    assert result.problems == []
    measured = result.rounds[1]
    # clients 1, 2, 3 (mod 4) cancel, stop and disconnect once each; the rest of the 16 turns finish
    assert (measured["requests"], measured["cancelled"], measured["stopped"], measured["disconnected"]) == (16, 2, 2, 2)
    assert measured["done"] == 10 and measured["tokens"] > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_api_streams_mixed_with_chat_sessions_are_well_formed_and_memory_stays_bounded(tmp_path):
    """8 streaming OpenAI-API clients (two hang up mid-stream) beside 4 chat sessions, 2 turns each."""
    result = run_load(tmp_path, clients=4, turns=2, max_new_tokens=12, rss_bound_mib=32, concurrency=2, api_clients=8)
    assert result.problems == []
    measured = result.rounds[1]
    # 24 requests: the chat's 8 (clients 1, 2, 3 cancel, stop and disconnect once) and the API's 16 (clients 3 and 7
    # hang up on their last turn)
    assert (measured["requests"], measured["cancelled"], measured["stopped"], measured["disconnected"]) == (24, 1, 1, 3)
    assert measured["done"] == 19 and measured["tokens"] > 0
