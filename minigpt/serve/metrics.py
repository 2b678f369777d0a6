"""The server's Prometheus metrics, served at /metrics in Prometheus' text format by the standard client
library (prometheus-client), in a registry of the server's own: the API's requests by route and status, the
tokens it read and wrote, its time to first token and decode speed, and the scheduler's rows and queue
(the chat's replies included, as they share them)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .replies import Reply
from .scheduler import Scheduler

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKENS_PER_S = (1, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler: Scheduler):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("minigpt_api_requests", "API requests answered, by route and HTTP status",
                                ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("minigpt_api_prompt_tokens", "Prompt tokens the API read", registry=registry)
        self.generation_tokens = Counter("minigpt_api_generation_tokens", "Tokens the API generated",
                                         registry=registry)
        self.first_token = Histogram("minigpt_api_time_to_first_token_seconds", "From leaving the queue to the "
                                     "first token (prefill included)", buckets=SECONDS, registry=registry)
        self.decode_speed = Histogram("minigpt_api_decode_tokens_per_second", "Tokens per second after the first, "
                                      "per reply", buckets=TOKENS_PER_S, registry=registry)
        Gauge("minigpt_requests_running", "Replies decoding now (chat and API)",
              registry=registry).set_function(lambda: len(scheduler.running))
        Gauge("minigpt_requests_waiting", "Replies and panel passes waiting for a row (chat and API)",
              registry=registry).set_function(lambda: len(scheduler.waiting))

    def answered(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def reply(self, prompt_tokens: int, reply: Reply) -> None:
        """One reply the API computed (finished or stopped)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(len(reply.token_ids))
        if reply.first_token_s is not None:
            self.first_token.observe(reply.first_token_s)
        if (speed := reply.tokens_per_s) is not None:
            self.decode_speed.observe(speed)

    def text(self) -> bytes:
        return generate_latest(self.registry)
