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


@pytest.mark.parametrize("web", [True, False], ids=["web: inbox", "worker: main"])
def test_background_checkpoints_copy_the_log_into_the_database_file(store, env, web):
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10_000
    stored(store, 20, text="x" * 20_000)  # ~100 pages: far below the backstop
    if not web:
        assert store.move_inbox(100) == 20
    path = env["DATABASE_PATH"] + (storage.INBOX_SUFFIX if web else "")
    size = os.path.getsize(path)

    store.start_checkpoints(web=web)

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


# -- the inbox -------------------------------------------------------------------


def test_stored_events_wait_in_the_inbox_until_a_relay_moves_them(store):
    keys = stored(store, 3)

    assert rows_of(store.inbox, "inbox_events") == keys
    assert list(store.db.query("SELECT * FROM webhook_events")) == []
    assert store.waiting_for_queue() == 3 and store.anything_to_queue()
    assert [e["event_key"] for e in store.events()] == keys[::-1]
    assert store.find_event(keys[0])["status"] == "received"

    assert store.move_inbox(2) == 2
    assert store.move_inbox(2) == 1
    assert store.move_inbox(2) == 0

    moved = list(store.db.query("SELECT event_key, status FROM webhook_events"))
    assert [(e["event_key"], e["status"]) for e in moved] == [
        (key, "received") for key in keys
    ]
    assert store.waiting_for_queue() == 3  # moved, not queued yet


def test_an_event_moves_once_even_when_relays_move_together(store):
    keys = stored(store, 200)
    moved = []

    def move():
        mover = storage.Store(store.path)
        while count := mover.move_inbox(7):
            moved.append(count)
        mover.close()

    threads = [threading.Thread(target=move) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sum(moved) == 200
    stored_keys = [
        r["event_key"] for r in store.db.query("SELECT * FROM webhook_events")
    ]
    assert sorted(stored_keys) == sorted(keys)


def test_cleaning_the_inbox_deletes_only_what_was_moved(store):
    first = stored(store, 3)
    store.move_inbox(10)
    later = stored(store, 2)

    assert store.clean_inbox() == 3

    assert rows_of(store.inbox, "inbox_events") == later
    assert store.waiting_for_queue() == 3 + 2  # 3 moved 'received', 2 in the inbox
    assert {store.find_event(key)["status"] for key in first + later} == {"received"}


def test_events_stored_after_a_clean_sweep_still_move(store):
    first = stored(store, 3)
    store.move_inbox(10)
    assert store.clean_inbox() == 2
    # The highest row stays, without its payload, so ids keep growing.
    [kept] = store.inbox.db.query("SELECT event_key, payload FROM inbox_events")
    assert kept == {"event_key": first[-1], "payload": ""}

    later = stored(store, 2)

    assert store.move_inbox(10) == 2
    moved = [r["event_key"] for r in store.db.query("SELECT * FROM webhook_events")]
    assert sorted(moved) == sorted(first + later)
    assert store.clean_inbox() == 2
    assert rows_of(store.inbox, "inbox_events") == later[-1:]


def reopened_without(store, path):
    """Close the store, delete one database file, and open the store again."""
    store.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    fresh = storage.Store(store.path)
    fresh.init_schema()
    return fresh


def file_text(path):
    """Return a database file and its write-ahead log as text, for searching."""
    text = ""
    for suffix in ("", "-wal"):
        if os.path.exists(path + suffix):
            with open(path + suffix, "rb") as f:
                text += f.read().decode("latin-1")
    return text


def test_no_message_text_is_left_in_the_inbox_files_once_moved(store):
    stored(store, 300, text="a very private message")
    inbox_path = store.inbox.path
    assert "a very private message" in file_text(inbox_path)

    while store.move_inbox(100):
        store.clean_inbox()
    store.clean_inbox()

    assert "a very private message" not in file_text(inbox_path)
    assert rows(store, "webhook_events", "payload LIKE '%very private%'")


def test_a_log_a_reader_kept_from_emptying_is_emptied_at_the_next_clean(
    store, monkeypatch
):
    monkeypatch.setattr(storage, "INBOX_LOG_EMPTY_SECONDS", 0)
    stored(store, 50, text="a very private message")
    store.move_inbox(100)
    reader = sqlite3.connect(store.inbox.path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM inbox_events").fetchone()

    store.clean_inbox()  # the reader holds the log: it cannot be emptied now
    assert "a very private message" in file_text(store.inbox.path)

    reader.rollback()
    reader.close()
    assert store.clean_inbox() == 0  # nothing more to delete, but the log goes
    assert "a very private message" not in file_text(store.inbox.path)


def test_purge_leaves_no_message_text_in_the_database_files(store):
    stored(store, 50, text="a very private message")
    store.move_inbox(100)
    store.db.execute(
        "UPDATE webhook_events SET status = 'done', received_at = ?",
        (storage.now_iso(-40 * 86400),),
    )
    store.checkpoint()  # the text is in the database file and its log

    store.purge(older_than=30 * 86400)

    assert "a very private message" not in file_text(store.path)


def test_a_cleaned_row_is_not_moved_again_into_a_new_main_database(store, env):
    [first, second] = stored(store, 2)
    store.move_inbox(10)
    store.clean_inbox()  # the second stays, without its payload
    fresh = reopened_without(store, env["DATABASE_PATH"])  # a new main database
    [later] = stored(fresh, 1)

    assert fresh.move_inbox(10) == 1
    moved = [r["event_key"] for r in fresh.db.query("SELECT * FROM webhook_events")]
    assert moved == [later]
    fresh.close()


def test_a_redelivery_is_a_duplicate_wherever_its_first_copy_is(store):
    [event] = parse_delivery(
        payloads.body(payloads.delivery(payloads.text_message(payloads.new_id()))),
        payloads.ACCOUNT_ID,
    )
    assert store.store_events([event]) == [event]
    assert store.store_events([event]) == []  # still in the inbox
    store.move_inbox(10)
    assert store.store_events([event]) == []  # moved, still in the inbox too
    store.clean_inbox()
    assert store.store_events([event]) == []  # only in the main database

    store.move_inbox(10)  # the inbox's duplicate notes reach the audit trail
    trail = [step["action"] for step in store.audit_trail(event.key)]
    assert trail == ["received", "duplicate", "duplicate", "duplicate"]
    assert len(rows(store, "webhook_events")) == 1


def test_a_new_inbox_file_is_moved_from_its_start(store, env):
    stored(store, 2)
    store.move_inbox(10)
    store.clean_inbox()
    # An operator removed the inbox.
    fresh = reopened_without(store, env["DATABASE_PATH"] + storage.INBOX_SUFFIX)
    [key] = stored(fresh, 1)

    assert fresh.move_inbox(10) == 1
    assert fresh.find_event(key)["status"] == "received"
    assert fresh.get_event(key) is not None
    fresh.close()


def rows_of(database, table):
    """Return the event keys of an inbox table, in order."""
    return [r["event_key"] for r in database.db.query(f"SELECT * FROM {table}")]


def test_an_event_moved_while_it_is_looked_up_is_still_found(store, monkeypatch):
    [key] = stored(store, 1)
    read_inbox = store._unmoved_events

    def moved_meanwhile(*args):  # a relay commits its move just now
        store.move_inbox(10)
        return read_inbox(*args)

    monkeypatch.setattr(store, "_unmoved_events", moved_meanwhile)

    assert store.find_event(key)["status"] == "received"
    assert [e["event_key"] for e in store.events()] == [key]
