"""Prometheus metrics of one server: request outcomes, token counts, latencies and engine load.

Each server owns its own registry, so several servers (tests) can live in one process.
Gauges read the engine on scrape, so they are never stale.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moecoder_requests", "HTTP requests to /v1 by status code", ["status"], registry=r)
        self.prompt_tokens = Counter("moecoder_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("moecoder_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("moecoder_sequences_finished", "Sequences that left the engine, by reason",
                                ["reason"], registry=r)
        self.ttft = Histogram(
            "moecoder_time_to_first_token_seconds", "From arrival to first generated token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "moecoder_inter_token_latency_seconds", "Between consecutive tokens of one sequence",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("moecoder_queue_depth", "Sequences waiting for a slot", registry=r)
        self.running = Gauge("moecoder_running_batch_size", "Sequences in the decode batch", registry=r)
        self.prefilling = Gauge("moecoder_prefilling", "Sequences holding a row while their prompt is prefilled",
                                registry=r)
        self.slots = Gauge("moecoder_slots", "KV-cache rows (maximum running batch)", registry=r)
        self.kv_used = Gauge("moecoder_kv_cache_used_tokens", "KV-cache positions holding live tokens", registry=r)
        self.kv_usage = Gauge("moecoder_kv_cache_usage_ratio", "Live KV-cache positions / capacity", registry=r)

    def bind(self, engine) -> None:
        """Read the load gauges from `engine.stats()` at scrape time."""
        self.queue_depth.set_function(lambda: engine.stats()["waiting"])
        self.running.set_function(lambda: engine.stats()["running"])
        self.prefilling.set_function(lambda: engine.stats()["prefilling"])
        self.slots.set_function(lambda: engine.slots)
        self.kv_used.set_function(lambda: engine.stats()["kv_used_tokens"])

        def usage() -> float:
            st = engine.stats()
            return st["kv_used_tokens"] / st["kv_capacity_tokens"]

        self.kv_usage.set_function(usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
