"""Prometheus metrics of the server (`GET /metrics`), named after vLLM's with a `jaxllm:` prefix."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.engine import LLMEngine
from serving.spec_decode.stats import SpecDecodeStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServingMetrics:
    """One registry per server. Gauges read engine state when scraped."""

    def __init__(self, engine: LLMEngine, model_name: str):
        self.registry = CollectorRegistry()
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, **labels).labels(model_name)
        self.itl = Histogram("jaxllm:inter_token_latency_seconds", "Time between consecutive output tokens", buckets=LATENCY_BUCKETS, **labels).labels(model_name)
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "Request latency, arrival to last token", buckets=LATENCY_BUCKETS, **labels).labels(model_name)
        self.prompt_tokens = Counter("jaxllm:prompt_tokens", "Prompt tokens processed", **labels).labels(model_name)
        self.generation_tokens = Counter("jaxllm:generation_tokens", "Tokens generated", **labels).labels(model_name)
        self.finished = Counter(
            "jaxllm:request_success", "Finished requests by finish reason", labelnames=["model_name", "finished_reason"], registry=self.registry
        )
        self.model_name = model_name
        gauges = {
            "jaxllm:num_requests_running": ("Sequences in the running batch", engine.num_running),
            "jaxllm:num_requests_waiting": ("Sequences waiting to be scheduled", engine.num_waiting),
        }
        if hasattr(engine, "pool"):  # a pooling engine keeps no KV pages
            gauges.update({
                "jaxllm:kv_cache_usage_perc": ("Fraction of KV pages in use", engine.pool.usage),
                "jaxllm:prefix_cache_hit_rate": ("Prefix-cache hits over queried tokens", engine.pool.hit_rate),
                "jaxllm:num_preemptions": ("Sequences preempted so far", lambda: engine.scheduler.num_preemptions),
            })
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, **labels).labels(model_name).set_function(read)
        if engine.spec is not None:
            self.registry.register(SpecDecodeCollector(engine.spec.stats, model_name))

    def request(self, num_prompt_tokens: int) -> "RequestTimer":
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTimer(self)


class RequestTimer:
    """Latency bookkeeping of one request (all its `n` sequences)."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.tokens = 0

    def tokens_seen(self, new: int) -> None:
        """Called with the request's newly generated tokens after each engine (DELTA) output."""
        if new <= 0:
            return
        now = time.perf_counter()
        if self.tokens == 0:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.metrics.generation_tokens.inc(new)
        self.tokens, self.last = self.tokens + new, now

    def finished(self, reasons: list[str | None]) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        for reason in reasons:
            self.metrics.finished.labels(self.metrics.model_name, reason or "abort").inc()


class SpecDecodeCollector:
    """Speculative decoding counters, read from the engine's stats when scraped (vLLM's names)."""

    def __init__(self, stats: SpecDecodeStats, model_name: str):
        self.stats, self.model_name = stats, model_name

    def collect(self):
        stats, labels = self.stats, [self.model_name]
        counters = {
            "num_drafts": ("Verified proposals (sequences with drafts, per step)", stats.num_drafts),
            "num_draft_tokens": ("Draft tokens verified", stats.num_draft_tokens),
            "num_accepted_tokens": ("Draft tokens accepted", stats.num_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(f"jaxllm:spec_decode_{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        per_pos = CounterMetricFamily("jaxllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted at each draft position", labels=["model_name", "position"])
        for position, value in enumerate(stats.accepted_per_pos):
            per_pos.add_metric([self.model_name, str(position)], value)
        yield per_pos
        mean = GaugeMetricFamily("jaxllm:spec_decode_mean_acceptance_length",
                                 "Tokens per verified proposal: accepted drafts plus the target's own",
                                 labels=["model_name"])
        mean.add_metric(labels, stats.mean_acceptance_length)
        yield mean
