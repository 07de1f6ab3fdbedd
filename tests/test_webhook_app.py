"""The web side against a real Redis and a temporary SQLite file."""

import re
import socket
import sqlite3
import time

import payloads
import pytest
from conftest import rows
from redis import Redis

import storage
from webhook_app import create_app

HANDSHAKE = "/webhooks/instagram"


def handshake(client, **params):
    query = {
        "hub.mode": "subscribe",
        "hub.verify_token": payloads.VERIFY_TOKEN,
        "hub.challenge": "1158201444",
    }
    query.update(params)
    return client.get(HANDSHAKE, query_string={k: v for k, v in query.items() if v})


# -- handshake ---------------------------------------------------------------


@pytest.mark.parametrize("challenge", ["1158201444", "0042", "a b+c/d=é", "-1.5e3"])
def test_handshake_echoes_the_challenge_verbatim_as_plain_text(client, challenge):
    response = handshake(client, **{"hub.challenge": challenge})

    assert response.status_code == 200
    assert response.get_data(as_text=True) == challenge
    assert response.mimetype == "text/plain"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "change",
    [
        {"hub.verify_token": "wrong-token"},
        {"hub.verify_token": None},
        {"hub.mode": "unsubscribe"},
        {"hub.mode": None},
    ],
)
def test_handshake_with_wrong_token_or_mode_is_refused_without_echo(client, change):
    response = handshake(client, **{"hub.challenge": "4242424242", **change})

    assert response.status_code == 403
    assert b"4242424242" not in response.data


def test_handshake_refuses_a_missing_or_huge_challenge(client):
    assert handshake(client, **{"hub.challenge": None}).status_code == 400
    assert handshake(client, **{"hub.challenge": "9" * 5000}).status_code == 400


# -- deliveries --------------------------------------------------------------


def test_signed_message_is_stored_answered_200_and_queued_by_the_relay(
    post, store, queue, relay
):
    sender = payloads.new_id()
    response = post(payloads.delivery(payloads.text_message(sender, "secret words")))

    assert response.status_code == 200
    assert response.get_json() == {"received": 1, "new": 1}
    [event] = rows(store, "webhook_events")
    assert (event["kind"], event["status"]) == ("message", "received")
    assert event["account_id"] == payloads.ACCOUNT_ID
    assert event["occurred_at"] and event["received_at"]
    assert "secret words" in event["payload"]
    # The web stores; it puts nothing on the queue itself.
    assert event["job_id"] is None
    assert queue.count == 0

    assert relay() == 1

    [event] = rows(store, "webhook_events")
    assert event["status"] == "queued"
    assert queue.job_ids == [event["job_id"]]
    assert re.fullmatch(re.escape(event["event_key"]) + "-[0-9a-f]{8}", event["job_id"])


def test_job_carries_only_the_event_key(post, queue, relay):
    sender = payloads.new_id()
    post(payloads.delivery(payloads.text_message(sender, "my phone is 555-0100")))
    relay()

    [job] = queue.jobs
    assert job.args == (job.id.rsplit("-", 1)[0],)
    assert job.kwargs == {}
    visible = f"{job.description} {job.meta} {job.func_name}"
    assert sender not in visible and "555-0100" not in visible
    assert "message event" in job.description


@pytest.mark.parametrize(
    "headers, reason",
    [
        ({"X_Hub_Signature_256": None}, "missing"),
        ({"X_Hub_Signature_256": ""}, "must start with"),
        ({"X_Hub_Signature_256": "sha256=" + "0" * 64}, "does not match"),
        ({"X_Hub_Signature_256": "sha1=" + "0" * 40}, "must start with"),
    ],
)
def test_bad_signature_gets_401_and_nothing_is_stored(
    post, store, queue, relay, headers, reason
):
    response = post(
        payloads.delivery(payloads.text_message(payloads.new_id())), **headers
    )

    assert response.status_code == 401
    assert reason in response.get_json()["error"]
    assert rows(store, "webhook_events") == []
    assert relay() == 0
    assert queue.count == 0
    assert [r["action"] for r in rows(store, "audit_log")] == ["rejected_delivery"]


def test_signature_made_with_another_secret_is_refused(client, store):
    raw = payloads.body(payloads.delivery(payloads.text_message(payloads.new_id())))
    response = client.post(
        HANDSHAKE, data=raw, headers=payloads.signed_headers(raw, secret="not-ours")
    )

    assert response.status_code == 401
    assert rows(store, "webhook_events") == []


