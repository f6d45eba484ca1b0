"""Prometheus metrics of one server (GET /metrics), on a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Counters and gauges; the scheduler and the app update them, /metrics renders them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgeai_requests", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.prompt_tokens = Counter("edgeai_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("edgeai_generation_tokens", "tokens generated", registry=r)
        self.cancelled = Counter(
            "edgeai_cancelled", "generations stopped because the client went away", registry=r
        )
        self.rejected = Counter(
            "edgeai_rejected", "requests refused because the queue was full", registry=r
        )
        self.escalations = Counter(
            "edgeai_escalations", "answers escalated to a remote tier", ["tier"], registry=r
        )
        self.answers = Counter(
            "edgeai_answers", "answers by the tier that produced them", ["tier"], registry=r
        )
        self.model_loads = Counter("edgeai_model_loads", "models loaded", registry=r)
        self.queue_depth = Gauge(
            "edgeai_queue_depth", "requests waiting for a batch slot", registry=r
        )
        self.active = Gauge("edgeai_active_sequences", "sequences being generated", registry=r)
        self.tps = Gauge(
            "edgeai_tokens_per_second",
            "generated tokens/s over the last 10 s, all clients",
            registry=r,
        )
        self.cache_hits = Counter(
            "edgeai_prompt_cache_hits", "prompts that continued a cached prompt", registry=r
        )
        self.cache_misses = Counter(
            "edgeai_prompt_cache_misses", "prompts prefilled from the start", registry=r
        )
        self.cached_tokens = Counter(
            "edgeai_prompt_cache_tokens", "prompt tokens taken from the prompt cache", registry=r
        )

    def bind(
        self,
        queue_depth: Callable[[], float],
        active: Callable[[], float],
        tps: Callable[[], float],
    ) -> None:
        """Read the live gauges from the scheduler when scraped."""
        self.queue_depth.set_function(queue_depth)
        self.active.set_function(active)
        self.tps.set_function(tps)

    def render(self) -> bytes:
        return generate_latest(self.registry)
