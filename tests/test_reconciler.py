"""The relay and the reconciler's passes against a real Redis and temporary SQLite."""

import dataclasses
import re
import subprocess
import threading

import payloads
import pytest
from conftest import rows
from redis.exceptions import RedisError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

import queueing
import reconciler
import storage


def stored_but_not_queued(store, count=1):
    """Events stored by the web, not relayed yet: status 'received', no job."""
    from events import parse_delivery

    events = []
    for _ in range(count):
        raw = payloads.body(payloads.delivery(payloads.text_message(payloads.new_id())))
        events += parse_delivery(raw, payloads.ACCOUNT_ID)
    store.store_events(events)
    return [e.key for e in events]


def tried(store, key):
    """Record one attempt, as a job that ran (and then timed out) did."""
    store.db.execute(
        "UPDATE webhook_events SET attempts = 1 WHERE event_key = ?", (key,)
    )


def age(store, key, seconds, column="updated_at"):
    store.db.execute(
        f"UPDATE webhook_events SET {column} = ? WHERE event_key = ?",
        (storage.now_iso(-seconds), key),
    )


def test_relay_queues_events_stored_while_redis_was_away(
    store, queue, settings, work, graph
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


def test_a_pass_queues_an_event_as_soon_as_it_is_stored(store, queue, settings):
    [key] = stored_but_not_queued(store)

    assert reconciler.run_pass(store, queue, settings)["relayed"] == 1

    event = store.get_event(key)
    assert event["status"] == "queued"
    assert queue.job_ids == [event["job_id"]]
    assert re.fullmatch(re.escape(key) + "-[0-9a-f]{8}", event["job_id"])


def test_relay_twice_enqueues_a_duplicate_that_does_nothing(
    store, queue, settings, work, graph
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
    post, relay, store, queue, settings, work, graph
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    store.start_attempt(event["event_key"], lease_seconds=-1)  # a worker died mid-job
    queue.empty()

    assert reconciler.run_pass(store, queue, settings)["abandoned"] == 1
    work()

    [event] = rows(store, "webhook_events")
    assert event["status"] == "done"
    assert len(graph.request_history) == 1


def test_abandoned_after_the_last_attempt_goes_to_dead_letter(
    post, relay, store, queue, settings
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    for _ in range(len(settings.retry_delays) + 1):
        store.start_attempt(event["event_key"], lease_seconds=-1)

    reconciler.run_pass(store, queue, settings)

    [dead] = rows(store, "dead_letter")
    assert dead["reason"] == "retries_exhausted"


def test_queued_event_whose_job_vanished_is_queued_again(
    post, relay, store, queue, settings, work, graph, monkeypatch
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    queue.connection.flushdb()  # Redis restarted without its data
    age(store, event["event_key"], settings.queued_stale_seconds + 1)

    assert reconciler.run_pass(store, queue, settings)["stalled"] == 1
    work()

    assert rows(store, "webhook_events")[0]["status"] == "done"
    assert len(graph.request_history) == 1


def test_queued_event_waiting_for_its_retry_is_left_alone(
    post, relay, store, queue, settings
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    store.release(event["event_key"], "retried", retry_in=3600)
    age(store, event["event_key"], settings.queued_stale_seconds + 1)

    assert reconciler.run_pass(store, queue, settings)["stalled"] == 0


def test_failed_job_whose_callback_never_ran_is_copied_to_dead_letter_once(
    post, relay, store, queue, settings
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    tried(store, event["event_key"])
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
    post, relay, store, queue, settings, work, graph
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    Job.fetch(
        event["job_id"], connection=queue.connection
    ).delete()  # failure_ttl ran out
    age(store, event["event_key"], settings.queued_stale_seconds + 1)

    reconciler.run_pass(store, queue, settings)
    work()

    assert rows(store, "webhook_events")[0]["status"] == "done"


def test_failed_job_superseded_by_a_later_one_leaves_the_registry(
    post, relay, store, queue, settings, work, graph
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    old = Job.fetch(event["job_id"], connection=queue.connection)
    work()
    FailedJobRegistry(queue=queue).add(old, ttl=60, exc_string="AbandonedJobError")

    reconciler.run_pass(store, queue, settings)

    assert FailedJobRegistry(queue=queue).get_job_ids() == []
    assert rows(store, "dead_letter") == []


def test_stalled_event_whose_old_job_failed_unrecorded_is_dead_lettered(
    post, relay, store, queue, settings
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    tried(store, event["event_key"])
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


# -- the relay ---------------------------------------------------------------


def queue_at(settings, redis_url):
    """A queue like the worker's, on another Redis."""
    return queueing.get_queue(dataclasses.replace(settings, redis_url=redis_url))


def queued_rows(store):
    return rows(store, "audit_log", "action = 'queued'")


def test_relay_called_again_queues_nothing_more(store, queue, relay):
    keys = stored_but_not_queued(store, 3)

    assert relay() == 3
    assert relay() == 0

    assert queue.count == 3
    assert sorted(r["event_key"] for r in queued_rows(store)) == sorted(keys)
    assert sorted(queue.job_ids) == sorted(store.get_event(k)["job_id"] for k in keys)


def test_two_relays_racing_never_queue_one_event_twice(
    env, store, queue, settings, monkeypatch
):
    monkeypatch.setattr(reconciler, "BATCH", 7)  # many small turns, interleaved
    keys = stored_but_not_queued(store, 150)
    # Two Store objects on one file: what two worker processes have.
    relays = [storage.Store(env["DATABASE_PATH"]) for _ in range(2)]
    start = threading.Barrier(len(relays))
    counts = [0] * len(relays)

    def run(i):
        start.wait()
        while True:
            taken = reconciler.relay_received(relays[i], queue, settings)
            counts[i] += taken
            if not taken:
                return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(relays))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sum(counts) == len(keys)
    assert queue.count == len(keys)
    assert sorted(r["event_key"] for r in queued_rows(store)) == sorted(keys)
    events = [store.get_event(key) for key in keys]
    assert {e["status"] for e in events} == {"queued"}
    assert sorted(queue.job_ids) == sorted(e["job_id"] for e in events)


def test_relay_leaves_the_event_received_when_redis_refuses(
    store, queue, settings, relay
):
    from conftest import free_port

    [key] = stored_but_not_queued(store)
    away = queue_at(settings, f"redis://127.0.0.1:{free_port()}/0")

    with pytest.raises(RedisError):
        reconciler.relay_received(store, away, settings)

    event = store.get_event(key)
    assert (event["status"], event["job_id"]) == ("received", None)
    assert [a["action"] for a in store.audit_trail(key)] == [
        "received",
        "queued",
        "not_queued",
    ]
    # The next look that reaches Redis queues it.
    assert relay() == 1
    assert queue.job_ids == [store.get_event(key)["job_id"]]


def test_relay_warns_once_while_redis_is_away_and_queues_when_it_is_back(
    store, settings, caplog
):
    from conftest import free_port, throwaway_redis_argv, wait_for

    keys = stored_but_not_queued(store, 2)
    port = free_port()
    queue = queue_at(settings, f"redis://127.0.0.1:{port}/0")
    relay = reconciler.Relay(store, queue, settings)
    caplog.set_level("INFO", logger="reconciler")

    assert [relay.look() for _ in range(5)] == [0] * 5

    warnings = [
        r for r in caplog.records if r.name == "reconciler" and r.levelname == "WARNING"
    ]
    assert len(warnings) == 1 and "Redis unavailable" in warnings[0].getMessage()
    # It only pinged: no event was marked and unmarked meanwhile.
    for key in keys:
        assert store.find_event(key)["status"] == "received"
        assert [a["action"] for a in store.audit_trail(key)] == ["received"]

    redis = subprocess.Popen(throwaway_redis_argv(port), stdout=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _pings(queue))
        assert relay.look() == 2
        assert queue.count == 2
    finally:
        redis.terminate()
        redis.wait(10)
    assert "Redis is back" in caplog.text
    assert {store.get_event(key)["status"] for key in keys} == {"queued"}


def _pings(queue):
    try:
        return queue.connection.ping()
    except RedisError:
        return False


def test_relay_thread_queues_a_posted_event_within_a_moment(
    post, store, queue, settings
):
    from conftest import wait_for

    relay = reconciler.Relay(store, queue, settings)
    relay.start()
    try:
        post(payloads.delivery(payloads.text_message(payloads.new_id())))

        assert wait_for(lambda: queue.count == 1, seconds=2)
    finally:
        relay.stop()
        relay.join(5)

    [event] = rows(store, "webhook_events")
    assert event["status"] == "queued"
    assert queue.job_ids == [event["job_id"]]
    assert not relay.is_alive()


def test_relay_leaves_a_backlog_in_sqlite_once_the_queue_is_full(
    store, queue, settings, monkeypatch
):
    monkeypatch.setattr(reconciler, "QUEUE_AHEAD", 5)
    stored_but_not_queued(store, 8)
    relay = reconciler.Relay(store, queue, settings)

    assert relay.look() == 5
    assert relay.look() == 0  # the queue is full: the rest waits, stored
    assert queue.count == 5 and store.waiting_for_queue() == 3
    # /readyz sees a relay at work, so a long backlog is not "behind".
    assert queue.connection.exists(queueing.relay_heartbeat_key(settings))

    for _ in range(2):  # workers took two jobs
        queue.connection.lpop(queue.key)
    assert relay.look() == 2
    assert queue.count == 5 and store.waiting_for_queue() == 1


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_relay_pauses_the_workers_while_events_arrive_faster_than_the_limit(
    store, queue, settings, caplog
):
    settings = dataclasses.replace(settings, flood_events_per_second=50)
    clock = Clock()
    relay = reconciler.Relay(store, queue, settings, clock=clock)
    caplog.set_level("INFO", logger="reconciler")

    for _ in range(3):  # 20 events a second: no flood
        stored_but_not_queued(store, 2)
        clock.now += 0.1
        relay.watch_arrivals()
    assert not relay.flooded.is_set()

    for _ in range(11):  # 100 a second over the last second
        stored_but_not_queued(store, 10)
        clock.now += 0.1
        relay.watch_arrivals()
    assert relay.flooded.is_set()
    assert "above FLOOD_EVENTS_PER_SECOND=50" in caplog.text

    for _ in range(3):  # a short lull: over the last second, still 70 a second
        clock.now += 0.1
        relay.watch_arrivals()
    assert relay.flooded.is_set()
    for _ in range(8):  # the flood is past
        clock.now += 0.1
        relay.watch_arrivals()
    assert not relay.flooded.is_set()
    assert "workers take jobs again" in caplog.text


def test_relay_tells_a_flood_from_its_end_when_looks_come_seconds_apart(
    store, queue, settings
):
    # Looks slow down when the machine is busy or Redis times out.
    settings = dataclasses.replace(settings, flood_events_per_second=50)
    clock = Clock()
    relay = reconciler.Relay(store, queue, settings, clock=clock)
    relay.watch_arrivals()

    stored_but_not_queued(store, 300)
    clock.now += 2
    assert relay.watch_arrivals() == 150
    assert relay.flooded.is_set()

    clock.now += 2
    assert relay.watch_arrivals() == 0
    assert not relay.flooded.is_set()


def test_a_relay_that_cannot_count_arrivals_lets_the_workers_work(
    store, queue, settings, monkeypatch
):
    settings = dataclasses.replace(settings, flood_events_per_second=50)
    relay = reconciler.Relay(store, queue, settings, clock=Clock())
    relay.flooded.set()

    def unreadable():
        raise storage.StorageError("cannot open the database at DATABASE_PATH")

    monkeypatch.setattr(store, "newest_inbox_id", unreadable)

    assert relay.look() == 0
    assert not relay.flooded.is_set()


def test_relay_never_pauses_the_workers_when_the_flood_limit_is_0(
    store, queue, settings
):
    settings = dataclasses.replace(settings, flood_events_per_second=0)
    clock = Clock()
    relay = reconciler.Relay(store, queue, settings, clock=clock)

    for _ in range(11):
        stored_but_not_queued(store, 50)
        clock.now += 0.1
        assert relay.watch_arrivals() is None

    assert not relay.flooded.is_set()


def test_a_burst_pass_relays_everything_waiting(store, queue, settings, monkeypatch):
    monkeypatch.setattr(reconciler, "QUEUE_AHEAD", 5)
    stored_but_not_queued(store, 8)

    assert reconciler.run_pass(store, queue, settings)["relayed"] == 5
    assert reconciler.run_pass(store, queue, settings, relay_all=True)["relayed"] == 3
    assert queue.count == 8


# -- a worker killed after taking a job, before its attempt started ------------


def test_a_job_whose_worker_died_before_the_attempt_started_is_tried_again(
    post, relay, store, queue, settings, work, graph
):
    """RQ fails such a job (AbandonedJobError, or 'stuck in intermediate queue')
    without running record_failure; the event was never tried, so the
    reconciler must give it a new job, not a dead letter.

    Found by SIGKILLing worker.py processes while they drained a backlog:
    events with attempts = 0 ended 'dead' (abandoned / internal_error) and
    their senders never got a reply.
    """
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    job = Job.fetch(event["job_id"], connection=queue.connection)
    queue.remove(job)  # a worker took it, then was killed before start_attempt
    job.set_status(JobStatus.FAILED)
    FailedJobRegistry(queue=queue).add(
        job,
        ttl=60,
        exc_string="Moved to FailedJobRegistry, due to AbandonedJobError, at now",
    )

    reconciler.run_pass(store, queue, settings)
    work()

    assert rows(store, "dead_letter") == []
    assert rows(store, "webhook_events")[0]["status"] == "done"
    assert len(graph.request_history) == 1


def test_rq_cleanup_in_a_worker_thread_runs_the_abandoned_job_callback(
    post, relay, store, queue, settings
):
    """EventWorker threads run RQ's maintenance, whose StartedJobRegistry
    cleanup calls record_failure under a SIGALRM death penalty: outside the
    main thread that raises ValueError, so record_failure never requeues
    the abandoned job (worker log: 'error while executing failure callback
    ... signal only works in main thread').
    """
    import time

    from rq.registry import StartedJobRegistry

    import worker

    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    [event] = rows(store, "webhook_events")
    rq_worker = worker.EventWorker([queue], connection=queue.connection)
    job, _ = rq_worker.dequeue_job_and_maintain_ttl(1)
    rq_worker.prepare_execution(job)  # in StartedJobRegistry; then SIGKILL
    rq_worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    assert job.id == event["job_id"]

    cleanup = threading.Thread(
        target=StartedJobRegistry(queue=queue).cleanup,
        args=(time.time() + 3600,),  # its time ran out: RQ's next maintenance
    )
    cleanup.start()
    cleanup.join()

    # record_failure ran and gave the event a new job (requeue_or_bury).
    assert rows(store, "dead_letter") == []
    event = store.get_event(event["event_key"])
    assert event["status"] == "queued" and event["job_id"] != job.id
