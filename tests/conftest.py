"""Shared fixtures: a private Redis, a temporary database and a configured app."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

# Metrics of every process the tests start go to one throw-away folder,
# chosen before anything imports prometheus_client.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ig-metrics-")

import payloads  # noqa: E402
import pytest  # noqa: E402
from redis import Redis  # noqa: E402

import queueing  # noqa: E402
import reconciler  # noqa: E402
import settings as settings_module  # noqa: E402
import worker  # noqa: E402
from webhook_app import create_app  # noqa: E402

GRAPH_BASE = "https://graph.test"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds=10.0, interval=0.05):
    """Poll until predicate() is truthy; return its last value."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def throwaway_redis_argv(port):
    """Return the command of a redis-server for tests: loopback, keeps nothing."""
    binary = shutil.which("redis-server")
    if not binary:
        pytest.fail("redis-server is not installed; the tests need a real Redis")
    return [binary, "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no"]  # fmt: skip


@pytest.fixture(scope="session")
def redis_server():
    """A redis-server of the tests' own, on a free port, for the whole session."""
    port = free_port()
    proc = subprocess.Popen(
        throwaway_redis_argv(port),
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    wait_for(lambda: _pings(client))
    yield url
    proc.terminate()
    proc.wait(10)


def _pings(client):
    try:
        return client.ping()
    except Exception:
        return False


@pytest.fixture
def env(tmp_path, redis_server, monkeypatch):
    """A clean environment holding the service's settings; returns it as a dict."""
    for name in list(os.environ):
        if name.startswith(
            (
                "IG_",
                "GRAPH_",
                "REDIS_",
                "RQ_",
                "DATABASE_",
                "REPLY_",
                "AUTO_REPLY",
                "RETRY_",
                "MAX_BODY",
                "WORKER_",
            )
        ):
            monkeypatch.delenv(name)
    values = {
        "ENV_FILE": str(tmp_path / "no.env"),
        "IG_APP_SECRET": payloads.APP_SECRET,
        "IG_VERIFY_TOKEN": payloads.VERIFY_TOKEN,
        "IG_ACCESS_TOKEN": payloads.ACCESS_TOKEN,
        "IG_ACCOUNT_ID": payloads.ACCOUNT_ID,
        "GRAPH_API_BASE": GRAPH_BASE,
        "GRAPH_API_VERSION": "v24.0",
        "REDIS_URL": redis_server,
        "DATABASE_PATH": str(tmp_path / "data" / "webhooks.db"),
        "AUTO_REPLY_TEXT": "Thanks, we got your message.",
        "REPLY_COOLDOWN_SECONDS": "0",
        "RETRY_DELAYS": "0,0",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    Redis.from_url(redis_server).flushdb()
    worker._context = None
    # When this process last cleared the invalid-token flag: not in another test.
    monkeypatch.setattr(worker, "_token_cleared_at", float("-inf"))
    yield values
    worker._context = None


@pytest.fixture
def settings(env):
    return settings_module.from_env(os.environ)


@pytest.fixture
def app(env):
    return create_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def store(app):
    return app.extensions["store"]


@pytest.fixture
def post(client):
    """Post a correctly signed delivery; keyword overrides change the headers."""

    def post(delivery, **header_overrides):
        raw = delivery if isinstance(delivery, bytes) else payloads.body(delivery)
        return client.post(
            "/webhooks/instagram",
            data=raw,
            headers=payloads.signed_headers(raw, **header_overrides),
        )

    return post


@pytest.fixture
def queue(settings):
    return queueing.get_queue(settings)


@pytest.fixture
def relay(store, queue, settings):
    """Queue the stored events, as a worker's relay does a moment after a POST."""

    def relay():
        return reconciler.relay_received(store, queue, settings)

    return relay


@pytest.fixture
def work(queue, relay):
    """Relay, then run the worker code until the queue is empty.

    As `python worker.py --burst` does, but for the rest of its first pass.
    """

    def work():
        relay()
        worker.EventWorker([queue], connection=queue.connection).work(burst=True)

    return work


@pytest.fixture
def graph(requests_mock):
    """The Send API, stubbed: every call succeeds with a fresh message_id."""
    counter = iter(range(1, 1_000_000))
    requests_mock.post(
        f"{GRAPH_BASE}/v24.0/{payloads.ACCOUNT_ID}/messages",
        json=lambda request, context: {
            "recipient_id": request.json()["recipient"].get("id"),
            "message_id": f"m_{next(counter)}",
        },
    )
    return requests_mock


def rows(store, table, where="1=1", params=()):
    """Return rows of a table of the main database.

    Events the web stored wait in the inbox until a relay moves them; for
    webhook_events they are moved first, as a relay's first step would, so
    the table shows every stored event (unmoved ones still 'received').
    """
    if table == "webhook_events":
        while store.move_inbox(500):
            pass
    return list(store.db.query(f"SELECT * FROM {table} WHERE {where}", params))
