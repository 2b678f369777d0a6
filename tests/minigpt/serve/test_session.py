"""One browser session's state: its own copy per session, and Stop reaching every reply in flight."""
import copy

from minigpt.serve.session import Session


def test_each_session_gets_a_fresh_state_object():
    template = Session(key=3, payload="{}")
    first, second = copy.deepcopy(template), copy.deepcopy(template)  # what gr.State does per session
    assert first is not second and first.key == 0 and not first.payload and not first.in_flight


def test_stop_reaches_every_reply_in_flight_even_after_one_finishes():
    session = Session()
    session.queue_reply()
    first = session.start_reply()  # the reply the browser queued
    second = session.start_reply()  # a second one through the API, same session
    session.finish_reply(first)
    session.stop()
    assert second.is_set()
    assert not session.start_reply().is_set()  # a later reply starts unstopped


def test_stop_while_queued_stops_the_reply_when_it_starts():
    session = Session()
    session.queue_reply()
    session.stop()
    assert session.start_reply().is_set()