def test_meta_escaped_body_passes_on_its_raw_bytes(post, store):
    message = payloads.text_message(
        payloads.new_id(), "Café 👍 https://example.com/a?b=1"
    )
    raw = payloads.meta_escaped(payloads.delivery(message))
    assert b"\\u00e9" in raw and b"\\/" in raw

    assert post(raw).status_code == 200
    assert len(rows(store, "webhook_events")) == 1


def test_a_rotated_secret_still_passes(env, monkeypatch):
    monkeypatch.setenv("IG_APP_SECRET", f"new-secret,{payloads.APP_SECRET}")
    client = create_app().test_client()
    raw = payloads.body(payloads.delivery(payloads.text_message(payloads.new_id())))

    response = client.post(HANDSHAKE, data=raw, headers=payloads.signed_headers(raw))
    assert response.status_code == 200


def test_same_delivery_twice_is_stored_and_queued_once(post, store, queue, relay):
    delivery = payloads.delivery(payloads.text_message(payloads.new_id()))

    assert post(delivery).status_code == 200
    assert relay() == 1
    again = post(delivery)
    assert relay() == 0

    assert again.status_code == 200
    assert again.get_json() == {"received": 1, "new": 0}
    [event] = rows(store, "webhook_events")
    assert queue.count == 1
    actions = [step["action"] for step in store.audit_trail(event["event_key"])]
    assert actions == ["received", "queued", "duplicate"]


def test_event_redelivered_in_another_batch_is_not_stored_again(
    post, store, queue, relay
):
    first = payloads.text_message(payloads.new_id())
    second = payloads.text_message(payloads.new_id())
    post(payloads.delivery(first))
    relay()

    response = post(payloads.delivery(second, first))

    assert response.get_json() == {"received": 2, "new": 1}
    assert len(rows(store, "webhook_events")) == 2
    assert relay() == 1
    assert queue.count == 2


def test_mixed_batch_stores_every_event_with_its_kind(post, store, queue, relay):
    user = payloads.new_id()
    mid = payloads.new_mid()
    delivery = {
        "object": "instagram",
        "entry": [
            payloads.entry(
                [
                    payloads.text_message(user, mid=mid),
                    payloads.reaction(user, mid),
                    payloads.read(user, mid),
                    payloads.echo(user),
                ]
            ),
            payloads.entry(
                changes=[payloads.comment_change(), payloads.mention_change()],
                standby=[payloads.text_message(user)],
            ),
        ],
    }

    assert post(delivery).status_code == 200

    kinds = sorted(r["kind"] for r in rows(store, "webhook_events"))
    assert kinds == sorted(
        ["message", "reaction", "read", "echo", "comment", "mention", "standby"]
    )
    assert relay() == 7
    assert queue.count == 7


@pytest.mark.parametrize(
    "raw", [b"not json", b"[1, 2]", b'{"object": "instagram"}', b""]
)
def test_signed_but_unreadable_body_is_kept_in_dead_letter(
    post, store, queue, relay, raw
):
    response = post(raw)

    assert response.status_code == 200
    [dead] = rows(store, "dead_letter")
    assert dead["reason"] == "unparseable"
    [event] = rows(store, "webhook_events")
    assert event["payload"] == raw.decode()
    assert relay() == 0  # nothing to work: a retry would not make it readable
    assert queue.count == 0
    actions = [step["action"] for step in store.audit_trail(event["event_key"])]
    assert actions == ["received", "dead_lettered"]


def test_redis_down_still_stores_the_event_and_the_relay_queues_it_later(
    env, monkeypatch, relay, queue
):
    from conftest import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    app = create_app()
    raw = payloads.body(payloads.delivery(payloads.text_message(payloads.new_id())))

    response = app.test_client().post(
        HANDSHAKE, data=raw, headers=payloads.signed_headers(raw)
    )

    assert response.status_code == 200
    assert response.get_json() == {"received": 1, "new": 1}
    [event] = rows(app.extensions["store"], "webhook_events")
    assert event["status"] == "received"

    # Redis answers the worker's relay again: the stored event goes on the queue.
    assert relay() == 1
    [event] = rows(app.extensions["store"], "webhook_events")
    assert event["status"] == "queued"
    assert queue.job_ids == [event["job_id"]]


def test_a_redis_that_hangs_does_not_delay_the_answer(env, monkeypatch):
    # Accepts connections and never answers: any Redis command would wait
    # for its socket timeout (seconds) before failing.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv(
            "REDIS_URL", f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        )
        app = create_app()
        raw = payloads.body(payloads.delivery(payloads.text_message(payloads.new_id())))
        started = time.monotonic()

        response = app.test_client().post(
            HANDSHAKE, data=raw, headers=payloads.signed_headers(raw)
        )
        took = time.monotonic() - started

    assert response.status_code == 200
    assert took < 1.0
    [event] = rows(app.extensions["store"], "webhook_events")
    assert event["status"] == "received"


