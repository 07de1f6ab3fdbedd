"""The worker's jobs against a real Redis, temporary SQLite and a stubbed Graph API."""

import logging
import os
import subprocess
import sys
import threading
import time

import payloads
import pytest
from conftest import GRAPH_BASE, rows
from rq.registry import FailedJobRegistry, ScheduledJobRegistry

import queueing
import worker
from errors import GraphAPIError, StorageError

SEND_URL = f"{GRAPH_BASE}/v24.0/{payloads.ACCOUNT_ID}/messages"


def graph_error(code, subcode=None, status=400, transient=None):
    error = {
        "message": "Meta says no",
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "Atrace123",
    }
    if subcode:
        error["error_subcode"] = subcode
    if transient is not None:
        error["is_transient"] = transient
    return {"status_code": status, "json": {"error": error}}


def event_row(store):
    [event] = rows(store, "webhook_events")
    return event


def sends(requests_mock):
    return [r for r in requests_mock.request_history if r.method == "POST"]


# -- replies -----------------------------------------------------------------


def test_direct_message_gets_one_reply_through_the_send_api(post, work, graph, store):
    sender = payloads.new_id()
    post(payloads.delivery(payloads.text_message(sender, "are you open?")))

    work()

    [call] = sends(graph)
    assert call.url == SEND_URL
    assert call.json() == {
        "recipient": {"id": sender},
        "message": {"text": "Thanks, we got your message."},
    }
    assert call.headers["Authorization"] == f"Bearer {payloads.ACCESS_TOKEN}"
    assert payloads.ACCESS_TOKEN not in call.url
    assert call.timeout == 10.0
    event = event_row(store)
    assert (event["status"], event["reply_message_id"]) == ("done", "m_1")
    actions = [step["action"] for step in store.audit_trail(event["event_key"])]
    assert actions == ["received", "queued", "replied"]


def test_attachment_only_message_gets_a_reply(post, work, graph, store):
    post(payloads.delivery(payloads.attachment_message(payloads.new_id(), "ig_reel")))
    work()
    assert len(sends(graph)) == 1
    assert event_row(store)["status"] == "done"


@pytest.mark.parametrize(
    "make",
    [
        lambda user, mid: payloads.echo(user),
        lambda user, mid: payloads.reaction(user, mid),
        lambda user, mid: payloads.read(user, mid),
        lambda user, mid: payloads.deleted(user, mid),
        lambda user, mid: payloads.edit(user, mid),
        lambda user, mid: payloads.postback(user),
        lambda user, mid: payloads.messaging(user, something_new={"x": 1}),
    ],
    ids=["echo", "reaction", "read", "deleted", "edit", "postback", "unknown"],
)
def test_events_that_need_no_reply_end_ignored(post, work, graph, store, make):
    post(payloads.delivery(make(payloads.new_id(), payloads.new_mid())))

    work()

    assert sends(graph) == []
    event = event_row(store)
    assert event["status"] == "ignored"
    assert event["outcome"].startswith("no reply to")


def test_comments_mentions_and_standby_end_ignored(post, work, graph, store):
    user = payloads.new_id()
    post(
        payloads.delivery(
            changes=[payloads.comment_change(), payloads.mention_change()],
            standby=[payloads.text_message(user)],
        )
    )
    work()
    assert sends(graph) == []
    assert {r["status"] for r in rows(store, "webhook_events")} == {"ignored"}


def test_message_from_our_own_account_is_never_answered(post, work, graph, store):
    own = payloads.messaging(
        payloads.ACCOUNT_ID, message={"mid": payloads.new_mid(), "text": "from the app"}
    )
    post(payloads.delivery(own))
    work()
    assert sends(graph) == []
    assert event_row(store)["kind"] == "echo"


def test_cooldown_allows_one_default_reply_per_sender(
    post, work, graph, store, monkeypatch
):
    monkeypatch.setenv("REPLY_COOLDOWN_SECONDS", "3600")
    sender, other = payloads.new_id(), payloads.new_id()
    post(payloads.delivery(payloads.text_message(sender, "first")))
    post(payloads.delivery(payloads.text_message(sender, "second")))
    post(payloads.delivery(payloads.text_message(other, "hello")))

    work()

    recipients = [call.json()["recipient"]["id"] for call in sends(graph)]
    assert sorted(recipients) == sorted([sender, other])
    outcomes = sorted(r["outcome"] for r in rows(store, "webhook_events"))
    assert outcomes == ["cooldown", "replied", "replied"]
    assert sender not in str(rows(store, "reply_cooldowns"))


