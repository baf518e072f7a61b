"""Prometheus metrics of one service, in a registry of its own (served on /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServiceMetrics:
    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.handled = Counter(
            "cdp_messages_handled_total",
            "Messages handled and committed, by consumer.",
            ["service", "consumer"],
            registry=self.registry,
        )
        self.failed = Counter(
            "cdp_messages_failed_total",
            "Messages whose handler failed; kept in the service's failed-message table.",
            ["service", "consumer"],
            registry=self.registry,
        )
        self.skipped = Counter(
            "cdp_messages_redelivered_total",
            "Redelivered messages skipped because their effect was already committed.",
            ["service", "consumer"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cdp_handler_latency_seconds",
            "Time to handle and commit one fetched batch.",
            ["service", "consumer"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cdp_batch_messages",
            "Messages per fetched batch.",
            ["service", "consumer"],
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=self.registry,
        )
        self.lag = Gauge(
            "cdp_consumer_lag",
            "Messages waiting in the stream for this consumer, as of the last fetch.",
            ["service", "consumer"],
            registry=self.registry,
        )
        refused = Gauge(
            "cdp_requests_refused_total",
            "Requests dropped unanswered: their reply subject was not an inbox.",
            registry=self.registry,
        )
        refused.set_function(_refused_replies)
        self.service = service


def _refused_replies() -> float:
    from shared import admin  # noqa: PLC0415 - admin imports nothing of this module

    return float(admin.refused_replies)