def test_locked_database_answers_503_and_stores_nothing(env, monkeypatch, redis_server):
    monkeypatch.setattr(storage, "BUSY_TIMEOUT_SECONDS", 0.2)
    app = create_app()
    raw = payloads.body(payloads.delivery(payloads.text_message(payloads.new_id())))
    # Deliveries are stored in the inbox beside the main database file.
    blocker = sqlite3.connect(
        env["DATABASE_PATH"] + storage.INBOX_SUFFIX, isolation_level=None
    )
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        response = app.test_client().post(
            HANDSHAKE, data=raw, headers=payloads.signed_headers(raw)
        )
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert response.status_code == 503
    assert rows(app.extensions["store"], "webhook_events") == []
    assert Redis.from_url(redis_server).keys("rq:job:*") == []


def test_body_over_the_limit_gets_413(env, monkeypatch):
    monkeypatch.setenv("MAX_BODY_BYTES", "2048")
    app = create_app()
    raw = payloads.body(payloads.delivery(payloads.text_message("1", "x" * 4000)))

    response = app.test_client().post(
        HANDSHAKE, data=raw, headers=payloads.signed_headers(raw)
    )

    assert response.status_code == 413
    assert rows(app.extensions["store"], "webhook_events") == []


@pytest.mark.parametrize("method", ["put", "delete", "patch"])
def test_other_methods_get_405(client, method):
    response = getattr(client, method)(HANDSHAKE)
    assert response.status_code == 405
    assert response.is_json


def test_healthz_says_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_delivery_logs_hold_no_text_sender_or_secrets(post, caplog):
    caplog.set_level("DEBUG")
    sender = payloads.new_id()
    post(payloads.delivery(payloads.text_message(sender, "marker-text-51")))
    post(b"not json")
    post(payloads.delivery(payloads.text_message(sender)), X_Hub_Signature_256="bad")

    text = caplog.text
    assert "delivery" in text
    for secret in (
        sender,
        "marker-text-51",
        payloads.APP_SECRET,
        payloads.ACCESS_TOKEN,
    ):
        assert secret not in text


def test_a_stored_delivery_is_logged_only_at_debug(post, caplog):
    caplog.set_level("INFO")
    first = post(payloads.delivery(payloads.text_message(payloads.new_id())))
    assert first.status_code == 200
    assert [r for r in caplog.records if r.name == "webhook_app"] == []

    caplog.set_level("DEBUG")
    second = post(payloads.delivery(payloads.text_message(payloads.new_id())))
    assert second.status_code == 200
    lines = [r for r in caplog.records if r.name == "webhook_app"]
    assert lines and {r.levelname for r in lines} == {"DEBUG"}
    assert "1 events, 1 new, 0 duplicate" in caplog.text


def test_full_disk_answers_503_and_stores_nothing(client, store, post):
    # SQLite reports a database that may not grow as "database or disk is full".
    inbox = store.inbox.db  # where the web stores deliveries
    pages = next(inbox.query("PRAGMA page_count"))["page_count"]
    inbox.execute(f"PRAGMA max_page_count = {pages}")
    big = payloads.text_message(payloads.new_id(), "x" * 20_000)

    response = post(payloads.delivery(big))

    assert response.status_code == 503
    assert "retry" in response.get_json()["error"]
    assert rows(store, "webhook_events") == []


def test_event_nested_too_deeply_to_store_is_kept_as_unparseable(post, store):
    depth = 980  # parses, but is too deep to serialise again
    raw = (
        '{"object":"instagram","entry":[{"id":"1","messaging":['
        + "[" * depth
        + "]" * depth
        + "]}]}"
    ).encode()

    assert post(raw).status_code == 200
    assert [r["reason"] for r in rows(store, "dead_letter")] == ["unparseable"]


def test_lone_surrogates_in_ids_are_stored_not_crashed_on(post, store):
    raw = (
        b'{"object":"instagram","entry":[{"id":"\\udc00","time":1,"messaging":'
        b'[{"sender":{"id":"90\\ud800"},"recipient":{"id":"1"},"timestamp":1,'
        b'"message":{"mid":"m-\\udfff","text":"\\ud83d"}}]}]}'
    )

    assert post(raw).status_code == 200
    [event] = rows(store, "webhook_events")
    assert event["kind"] == "message"
    assert event["account_id"] == "\\udc00"