def test_empty_auto_reply_text_turns_replies_off(post, work, graph, store, monkeypatch):
    monkeypatch.setenv("AUTO_REPLY_TEXT", "")
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    work()
    assert sends(graph) == []
    assert event_row(store)["status"] == "ignored"


def test_message_older_than_24_hours_is_dead_lettered_without_a_call(
    post, work, graph, store
):
    old = payloads.now_ms() - 25 * 3600 * 1000
    post(payloads.delivery(payloads.text_message(payloads.new_id(), timestamp=old)))

    work()

    assert sends(graph) == []
    assert event_row(store)["status"] == "dead"
    [dead] = rows(store, "dead_letter")
    assert (dead["reason"], dead["status"]) == ("outside_window", "open")


# -- failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, reason",
    [
        (graph_error(190), "token_invalid"),
        (graph_error(551), "recipient_unavailable"),
        (graph_error(10, 2018278), "outside_window"),
        (graph_error(100), "bad_request"),
        (graph_error(200, status=403), "permission_denied"),
    ],
)
def test_permanent_graph_error_is_not_retried_and_dead_lettered_once(
    post, work, requests_mock, store, queue, answer, reason
):
    requests_mock.post(SEND_URL, **answer)
    post(payloads.delivery(payloads.text_message(payloads.new_id())))

    work()

    assert len(sends(requests_mock)) == 1
    [dead] = rows(store, "dead_letter")
    assert (dead["reason"], dead["attempts"]) == (reason, 1)
    assert "Atrace123" in dead["error"]
    assert event_row(store)["status"] == "dead"
    assert FailedJobRegistry(queue=queue).get_job_ids() == [event_row(store)["job_id"]]


def test_expired_token_logs_one_error_naming_the_setting(
    post, work, requests_mock, caplog
):
    requests_mock.post(SEND_URL, **graph_error(190))
    post(payloads.delivery(payloads.text_message(payloads.new_id())))

    work()

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "IG_ACCESS_TOKEN" in errors[0].getMessage()
    assert "Traceback" not in caplog.text


def test_transient_error_is_retried_until_the_reply_goes_out_once(
    post, work, requests_mock, store
):
    requests_mock.post(
        SEND_URL,
        [
            {"status_code": 500, "text": "<html>oops</html>"},
            graph_error(2, status=503, transient=True),
            {"json": {"recipient_id": "x", "message_id": "m_ok"}},
        ],
    )
    post(payloads.delivery(payloads.text_message(payloads.new_id())))

    work()

    assert len(sends(requests_mock)) == 3
    event = event_row(store)
    assert (event["status"], event["reply_message_id"], event["attempts"]) == (
        "done",
        "m_ok",
        3,
    )
    assert rows(store, "dead_letter") == []
    assert [r["action"] for r in rows(store, "audit_log")].count("retried") == 2


def test_network_errors_are_retried(post, work, requests_mock, store):
    import requests

    requests_mock.post(
        SEND_URL,
        [
            {"exc": requests.exceptions.ConnectTimeout},
            {"exc": requests.exceptions.ReadTimeout},
            {"json": {"message_id": "m_ok"}},
        ],
    )
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    work()
    assert event_row(store)["reply_message_id"] == "m_ok"


def test_last_failed_retry_goes_to_dead_letter_as_retries_exhausted(
    post, work, requests_mock, store, queue
):
    requests_mock.post(SEND_URL, status_code=502, text="bad gateway")
    post(payloads.delivery(payloads.text_message(payloads.new_id())))

    work()

    # RETRY_DELAYS has two values: the first attempt and two retries.
    assert len(sends(requests_mock)) == 3
    [dead] = rows(store, "dead_letter")
    assert (dead["reason"], dead["attempts"]) == ("retries_exhausted", 3)
    assert len(FailedJobRegistry(queue=queue)) == 1


def test_rate_limit_waits_as_long_as_meta_asks(post, work, requests_mock, store, queue):
    requests_mock.post(
        SEND_URL,
        status_code=400,
        headers={"Retry-After": "120"},
        json=graph_error(613)["json"],
    )
    post(payloads.delivery(payloads.text_message(payloads.new_id())))

    work()

    registry = ScheduledJobRegistry(queue=queue)
    [job_id] = registry.get_job_ids()
    waits = queue.connection.zscore(registry.key, job_id) - time.time()
    assert 110 < waits <= 125
    assert len(sends(requests_mock)) == 1
    assert event_row(store)["status"] == "queued"


