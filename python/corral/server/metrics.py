"""Prometheus metrics at GET /metrics, named as vLLM names them with a `corral:` prefix and
labelled model_name, so existing dashboards need only the prefix changed.

Engine state (running and waiting requests, KV usage, preemptions, prefix-cache hits) is read from
the engine at each scrape; request counters and latency histograms are recorded as replies are
generated; HTTP request counts and durations as prometheus-fastapi-instrumentator names them.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Gauges and counters of the engine's stats(), read at each scrape."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: dict | None = None  # set just before generate_latest

    def collect(self):
        s = self.stats
        if s is None:
            return
        total = s["kv_blocks_total"]
        for name, doc, value, kind in (
            ("corral:num_requests_running", "Requests in the engine's running batch.", s["requests_running"], GaugeMetricFamily),
            ("corral:num_requests_waiting", "Requests waiting to be scheduled.", s["requests_waiting"], GaugeMetricFamily),
            ("corral:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
             1.0 - s["kv_blocks_free"] / total if total else 0.0, GaugeMetricFamily),
            ("corral:num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.",
             s["preemptions"], CounterMetricFamily),
            ("corral:prefix_cache_hits", "Prompt tokens whose KV cache was reused.", s["prefix_cache_hit_tokens"],
             CounterMetricFamily),
        ):
            family = kind(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class Metrics:
    def __init__(self, model_name: str) -> None:
        prometheus_client.disable_created_metrics()  # no *_created series beside each counter (as vLLM)
        self.registry = CollectorRegistry()
        r, name = self.registry, ["model_name"]
        self.prompt_tokens = Counter("corral:prompt_tokens", "Prompt tokens received.", name, registry=r).labels(model_name)
        self.generation_tokens = Counter(
            "corral:generation_tokens", "Tokens generated.", name, registry=r
        ).labels(model_name)
        self._success = Counter(
            "corral:request_success", "Samples finished, by finish reason.", ["model_name", "finished_reason"], registry=r
        )
        self.time_to_first_token = Histogram(
            "corral:time_to_first_token_seconds", "From arrival to the first token.", name, buckets=_TTFT_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.inter_token_latency = Histogram(
            "corral:inter_token_latency_seconds", "Between two steps of a request that produced tokens.", name,
            buckets=_ITL_BUCKETS, registry=r,
        ).labels(model_name)
        self.e2e_request_latency = Histogram(
            "corral:e2e_request_latency_seconds", "From arrival to the last token.", name, buckets=_E2E_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.client_disconnected = Counter(
            "corral:http_requests_client_disconnected", "Requests whose client left before the reply was complete.",
            name, registry=r,
        ).labels(model_name)
        self._http_requests = Counter(
            "http_requests", "HTTP requests by handler, method and status.", ["handler", "method", "status"], registry=r
        )
        self._http_duration = Histogram(
            "http_request_duration_seconds", "HTTP request durations by handler and method.", ["handler", "method"],
            registry=r,
        )
        self._model_name = model_name
        self._engine = _EngineCollector(model_name)
        r.register(self._engine)

    def request_finished(self, finish_reason: str) -> None:
        self._success.labels(self._model_name, finish_reason).inc()

    def http_request(self, handler: str, method: str, status: int, seconds: float) -> None:
        self._http_requests.labels(handler, method, str(status)).inc()
        self._http_duration.labels(handler, method).observe(seconds)

    def exposition(self, engine_stats: dict) -> bytes:
        """The text format, with the engine's gauges and counters from engine_stats (LLM.stats())."""
        self._engine.stats = engine_stats
        return generate_latest(self.registry)
