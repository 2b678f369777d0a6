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
