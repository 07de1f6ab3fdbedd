"""Prometheus metrics shared by every web and worker process, and the /metrics page.

prometheus_client keeps counters of several processes in files under
PROMETHEUS_MULTIPROC_DIR, and must know that folder before it is first
imported: so this module picks it (a ``metrics`` folder next to the
database, unless the variable is set) before importing it.
"""

import os

from dotenv import load_dotenv


def _pick_folder():
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        load_dotenv(os.environ.get("ENV_FILE", ".env"), override=False)
        database = os.environ.get("DATABASE_PATH") or "data/webhooks.db"
        folder = os.path.join(os.path.dirname(os.path.abspath(database)), "metrics")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    except OSError:
        # No shared folder: each process counts alone. The database, in the
        # same place, fails start-up with a clear line soon after.
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]


_pick_folder()

from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402

PREFIX = "ig_webhooks_"

DELIVERIES = Counter(
    PREFIX + "deliveries_total",
    "Deliveries answered, by outcome.",
    ["outcome"],
)
EVENTS_RECEIVED = Counter(
    PREFIX + "events_received_total",
    "New events stored, by kind.",
    ["kind"],
)
EVENTS_FINISHED = Counter(
    PREFIX + "events_finished_total",
    "Events that reached a final status, by kind and status.",
    ["kind", "status"],
)
GRAPH_CALLS = Counter(
    PREFIX + "graph_calls_total",
    "Graph API calls, by outcome.",
    ["outcome"],
)
GRAPH_LATENCY = Histogram(
    PREFIX + "graph_call_seconds",
    "Time the Graph API took to answer a call.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class StateCollector:
    """Figures read when scraped: queue depth, events waiting, open dead letters."""

    def __init__(self, store, queue):
        self.store, self.queue = store, queue

    def collect(self):
        depth = GaugeMetricFamily(
            PREFIX + "queue_depth", "Jobs waiting in the queue (-1: Redis unreachable)."
        )
        try:
            depth.add_metric([], self.queue.count)
        except Exception:
            depth.add_metric([], -1)
        yield depth

        waiting = GaugeMetricFamily(
            PREFIX + "events_waiting",
            "Events stored but not yet queued by a worker's relay (-1: unknown).",
        )
        try:
            waiting.add_metric([], self.store.waiting_for_queue())
        except Exception:
            waiting.add_metric([], -1)
        yield waiting

        dead = GaugeMetricFamily(
            PREFIX + "dead_letters_open", "Dead letters waiting for an operator."
        )
        try:
            rows = self.store.db.query(
                "SELECT COUNT(*) AS n FROM dead_letter WHERE status = 'open'"
            )
            dead.add_metric([], next(rows)["n"])
        except Exception:
            dead.add_metric([], -1)
        yield dead


def render(store, queue):
    """Return (body, content type) of the /metrics page for every process."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    registry.register(StateCollector(store, queue))
    return generate_latest(registry), CONTENT_TYPE_LATEST
