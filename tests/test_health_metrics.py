"""Readiness, Prometheus metrics and log formats: what the people who run it look at."""

import json
import logging
import sqlite3

import payloads
import pytest
from conftest import GRAPH_BASE, free_port

import logs
import queueing
import storage
from webhook_app import create_app

SEND_URL = f"{GRAPH_BASE}/v24.0/{payloads.ACCOUNT_ID}/messages"


def test_readyz_is_ready_when_redis_database_and_token_are_fine(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ready",
        "checks": {
            "redis": "ok",
            "database": "ok",
            "graph_token": "ok",
            "relay": "ok",
        },
    }


def test_readyz_says_the_relay_is_behind_when_stored_events_wait(
    client, post, store, relay, monkeypatch
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    # Fresh events are only on their way: a worker's relay takes them soon.
    assert client.get("/readyz").status_code == 200

    store.inbox.db.execute(  # as if no worker had run for a minute
        "UPDATE inbox_events SET received_at = ?", (storage.now_iso(-60),)
    )
    response = client.get("/readyz")

    assert response.status_code == 503
    relay_check = response.get_json()["checks"]["relay"]
    assert relay_check.startswith("behind: 1 events")
    assert "worker" in relay_check

    relay()
    assert client.get("/readyz").status_code == 200


def test_readyz_is_ready_while_a_relay_works_through_a_backlog(
    client, post, store, queue, settings
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    store.inbox.db.execute(
        "UPDATE inbox_events SET received_at = ?", (storage.now_iso(-60),)
    )
    # A relay that waits for room on a full queue says it is at work.
    queue.connection.set(queueing.relay_heartbeat_key(settings), "1", ex=15)

    response = client.get("/readyz")

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["checks"]["relay"] == "ok"


def test_readyz_names_an_unreachable_redis(env, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")

    response = create_app().test_client().get("/readyz")

    assert response.status_code == 503
    checks = response.get_json()["checks"]
    assert checks["redis"].startswith("unreachable")
    assert checks["database"] == "ok"


def test_readyz_names_a_database_that_cannot_be_written(env, monkeypatch):
    import storage

    monkeypatch.setattr(storage, "BUSY_TIMEOUT_SECONDS", 0.1)
    app = create_app()
    # Deliveries are written to the inbox beside the main file.
    inbox = env["DATABASE_PATH"] + storage.INBOX_SUFFIX
    blocker = sqlite3.connect(inbox, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        response = app.test_client().get("/readyz")
    finally:
        blocker.execute("ROLLBACK")

    assert response.status_code == 503
    assert response.get_json()["checks"]["database"].startswith("not writable")


def test_readyz_reports_an_invalid_token_until_a_send_works(
    client, post, work, requests_mock
):
    requests_mock.post(SEND_URL, status_code=400, json={"error": {"code": 190}})
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    work()

    response = client.get("/readyz")
    assert response.status_code == 503
    assert "IG_ACCESS_TOKEN" in response.get_json()["checks"]["graph_token"]

    requests_mock.post(SEND_URL, json={"message_id": "m_1"})
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    work()
    assert client.get("/readyz").status_code == 200


def test_readyz_is_ready_again_when_a_send_works_right_after_a_refusal(
    client, post, work, requests_mock
):
    ok = {"json": {"message_id": "m_ok"}}
    refused = {"status_code": 400, "json": {"error": {"code": 190}}}
    requests_mock.post(SEND_URL, [ok, refused, ok])
    for _ in range(3):  # replied, refused, replied: within a second or two
        post(payloads.delivery(payloads.text_message(payloads.new_id())))
        work()

    assert client.get("/readyz").status_code == 200


def metric(text, name, **labels):
    """Return the value of one sample in Prometheus text, or 0.0 if absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        base, _, rest = sample.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if base == name and found == wanted:
            return float(value)
    return 0.0


def test_metrics_count_deliveries_events_and_graph_calls(
    client, post, work, requests_mock
):
    before = client.get("/metrics").get_data(as_text=True)
    requests_mock.post(
        SEND_URL,
        [
            {"json": {"message_id": "m_1"}},
            {"status_code": 400, "json": {"error": {"code": 551}}},
        ],
    )
    post(
        payloads.delivery(
            payloads.text_message(payloads.new_id()),
            payloads.text_message(payloads.new_id()),
            payloads.read(payloads.new_id(), payloads.new_mid()),
        )
    )
    post(
        payloads.delivery(payloads.text_message(payloads.new_id())),
        X_Hub_Signature_256="sha256=" + "0" * 64,
    )
    work()

    response = client.get("/metrics")
    after = response.get_data(as_text=True)

    assert response.status_code == 200
    assert response.mimetype == "text/plain"

    def grew(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("ig_webhooks_deliveries_total", outcome="accepted") == 1
    assert grew("ig_webhooks_deliveries_total", outcome="rejected") == 1
    assert grew("ig_webhooks_events_received_total", kind="message") == 2
    assert grew("ig_webhooks_events_received_total", kind="read") == 1
    assert grew("ig_webhooks_events_finished_total", kind="message", status="done") == 1
    assert grew("ig_webhooks_events_finished_total", kind="message", status="dead") == 1
    assert grew("ig_webhooks_events_finished_total", kind="read", status="ignored") == 1
    assert grew("ig_webhooks_graph_calls_total", outcome="ok") == 1
    assert grew("ig_webhooks_graph_calls_total", outcome="permanent") == 1
    assert grew("ig_webhooks_graph_call_seconds_count") == 2
    assert metric(after, "ig_webhooks_dead_letters_open") == 1
    assert metric(after, "ig_webhooks_queue_depth") == 0


def test_metrics_show_the_queue_depth(client, post, relay):
    post(
        payloads.delivery(
            payloads.text_message(payloads.new_id()),
            payloads.text_message(payloads.new_id()),
        )
    )
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, "ig_webhooks_events_waiting") == 2
    assert metric(text, "ig_webhooks_queue_depth") == 0

    relay()
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, "ig_webhooks_queue_depth") == 2
    assert metric(text, "ig_webhooks_events_waiting") == 0


def test_metrics_token_guards_the_page_when_set(env, monkeypatch):
    monkeypatch.setenv("METRICS_TOKEN", "scrape-me-42")
    client = create_app().test_client()

    assert client.get("/metrics").status_code == 401
    assert (
        client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-me-42"})
    assert ok.status_code == 200
    assert "scrape-me-42" not in client.get("/metrics").get_data(as_text=True)


@pytest.fixture
def configured():
    """Run logs.configure, then put the root logger back as it was."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def configured(*args):
        logs.configure(*args)
        return logs.our_handler()

    yield configured
    root.handlers, level = saved
    root.setLevel(level)


def record(name, level, message, *args):
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_json_log_format_gives_one_object_per_line(configured):
    handler = configured("INFO", "json")

    text = handler.format(record("worker", logging.INFO, "event %s: done", "abc123"))

    assert "\n" not in text
    line = json.loads(text)
    assert (line["level"], line["logger"]) == ("INFO", "worker")
    assert line["message"] == "event abc123: done"
    assert logging.getLogger().level == logging.INFO


def test_text_log_format_is_the_default(configured):
    handler = configured("WARNING")

    text = handler.format(record("webhook_app", logging.WARNING, "delivery %s", "d1"))

    assert text.endswith("WARNING webhook_app: delivery d1")
    assert logging.getLogger().level == logging.WARNING


def test_configuring_twice_keeps_one_handler(configured):
    configured("INFO", "json")
    configured("INFO", "text")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "ig_webhooks", 0)]
    assert len(ours) == 1


def test_bad_log_format_is_named_at_start_up():
    import settings
    from errors import ConfigError

    with pytest.raises(ConfigError, match="^LOG_FORMAT expected one of text, json"):
        settings.from_env(
            {"IG_APP_SECRET": "s", "IG_VERIFY_TOKEN": "v", "LOG_FORMAT": "xml"}
        )


def test_token_flag_round_trip(queue):
    queueing.flag_token(queue, "old-token", True)
    assert queueing.token_flagged(queue, "old-token")
    queueing.flag_token(queue, "old-token", False)
    assert not queueing.token_flagged(queue, "old-token")


def test_a_new_token_is_not_reported_invalid(env, client, queue, monkeypatch):
    queueing.flag_token(queue, payloads.ACCESS_TOKEN, True)
    assert client.get("/readyz").status_code == 503

    monkeypatch.setenv("IG_ACCESS_TOKEN", "IGAAaFreshTokenAfterTheFix")
    response = create_app().test_client().get("/readyz")

    assert response.status_code == 200


@pytest.mark.parametrize(
    "header", ["scrape-me-42", "Basic scrape-me-42", "Bearer  scrape-me-42x", ""]
)
def test_metrics_token_must_come_as_a_bearer_token(env, monkeypatch, header):
    monkeypatch.setenv("METRICS_TOKEN", "scrape-me-42")
    client = create_app().test_client()
    assert client.get("/metrics", headers={"Authorization": header}).status_code == 401


def test_bearer_scheme_is_read_in_any_case(env, monkeypatch):
    monkeypatch.setenv("METRICS_TOKEN", "scrape-me-42")
    client = create_app().test_client()
    ok = client.get("/metrics", headers={"Authorization": "bearer scrape-me-42"})
    assert ok.status_code == 200
