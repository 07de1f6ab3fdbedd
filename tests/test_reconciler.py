"""The reconciler's passes against a real Redis and a temporary SQLite file."""

import payloads
import pytest
from conftest import rows
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

import reconciler
import storage


@pytest.fixture
def no_grace(monkeypatch):
    monkeypatch.setattr(reconciler, "RELAY_GRACE_SECONDS", 0)


def stored_but_not_queued(store, count=1):
    """Events stored while Redis was away: status 'received', no job."""
    from events import parse_delivery

    events = []
    for _ in range(count):
        raw = payloads.body(payloads.delivery(payloads.text_message(payloads.new_id())))
        events += parse_delivery(raw, payloads.ACCOUNT_ID)
    store.store_events(events)
    return [e.key for e in events]


def age(store, key, seconds, column="updated_at"):
    store.db.execute(
        f"UPDATE webhook_events SET {column} = ? WHERE event_key = ?",
        (storage.now_iso(-seconds), key),
    )


def test_relay_queues_events_stored_while_redis_was_away(
    store, queue, settings, work, graph, no_grace
):
    keys = stored_but_not_queued(store, 3)

    done = reconciler.run_pass(store, queue, settings)
    work()

    assert done["relayed"] == 3
    assert {r["status"] for r in rows(store, "webhook_events")} == {"done"}
    assert len(graph.request_history) == 3
    assert sorted(
        r["event_key"] for r in rows(store, "audit_log", "detail = ?", ["by the relay"])
    ) == sorted(keys)


def test_relay_leaves_fresh_events_to_the_web(store, queue, settings):
    stored_but_not_queued(store)
    assert reconciler.run_pass(store, queue, settings)["relayed"] == 0
    assert queue.count == 0


def test_relay_twice_enqueues_a_duplicate_that_does_nothing(
    store, queue, settings, work, graph, no_grace
):
    [key] = stored_but_not_queued(store)
    reconciler.relay_received(store, queue, settings)
    store.db.execute(
        "UPDATE webhook_events SET status = 'received' WHERE event_key = ?", [key]
    )
    reconciler.relay_received(store, queue, settings)
    assert queue.count == 2

    work()

    assert len(graph.request_history) == 1


def test_attempt_whose_lease_ran_out_is_tried_again(
    post, store, queue, settings, work, graph
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    [event] = rows(store, "webhook_events")
    store.start_attempt(event["event_key"], lease_seconds=-1)  # a worker died mid-job
    queue.empty()

    assert reconciler.run_pass(store, queue, settings)["abandoned"] == 1
    work()

    [event] = rows(store, "webhook_events")
    assert event["status"] == "done"
    assert len(graph.request_history) == 1


def test_abandoned_after_the_last_attempt_goes_to_dead_letter(
    post, store, queue, settings
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    [event] = rows(store, "webhook_events")
    for _ in range(len(settings.retry_delays) + 1):
        store.start_attempt(event["event_key"], lease_seconds=-1)

    reconciler.run_pass(store, queue, settings)

    [dead] = rows(store, "dead_letter")
    assert dead["reason"] == "retries_exhausted"


def test_queued_event_whose_job_vanished_is_queued_again(
    post, store, queue, settings, work, graph, monkeypatch
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    [event] = rows(store, "webhook_events")
    queue.connection.flushdb()  # Redis restarted without its data
    age(store, event["event_key"], settings.queued_stale_seconds + 1)

    assert reconciler.run_pass(store, queue, settings)["stalled"] == 1
    work()

    assert rows(store, "webhook_events")[0]["status"] == "done"
    assert len(graph.request_history) == 1


def test_queued_event_waiting_for_its_retry_is_left_alone(post, store, queue, settings):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    [event] = rows(store, "webhook_events")
    store.release(event["event_key"], "retried", retry_in=3600)
    age(store, event["event_key"], settings.queued_stale_seconds + 1)

    assert reconciler.run_pass(store, queue, settings)["stalled"] == 0


def test_failed_job_whose_callback_never_ran_is_copied_to_dead_letter_once(
    post, store, queue, settings
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    [event] = rows(store, "webhook_events")
    job = Job.fetch(event["job_id"], connection=queue.connection)
    FailedJobRegistry(queue=queue).add(job, ttl=60, exc_string="JobTimeoutException")
    job.meta["reason"] = "timeout"
    job.save_meta()

    reconciler.run_pass(store, queue, settings)
    reconciler.run_pass(store, queue, settings)

    [dead] = rows(store, "dead_letter")
    assert dead["reason"] == "timeout"
    assert rows(store, "webhook_events")[0]["status"] == "dead"


def test_failed_job_expired_before_anyone_copied_it_is_not_lost(
    post, store, queue, settings, work, graph
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    [event] = rows(store, "webhook_events")
    Job.fetch(
        event["job_id"], connection=queue.connection
    ).delete()  # failure_ttl ran out
    age(store, event["event_key"], settings.queued_stale_seconds + 1)

    reconciler.run_pass(store, queue, settings)
    work()

    assert rows(store, "webhook_events")[0]["status"] == "done"


def test_failed_job_superseded_by_a_later_one_leaves_the_registry(
    post, store, queue, settings, work, graph
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    [event] = rows(store, "webhook_events")
    old = Job.fetch(event["job_id"], connection=queue.connection)
    work()
    FailedJobRegistry(queue=queue).add(old, ttl=60, exc_string="AbandonedJobError")

    reconciler.run_pass(store, queue, settings)

    assert FailedJobRegistry(queue=queue).get_job_ids() == []
    assert rows(store, "dead_letter") == []


def test_stalled_event_whose_old_job_failed_unrecorded_is_dead_lettered(
    post, store, queue, settings
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    [event] = rows(store, "webhook_events")
    job = Job.fetch(event["job_id"], connection=queue.connection)
    queue.remove(job)
    job.set_status(JobStatus.FAILED)
    FailedJobRegistry(queue=queue).add(job, ttl=60, exc_string="JobTimeoutException")
    age(store, event["event_key"], settings.queued_stale_seconds + 1)

    # Only the stalled-event pass: the failure is too old for the newest-first read.
    assert reconciler.requeue_stalled(store, queue, settings) == 1

    [dead] = rows(store, "dead_letter")
    assert dead["reason"] in ("timeout", "internal_error")
    assert queue.count == 0  # dead-lettered, not queued again
