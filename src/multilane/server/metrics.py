"""Prometheus metrics of one app: lane gauges and counters read from the pool at scrape time, latency histograms."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from multilane.runtime import Runtime

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _PoolCollector(Collector):
    """Reads the pool's per-model counters and its lanes' state when Prometheus scrapes."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        pool = self._runtime.pool
        gauges = {
            "loaded": GaugeMetricFamily("multilane_lane_loaded", "1 if the model's lane is loaded", labels=["model"]),
            "queued": GaugeMetricFamily("multilane_lane_queue_depth", "Calls waiting for a slot", labels=["model"]),
            "busy": GaugeMetricFamily("multilane_lane_busy_slots", "Slots running a call", labels=["model"]),
            "slots": GaugeMetricFamily("multilane_lane_slots", "Parallel slots of the lane", labels=["model"]),
        }
        counters = {
            "requests": CounterMetricFamily("multilane_requests", "Calls admitted", labels=["model"]),
            "rejected": CounterMetricFamily("multilane_rejected", "Calls refused: queue full", labels=["model"]),
            "failures": CounterMetricFamily("multilane_failures", "Calls failed by a dead engine", labels=["model"]),
            "prompt_tokens": CounterMetricFamily("multilane_prompt_tokens", "Prompt tokens", labels=["model"]),
            "prompt_cached_tokens": CounterMetricFamily(
                "multilane_prompt_cached_tokens", "Prompt tokens the engine took from its prefix cache",
                labels=["model"]),
            "completion_tokens": CounterMetricFamily("multilane_completion_tokens", "Generated tokens",
                                                     labels=["model"]),
            "loads": CounterMetricFamily("multilane_loads", "Times the model was loaded", labels=["model"]),
            "evictions": CounterMetricFamily("multilane_evictions", "Times the model was evicted to make room",
                                             labels=["model"]),
            "load_seconds": CounterMetricFamily("multilane_load_seconds", "Seconds spent loading the model",
                                                labels=["model"]),
        }
        by_priority = GaugeMetricFamily("multilane_lane_queued_by_priority", "Calls waiting for a slot, by priority",
                                        labels=["model", "priority"])
        for name, metrics in pool.metrics.items():
            lane = pool.loaded(name)
            gauges["loaded"].add_metric([name], 1.0 if lane is not None else 0.0)
            gauges["queued"].add_metric([name], lane.queued if lane is not None else 0)
            for priority, waiting in (lane.queued_by_priority() if lane is not None else {}).items():
                by_priority.add_metric([name, str(priority)], waiting)
            gauges["busy"].add_metric([name], lane.busy if lane is not None else 0)
            gauges["slots"].add_metric([name], lane.parallel if lane is not None else 0)
            for key, family in counters.items():
                family.add_metric([name], float(getattr(metrics, key)))
        yield from gauges.values()
        yield by_priority
        yield from counters.values()
        hits = CounterMetricFamily("multilane_cache_hits", "Model calls answered from the call cache", labels=["model"])
        misses = CounterMetricFamily("multilane_cache_misses", "Cacheable model calls the cache did not have",
                                     labels=["model"])
        for name in pool.metrics:
            counts = self._runtime.cache_counts.get(name)
            hits.add_metric([name], float(counts.hits if counts else 0))
            misses.add_metric([name], float(counts.misses if counts else 0))
        yield hits
        yield misses
        journal = self._runtime.journal
        if journal is not None:
            yield CounterMetricFamily("multilane_journal_write_failures", "Journal records that could not be written",
                                      value=journal.failures)
        usage = pool.usage()
        yield GaugeMetricFamily("multilane_memory_used_bytes", "Bytes the loaded lanes cost", value=usage["used_bytes"])
        if usage["budget_bytes"] is not None:
            yield GaugeMetricFamily("multilane_memory_budget_bytes", "The memory budget", value=usage["budget_bytes"])


class ServerMetrics:
    """One app's registry: the pool's counters plus time-to-first-token and latency histograms per model."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_PoolCollector(runtime))
        self.first_token = Histogram("multilane_time_to_first_token_seconds",
                                     "Seconds from a generate call's arrival (queue included) to its first token",
                                     ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("multilane_request_seconds",
                                 "Seconds from a call's arrival (queue included) to its end", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe(self, model: str, first_token: float | None, seconds: float) -> None:
        """Record a finished call (the pool's observer hook)."""
        if first_token is not None:
            self.first_token.labels(model).observe(first_token)
        self.latency.labels(model).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
