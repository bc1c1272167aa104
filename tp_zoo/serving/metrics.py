"""The server's Prometheus metrics (GET /metrics): what each engine reports
when scraped (requests running and waiting, KV pages used and total,
tokens generated, preemptions, prompt tokens taken from the prefix cache;
labelled by `engine`, its index among the data-parallel copies), and what
the server sees of requests (time to first token, requests by finish
reason)."""

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily

# Seconds: a short prompt on an idle engine up to a long one behind a full batch.
TIME_TO_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """The metrics of one app, in a registry of their own (so that several
    apps in one process do not share them)."""

    def __init__(self, engines):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStats(engines))
        self.time_to_first_token = Histogram(
            "tp_zoo_time_to_first_token_seconds", "From a request's submission to its engine to its first token.",
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS, registry=self.registry,
        )
        self.requests = Counter(
            "tp_zoo_requests", "Requests ended, by finish reason: stop, length, cancelled (the client left), error.",
            ["finish_reason"], registry=self.registry,
        )

    def exposition(self):
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class _EngineStats:
    """Each engine's `stats()`, read when the metrics are scraped."""

    def __init__(self, engines):
        self._engines = engines

    def collect(self):
        gauges = {
            "running": GaugeMetricFamily("tp_zoo_requests_running", "Requests in the engine's batch.",
                                         labels=["engine"]),
            "waiting": GaugeMetricFamily("tp_zoo_requests_waiting", "Requests waiting for a place in the batch.",
                                         labels=["engine"]),
            "pages_used": GaugeMetricFamily("tp_zoo_kv_pages_used", "KV cache pages in use.", labels=["engine"]),
            "pages_total": GaugeMetricFamily("tp_zoo_kv_pages_total", "KV cache pages.", labels=["engine"]),
        }
        counters = {
            "generated_tokens": CounterMetricFamily("tp_zoo_generated_tokens", "Tokens generated.", labels=["engine"]),
            "preemptions": CounterMetricFamily("tp_zoo_preemptions", "Requests preempted to free KV pages.",
                                               labels=["engine"]),
            "prefix_cached_tokens": CounterMetricFamily(
                "tp_zoo_prefix_cached_tokens", "Prompt tokens whose keys and values came from the prefix cache.",
                labels=["engine"]),
        }
        for index, engine in enumerate(self._engines):
            stats = engine.stats()
            for name, family in {**gauges, **counters}.items():
                family.add_metric([str(index)], getattr(stats, name))
        yield from gauges.values()
        yield from counters.values()