# -- never twice -------------------------------------------------------------


def test_duplicate_job_for_a_replied_event_sends_nothing(
    post, work, graph, store, queue, settings
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    work()
    key = event_row(store)["event_key"]

    queueing.enqueue_events(queue, [(key, "message")], settings)
    work()

    assert len(sends(graph)) == 1
    assert event_row(store)["status"] == "done"


def test_recorded_reply_is_never_sent_again_even_if_the_event_is_reopened(
    post, work, graph, store
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    work()
    key = event_row(store)["event_key"]
    store.db.execute(
        "UPDATE webhook_events SET status = 'queued' WHERE event_key = ?", [key]
    )

    worker.handle_event(key)

    assert len(sends(graph)) == 1
    assert event_row(store)["outcome"] == "already_replied"


def test_event_held_by_another_worker_is_left_alone(post, relay, graph, store, env):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    key = event_row(store)["event_key"]
    store.start_attempt(key, lease_seconds=60)

    worker.handle_event(key)

    assert sends(graph) == []


# -- retry delays ------------------------------------------------------------


def test_retry_delay_follows_retry_delays_with_jitter_and_a_cap(monkeypatch):
    monkeypatch.setattr(worker, "jitter", lambda seconds: seconds / 10)
    delays = (10, 60, 100_000)

    assert worker.retry_delay(1, delays) == 11
    assert worker.retry_delay(2, delays) == 66
    assert worker.retry_delay(3, delays) == worker.MAX_RETRY_DELAY_SECONDS


def test_retry_delay_never_undercuts_what_meta_asked(monkeypatch):
    monkeypatch.setattr(worker, "jitter", lambda seconds: 0)
    assert worker.retry_delay(1, (10,), retry_after=300) == 300
    assert worker.retry_delay(1, (10,), retry_after=5) == 10


def test_jitter_stays_within_a_tenth():
    assert all(0 <= worker.jitter(100) <= 10 for _ in range(200))


# -- logs ----------------------------------------------------------------------


def test_worker_logs_hold_no_text_sender_or_token(post, work, requests_mock, caplog):
    caplog.set_level("DEBUG")
    ok, failing = payloads.new_id(), payloads.new_id()
    requests_mock.post(
        SEND_URL,
        [
            {"json": {"message_id": "m_1"}},
            {
                "status_code": 400,
                "json": {
                    "error": {
                        "code": 190,
                        "message": f"token {payloads.ACCESS_TOKEN} expired",
                    }
                },
            },
        ],
    )
    post(payloads.delivery(payloads.text_message(ok, "marker-text-77")))
    post(payloads.delivery(payloads.text_message(failing, "marker-text-78")))

    work()

    text = caplog.text
    assert "replied" in text and "dead-lettered" in text
    for secret in (
        ok,
        failing,
        "marker-text-77",
        "marker-text-78",
        payloads.ACCESS_TOKEN,
        payloads.APP_SECRET,
    ):
        assert secret not in text


def test_dead_letter_error_says_what_failed_without_metas_text(
    post, work, requests_mock, store
):
    sender = payloads.new_id()
    message = f"Bad token {payloads.ACCESS_TOKEN} for user {sender} (someone.name)"
    requests_mock.post(
        SEND_URL,
        status_code=400,
        json={"error": {"code": 190, "message": message, "fbtrace_id": "TrX"}},
    )
    post(payloads.delivery(payloads.text_message(sender)))
    work()
    [dead] = rows(store, "dead_letter")
    for secret in (payloads.ACCESS_TOKEN, sender, "someone.name"):
        assert secret not in dead["error"]
    assert "access token invalid or expired" in dead["error"]
    assert "code=190" in dead["error"] and "TrX" in dead["error"]


def test_graph_api_error_str_names_code_and_trace():
    exc = GraphAPIError("no", http_status=400, code=190, trace_id="T1")
    assert str(exc) == "no http_status=400 code=190 trace_id=T1"


def test_failed_event_frees_the_senders_reply_slot(
    post, work, requests_mock, store, monkeypatch
):
    monkeypatch.setenv("REPLY_COOLDOWN_SECONDS", "3600")
    sender = payloads.new_id()
    requests_mock.post(SEND_URL, status_code=503, text="down")
    post(payloads.delivery(payloads.text_message(sender, "first")))
    work()
    assert rows(store, "dead_letter")[0]["reason"] == "retries_exhausted"

    requests_mock.post(SEND_URL, json={"message_id": "m_late"})
    post(payloads.delivery(payloads.text_message(sender, "second")))
    work()

    replied = rows(store, "webhook_events", "reply_message_id = ?", ["m_late"])
    assert len(replied) == 1


def test_uncertain_send_is_marked_and_retried_by_default(
    post, work, requests_mock, store
):
    import requests

    requests_mock.post(
        SEND_URL,
        [{"exc": requests.exceptions.ReadTimeout}, {"json": {"message_id": "m_2"}}],
    )
    post(payloads.delivery(payloads.text_message(payloads.new_id())))

    work()

    event = event_row(store)
    assert (event["status"], event["send_uncertain"]) == ("done", 1)
    actions = [r["action"] for r in rows(store, "audit_log")]
    assert "send_outcome_unknown" in actions


def test_uncertain_send_is_not_retried_when_switched_off(
    post, work, requests_mock, store, monkeypatch
):
    import requests

    monkeypatch.setenv("RETRY_UNCERTAIN_SENDS", "false")
    requests_mock.post(SEND_URL, exc=requests.exceptions.ReadTimeout)
    post(payloads.delivery(payloads.text_message(payloads.new_id())))

    work()

    assert len(sends(requests_mock)) == 1
    [dead] = rows(store, "dead_letter")
    assert dead["reason"] == "send_uncertain"


def test_an_unexpected_error_is_dead_lettered_as_internal_error(
    post, work, graph, store, monkeypatch
):
    def broken(*args):
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(worker, "decide", broken)
    post(payloads.delivery(payloads.text_message(payloads.new_id())))

    work()

    assert rows(store, "dead_letter")[0]["reason"] == "internal_error"


def test_a_database_that_cannot_start_the_attempt_is_tried_again_not_buried(
    post, work, graph, store, queue, monkeypatch
):
    """A storage failure at the start of a job writes nothing and retries later."""
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    real_start = worker.Store.start_attempt

    def unavailable(self, key, lease):
        raise StorageError("cannot open the database at DATABASE_PATH: disk gone")

    monkeypatch.setattr(worker.Store, "start_attempt", unavailable)
    work()

    registry = ScheduledJobRegistry(queue=queue)
    [job_id] = registry.get_job_ids()
    waits = queue.connection.zscore(registry.key, job_id) - time.time()
    assert 0 < waits <= worker.DATABASE_RETRY_SECONDS
    assert rows(store, "dead_letter") == []
    assert event_row(store)["status"] == "queued"
    assert event_row(store)["attempts"] == 0
    assert sends(graph) == []

    # The database is back and the retry is due: one reply, nothing buried.
    monkeypatch.setattr(worker.Store, "start_attempt", real_start)
    queue.connection.zadd(registry.key, {job_id: 0})
    worker.EventWorker([queue], connection=queue.connection).work(
        burst=True, with_scheduler=True
    )

    assert event_row(store)["status"] == "done"
    assert len(sends(graph)) == 1
    assert rows(store, "dead_letter") == []


def test_a_worker_takes_no_job_while_the_relay_sees_a_flood(
    post, relay, queue, store, graph, monkeypatch
):
    monkeypatch.setattr(worker, "FLOOD_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(worker, "FLOODED", threading.Event())
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    rq_worker = worker.EventWorker([queue], connection=queue.connection)
    taken = []
    worker.FLOODED.set()
    waiting = threading.Thread(
        target=lambda: taken.append(rq_worker.dequeue_job_and_maintain_ttl(5))
    )
    waiting.start()
    try:
        waiting.join(0.5)
        assert waiting.is_alive() and taken == []
        assert queue.count == 1  # the job waits on the queue, not in a thread

        worker.FLOODED.clear()
        waiting.join(5)
        [(job, _)] = taken
        assert job.args == (event_row(store)["event_key"],)
    finally:
        worker.FLOODED.clear()
        worker.STOP.set()
        waiting.join(5)
        worker.STOP.clear()


@pytest.mark.parametrize(
    "nice, idle_class", [(19, True), (10, False)], ids=["lowest", "lower"]
)
def test_a_worker_at_the_lowest_niceness_runs_in_the_idle_scheduling_class(
    nice, idle_class
):
    # In a process of its own: priority, once lowered, stays lowered.
    code = (
        "import os, worker\n"
        f"worker._lower_priority({nice})\n"
        "print(os.nice(0), os.sched_getscheduler(0) == os.SCHED_IDLE)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=60,
    )

    expected_nice = min(19, os.nice(0) + nice)  # nice adds to the runner's own
    assert found.stdout.split() == [str(expected_nice), str(idle_class)], found.stderr
