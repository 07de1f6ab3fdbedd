"""SQLite storage: writers take turns, the log is checkpointed, the trail is whole."""

import os
import sqlite3
import threading
import time

import payloads
import pytest
from conftest import rows, wait_for

import storage
from events import parse_delivery
from storage import Store


def stored(store, count=1, text="hello there"):
    """Store `count` direct messages as the web does; return their keys."""
    events = []
    for _ in range(count):
        raw = payloads.body(
            payloads.delivery(payloads.text_message(payloads.new_id(), text))
        )
        events += parse_delivery(raw, payloads.ACCOUNT_ID)
    store.store_events(events)
    return [e.key for e in events]


def hold_the_write_lock(store, seconds):
    """Start a thread that holds a write transaction for `seconds`.

    Return (thread, event set once the transaction has begun, commit times).
    """
    begun, committed = threading.Event(), []

    def hold():
        with store.transaction() as db:
            db.execute(
                "INSERT INTO audit_log (event_key, action, detail, at)"
                " VALUES (NULL, 'first', '', ?)",
                [storage.now_iso()],
            )
            begun.set()
            time.sleep(seconds)
        committed.append(time.monotonic())

    thread = threading.Thread(target=hold)
    thread.start()
    assert begun.wait(5)
    return thread, committed


# -- writers take turns ------------------------------------------------------


@pytest.mark.parametrize("other", ["same store", "another store"])
def test_a_write_from_another_thread_waits_for_the_first_instead_of_failing(
    store, env, other
):
    second = store if other == "same store" else Store(env["DATABASE_PATH"])
    thread, committed = hold_the_write_lock(store, 0.3)

    second.audit(None, "second")  # would raise "database is locked" if it gave up
    finished = time.monotonic()
    thread.join(5)

    assert committed and finished >= committed[0]
    actions = [r["action"] for r in rows(store, "audit_log", "event_key IS NULL")]
    assert actions == ["first", "second"]
    assert os.path.exists(env["DATABASE_PATH"] + storage.WRITE_LOCK_SUFFIX)


def test_a_write_that_waits_past_the_busy_timeout_fails_and_changes_nothing(
    store, env, monkeypatch
):
    monkeypatch.setattr(storage, "BUSY_TIMEOUT_SECONDS", 0.2)
    thread, _ = hold_the_write_lock(store, 1.0)
    started = time.monotonic()

    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        Store(env["DATABASE_PATH"]).audit(None, "second")
    waited = time.monotonic() - started
    thread.join(5)

    assert 0.15 < waited < 0.9
    actions = [r["action"] for r in rows(store, "audit_log", "event_key IS NULL")]
    assert actions == ["first"]


def test_a_failed_transaction_leaves_no_trace_and_frees_the_lock(store):
    [key] = stored(store)

    with pytest.raises(RuntimeError):
        with store.transaction() as db:
            db.execute("DELETE FROM webhook_events")
            raise RuntimeError("half-way")

    assert [r["event_key"] for r in rows(store, "webhook_events")] == [key]
    store.audit(key, "after")  # the lock was given back
    assert [a["action"] for a in store.audit_trail(key)] == ["received", "after"]


def test_processes_opening_a_new_database_together_all_get_it(tmp_path):
    path = str(tmp_path / "new" / "webhooks.db")
    os.makedirs(os.path.dirname(path))
    holding, release = threading.Event(), threading.Event()

    def set_up_elsewhere():
        # Another process holds the new file's write lock for a moment, as
        # while it switches the file to WAL: SQLite then fails a second
        # opener at once, without its busy wait.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        holding.set()
        release.wait(5)
        time.sleep(0.2)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=set_up_elsewhere)
    thread.start()
    assert holding.wait(5)
    try:
        store = Store(path)
        release.set()

        assert store.init_schema() == (0, storage.SCHEMA_VERSION)
    finally:
        release.set()
        thread.join(5)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- the write-ahead log -------------------------------------------------------


def test_background_checkpoints_copy_the_log_into_the_database_file(store, env):
    path = env["DATABASE_PATH"]
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10_000
    stored(store, 20, text="x" * 20_000)  # ~100 pages: far below the backstop
    size = os.path.getsize(path)

    store.start_checkpoints()

    assert wait_for(lambda: os.path.getsize(path) > size + 100_000, seconds=5)


# -- the audit trail ------------------------------------------------------------


def test_audit_trail_starts_with_the_receipt_from_the_event_row(
    post, relay, work, graph, store
):
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    relay()
    work()
    [event] = rows(store, "webhook_events")

    trail = store.audit_trail(event["event_key"])

    assert trail[0] == {
        "event_key": event["event_key"],
        "action": "received",
        "detail": "message",
        "at": event["received_at"],
    }
    assert [step["action"] for step in trail] == ["received", "queued", "replied"]
    assert [step["at"] for step in trail] == sorted(step["at"] for step in trail)
    # The receipt is the event's own row: storing it wrote no audit row.
    assert rows(store, "audit_log", "action = 'received'") == []


def test_audit_trail_of_an_unknown_event_is_empty(store):
    assert store.audit_trail("0" * 32) == []
