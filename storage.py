"""SQLite storage of events, dead letters and the audit trail, shared by web and worker.

Two files: the main database (DATABASE_PATH), written by the worker
processes, and an inbox beside it (DATABASE_PATH-inbox), where the web
stores deliveries and which workers only read (see Inbox). SQLite lets one
writer at a time into a file; with a file each, a delivery never waits for
a worker's write. Both run in WAL mode, so readers never wait for writers,
and every write is a short transaction started with BEGIN IMMEDIATE, so it
waits for the write lock instead of failing half-way.

Every write goes through Store.transaction, where writers take turns
through a lock file beside the database before they ask SQLite for its
write lock. SQLite's own busy wait sleeps 1, 2, 5, 10 ms... between tries,
while a transaction here holds the lock for about a tenth of a
millisecond: two web processes colliding would each lose a millisecond or
more, which is most of a delivery's time. The lock file is tried every 50
microseconds at first, so the next writer starts almost as soon as the
last one is done. SQLite's locking still guards every write; the lock file
only decides who asks first.
"""

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta

import sqlite_utils

import metrics
from errors import StorageError

log = logging.getLogger(__name__)

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql")
#: How long a write waits for the lock: short on the web (Meta is waiting).
BUSY_TIMEOUT_SECONDS = 5.0
#: The worker waits longer: a reply that went out must be recorded.
WORKER_BUSY_TIMEOUT_SECONDS = 20.0
FINAL_STATUSES = ("done", "ignored", "dead")
#: SQLite copies its write-ahead log back into the database file (a
#: checkpoint) inside whichever commit makes the log this many pages long.
#: Its default, 1,000 pages, put a checkpoint into every few hundredth
#: delivery and added a third to the average cost of storing one. Web and
#: worker processes checkpoint in a background thread instead
#: (Store.start_checkpoints); this larger bound (about 40 MB) is a backstop.
WAL_AUTOCHECKPOINT_PAGES = 10_000
CHECKPOINT_INTERVAL_SECONDS = 0.2
#: The web deletes inbox rows the relay has moved this often.
INBOX_CLEAN_SECONDS = 1.0
#: Once fewer events than this wait in the inbox, its log is emptied of the
#: moved ones, at most this often; readers may delay that this long.
INBOX_LOG_EMPTY_BELOW = 100
INBOX_LOG_EMPTY_SECONDS = 10.0
INBOX_LOG_WAIT_SECONDS = 0.02
#: The lock file writers take turns with sits beside the database file.
WRITE_LOCK_SUFFIX = "-writer.lock"
#: The inbox (see Inbox) sits beside the main database file.
INBOX_SUFFIX = "-inbox"
#: Ids only grow, as moves go by id: a new row gets the highest id plus one,
#: and clean_inbox never deletes the highest row. (Not AUTOINCREMENT: its
#: counter is one more page to write in every delivery's commit.)
INBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox_events (
    id          INTEGER PRIMARY KEY,
    event_key   TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    account_id  TEXT NOT NULL DEFAULT '',
    occurred_at TEXT,
    received_at TEXT NOT NULL,
    payload     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox_info (
    id TEXT NOT NULL  -- this file's own id: the main database keeps its marks by it
);
CREATE TABLE IF NOT EXISTS inbox_audit (
    id        INTEGER PRIMARY KEY,
    event_key TEXT,
    action    TEXT NOT NULL,
    detail    TEXT NOT NULL DEFAULT '',
    at        TEXT NOT NULL
);
"""
#: Keys looked up per query when a delivery is checked for known events.
KEYS_PER_QUERY = 500
WRITE_LOCK_FIRST_PAUSE = 0.00005
WRITE_LOCK_LONGEST_PAUSE = 0.002

#: Schema changes after the version-1 baseline, in order, as (version, SQL).
#:
#: schema.sql is the version-1 baseline and is never edited again. A new
#: database (PRAGMA user_version 0) gets schema.sql and then every migration;
#: an existing one gets only the migrations above its user_version. New and
#: old databases take the same path, so they cannot drift apart. To change
#: the schema, append (next version, SQL) here.
MIGRATIONS = (
    (
        2,
        # `events list` and `purge` select by age.
        "CREATE INDEX IF NOT EXISTS webhook_events_received"
        " ON webhook_events (received_at);"
        " CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);",
    ),
    (
        3,
        # How far the relay has moved each inbox (Store.move_inbox).
        "CREATE TABLE IF NOT EXISTS inbox_moved ("
        " inbox TEXT PRIMARY KEY,"
        " events INTEGER NOT NULL DEFAULT 0,"
        " audit INTEGER NOT NULL DEFAULT 0);",
    ),
)
#: The version init_schema brings every database to.
SCHEMA_VERSION = MIGRATIONS[-1][0] if MIGRATIONS else 1


def now_iso(delta_seconds=0.0):
    """Return the current UTC time, shifted by delta_seconds, as stored text."""
    return _stored_text(datetime.now(UTC) + timedelta(seconds=delta_seconds))


def iso(epoch_seconds):
    """Return epoch seconds as stored text, or None."""
    if epoch_seconds is None:
        return None
    return _stored_text(datetime.fromtimestamp(epoch_seconds, UTC))


def _stored_text(moment):
    """Format a UTC datetime as 2026-01-31T12:00:00.000000Z, which sorts as text.

    isoformat, not strftime: it costs a fifth as much, on every delivery.
    """
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _delete_moved(inbox, table, mark):
    """Delete an inbox table's rows up to ``mark``, but never its highest row."""
    return inbox.execute(
        f"DELETE FROM {table} WHERE id <= ? AND id < (SELECT max(id) FROM {table})",
        (mark,),
    ).rowcount


def parse_iso(text):
    """Return stored time text as an aware datetime, or None."""
    return datetime.fromisoformat(text) if text else None


class _Database:
    """One SQLite file in WAL mode: a connection per thread and process.

    Writers take turns through a lock file beside it (see the module doc).
    """

    def __init__(self, path, busy_timeout=None):
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._thread_lock = threading.Lock()

    @property
    def db(self):
        """Return this thread's sqlite_utils.Database, connecting on first use."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = self._local.db = self._connect()
            self._local.pid = os.getpid()
        return db

    def _connect(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self._timeout)
            _switch_to_wal(conn, self._timeout)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            # One open file per thread: flock does not exclude a file's own holder.
            self._local.lock_fd = os.open(
                self.path + WRITE_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o600
            )
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(
                f"cannot open the database at DATABASE_PATH: {exc}"
            ) from exc
        return sqlite_utils.Database(conn)

    @property
    def _timeout(self):
        return self.busy_timeout or BUSY_TIMEOUT_SECONDS

    def close(self):
        """Close this thread's connection, if it has one."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            os.close(self._local.lock_fd)
            self._local.db = None

    @contextlib.contextmanager
    def _writer_turn(self):
        """Hold the lock file while a write transaction runs (see the module doc).

        Threads of one process queue on a plain lock first: they wait
        without waking up, instead of polling the file and taking the GIL
        from the thread that holds the write lock.
        """
        deadline = time.monotonic() + self._timeout
        if not self._thread_lock.acquire(timeout=self._timeout):
            raise sqlite3.OperationalError("database is locked")
        try:
            fd = self._local.lock_fd
            self._take_lock_file(fd, deadline)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    @staticmethod
    def _take_lock_file(fd, deadline):
        pause = WRITE_LOCK_FIRST_PAUSE
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise sqlite3.OperationalError("database is locked") from None
                time.sleep(pause)
                pause = min(pause * 2, WRITE_LOCK_LONGEST_PAUSE)

    @contextlib.contextmanager
    def transaction(self):
        """Run a block as one write transaction that waits for the write lock."""
        conn = self.db.conn
        with self._writer_turn():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def checkpoint(self):
        """Copy what the write-ahead log holds into the database file."""
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def empty_log(self, wait_seconds=None):
        """Checkpoint and truncate the write-ahead log; return True if it is empty.

        Deleted rows are overwritten in the database file (secure_delete),
        but their earlier versions stay in the log until it is truncated.
        Writers wait meanwhile, as for a transaction; readers are waited for
        up to ``wait_seconds`` (the busy timeout by default).
        """
        conn = self.db.conn
        with self._writer_turn():
            if wait_seconds is not None:
                conn.execute(f"PRAGMA busy_timeout = {int(wait_seconds * 1000)}")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                if wait_seconds is not None:
                    conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        return not busy


class Inbox(_Database):
    """The file deliveries are stored in, written only by the web.

    The web answers Meta once the events are here; a worker's relay copies
    them into the main database (Store.move_inbox) within a tenth of a
    second, and the web deletes what was copied (Store.clean_inbox). The
    web never waits for a worker's write lock this way.
    """

    def _connect(self):
        self._local.identity = None  # a new connection may see a new file
        return super()._connect()

    def init_schema(self):
        """Create the inbox's tables if they are missing."""
        try:
            with self.transaction() as db:
                db.executescript(INBOX_SCHEMA)
                db.execute(
                    "INSERT INTO inbox_info (id) SELECT lower(hex(randomblob(8)))"
                    " WHERE NOT EXISTS (SELECT 1 FROM inbox_info)"
                )
        except sqlite3.Error as exc:
            raise StorageError(
                f"cannot create the inbox at {self.path}: {exc}"
            ) from exc

    def identity(self):
        """Return this inbox file's id: a new file starts its marks afresh.

        Read once per connection: a connection stays on the file it opened.
        """
        db = self.db
        if self._local.identity is None:
            self._local.identity = db.execute("SELECT id FROM inbox_info").fetchone()[0]
        return self._local.identity


class Store(_Database):
    """The service's database: the main file, and the inbox beside it."""

    def __init__(self, path, busy_timeout=None):
        super().__init__(path, busy_timeout)
        self.inbox = Inbox(path + INBOX_SUFFIX, busy_timeout)

    def close(self):
        """Close this thread's connections, if it has any."""
        super().close()
        self.inbox.close()

    #: The schema version this process found before its first init_schema.
    found_version = None

    def schema_version(self):
        """Return the database's schema version (PRAGMA user_version)."""
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def init_schema(self):
        """Create or migrate the schema to SCHEMA_VERSION; return (before, after).

        Runs as one write transaction: processes starting together migrate
        once, and a migration that fails leaves the database as it was.
        Raise StorageError when the database is newer than this code, or a
        migration fails.
        """
        if self.found_version is None:
            self.found_version = self.schema_version()
        self.inbox.init_schema()
        before = self.schema_version()
        if before == SCHEMA_VERSION:
            return before, before

        try:
            with self.transaction() as db:
                before = self.schema_version()  # another process may have migrated
                if before > SCHEMA_VERSION:
                    raise StorageError(
                        f"the database's schema is version {before}, newer than"
                        f" this code's {SCHEMA_VERSION}; run the newer code"
                    )
                if before < 1:
                    with open(SCHEMA_PATH) as f:
                        db.executescript(f.read())
                for version, sql in MIGRATIONS:
                    if version > before:
                        db.executescript(sql)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StorageError(
                f"cannot bring the schema from version {before} to"
                f" {SCHEMA_VERSION}: {exc}"
            ) from exc
        return before, SCHEMA_VERSION

    # -- events ------------------------------------------------------------

    def store_events(self, events):
        """Store events in the inbox; return those that were new, in order.

        An event is new when neither the inbox nor the main database knows
        its key, so a redelivered event is never stored or queued twice.
        The main database is read while the inbox's write lock is held: the
        relay copies events into the main database, and only then may
        clean_inbox delete them, under that same lock, so a stored key is
        always in one or the other.
        """
        received_at = now_iso()
        new = []
        with self.inbox.transaction() as inbox:
            known = self._known_keys([event.key for event in events])
            for event in events:
                if event.key not in known:
                    cursor = inbox.execute(
                        "INSERT INTO inbox_events (event_key, kind, account_id,"
                        " occurred_at, received_at, payload) VALUES (?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (event_key) DO NOTHING",
                        (
                            event.key,
                            event.kind,
                            event.account_id,
                            iso(event.occurred_at),
                            received_at,
                            event.payload,
                        ),
                    )
                    if cursor.rowcount == 1:
                        new.append(event)
                        continue
                inbox.execute(
                    "INSERT INTO inbox_audit (event_key, action, detail, at)"
                    " VALUES (?, 'duplicate', ?, ?)",
                    (event.key, event.kind, received_at),
                )
        return new

    def _known_keys(self, keys):
        """Return which of these event keys the main database holds."""
        known = set()
        for start in range(0, len(keys), KEYS_PER_QUERY):
            chunk = keys[start : start + KEYS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            known.update(
                row[0]
                for row in self.db.execute(
                    "SELECT event_key FROM webhook_events"
                    f" WHERE event_key IN ({marks})",
                    chunk,
                )
            )
        return known

    def _inbox_marks(self):
        """Return the last ids moved from this inbox: events, audit (0, 0 at first)."""
        row = self.db.execute(
            "SELECT events, audit FROM inbox_moved WHERE inbox = ?",
            (self.inbox.identity(),),
        ).fetchone()
        return tuple(row) if row else (0, 0)

    def move_inbox(self, limit):
        """Move up to ``limit`` events, and duplicates' audit rows, from the inbox.

        Moved events become 'received' rows here; return how many. The
        main database records the last inbox ids it holds, in the same
        transaction, so each row moves once even when several relays look
        together or one dies half-way. The inbox is only read: the web
        deletes moved rows (clean_inbox), so a worker never holds a lock a
        delivery waits for.
        """
        inbox = self.inbox.db
        with self.transaction() as db:
            inbox_id = self.inbox.identity()
            events_mark, audit_mark = self._inbox_marks()
            events = inbox.execute(
                "SELECT id, event_key, kind, account_id, occurred_at, received_at,"
                " payload FROM inbox_events WHERE id > ? ORDER BY id LIMIT ?",
                (events_mark, limit),
            ).fetchall()
            notes = inbox.execute(
                "SELECT id, event_key, action, detail, at FROM inbox_audit"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (audit_mark, limit),
            ).fetchall()
            if not events and not notes:
                return 0
            # A row without its payload was moved and cleaned before: its
            # marks were lost with an earlier main database.
            moved = [
                (k, kind, acc, occ, at, at, p)
                for _, k, kind, acc, occ, at, p in events
                if p
            ]
            db.conn.executemany(
                "INSERT INTO webhook_events (event_key, kind, status, account_id,"
                " occurred_at, received_at, updated_at, payload)"
                " VALUES (?, ?, 'received', ?, ?, ?, ?, ?)"
                " ON CONFLICT (event_key) DO NOTHING",
                moved,
            )
            db.conn.executemany(
                "INSERT INTO audit_log (event_key, action, detail, at)"
                " VALUES (?, ?, ?, ?)",
                [note[1:] for note in notes],
            )
            db.execute(
                "INSERT INTO inbox_moved (inbox, events, audit) VALUES (?, ?, ?)"
                " ON CONFLICT (inbox) DO UPDATE SET events = excluded.events,"
                " audit = excluded.audit",
                (
                    inbox_id,
                    events[-1][0] if events else events_mark,
                    notes[-1][0] if notes else audit_mark,
                ),
            )
        return len(moved)

    def newest_inbox_id(self):
        """Return the highest id in the inbox (0 when empty): arrivals count up."""
        return self.inbox.db.execute(
            "SELECT coalesce(max(id), 0) FROM inbox_events"
        ).fetchone()[0]

    def clean_inbox(self):
        """Delete inbox rows the relay has moved; return how many went.

        Run by the web, the inbox's writer: ids only grow, so every row up
        to a mark has been moved. The highest row of each table stays, so
        that the next id is higher still (see INBOX_SCHEMA); a moved one
        keeps its key but not its payload. Deleted payloads are overwritten,
        as by purge: once purged from the main database, nothing of them is
        left.
        """
        self.inbox.db.execute("PRAGMA secure_delete = ON")
        with self.inbox.transaction() as inbox:
            events_mark, audit_mark = self._inbox_marks()
            gone = _delete_moved(inbox, "inbox_events", events_mark)
            _delete_moved(inbox, "inbox_audit", audit_mark)
            blanked = inbox.execute(
                "UPDATE inbox_events SET payload = '' WHERE id <= ? AND payload != ''",
                (events_mark,),
            ).rowcount
            waiting = inbox.execute(
                "SELECT count(*) FROM"
                " (SELECT 1 FROM inbox_events WHERE id > ? LIMIT ?)",
                (events_mark, INBOX_LOG_EMPTY_BELOW),
            ).fetchone()[0]
        self._inbox_log_dirty = self._inbox_log_dirty or bool(gone or blanked)
        if (
            self._inbox_log_dirty
            and waiting < INBOX_LOG_EMPTY_BELOW
            and time.monotonic() - self._inbox_log_tried >= INBOX_LOG_EMPTY_SECONDS
        ):
            # Moved payloads need not stay in the log either. Not while
            # deliveries pour in, and not often: deliveries wait meanwhile
            # (cutting the log at each of its restarts, journal_size_limit,
            # raised their p99 by half). A log not emptied is tried again.
            self._inbox_log_tried = time.monotonic()
            try:
                if self.inbox.empty_log(wait_seconds=INBOX_LOG_WAIT_SECONDS):
                    self._inbox_log_dirty = False
            except sqlite3.Error as exc:
                log.debug("inbox log not emptied yet: %s", exc)
        return gone

    #: The inbox's log may hold payloads that were moved (see clean_inbox).
    _inbox_log_dirty = False
    _inbox_log_tried = float("-inf")

    def unqueue(self, keys):
        """Set events back to 'received' when their jobs never reached Redis."""
        with self.transaction() as db:
            for key in keys:
                db.execute(
                    "UPDATE webhook_events SET status = 'received', job_id = NULL"
                    " WHERE event_key = ? AND status = 'queued'",
                    (key,),
                )
                self.audit(key, "not_queued", "Redis unreachable; the relay queues it")

    def take_for_queue(self, limit, detail=""):
        """Mark up to ``limit`` 'received' events 'queued', oldest first.

        Return (event key, kind, job id) of each: the jobs to enqueue now.
        One statement picks and marks them and gives each a fresh job id
        (the event key and eight hex digits, as queueing.new_job_id makes),
        so the write lock is held for about a millisecond per 500 events,
        and relays of several processes never take the same event.
        """
        at = now_iso()
        with self.transaction() as db:
            taken = db.execute(
                "UPDATE webhook_events SET status = 'queued', updated_at = ?,"
                " job_id = event_key || '-' || lower(hex(randomblob(4)))"
                " WHERE id IN (SELECT id FROM webhook_events"
                " WHERE status = 'received' ORDER BY id LIMIT ?)"
                " RETURNING event_key, kind, job_id",
                (at, limit),
            ).fetchall()
            db.conn.executemany(
                "INSERT INTO audit_log (event_key, action, detail, at)"
                " VALUES (?, 'queued', ?, ?)",
                [(key, detail, at) for key, _, _ in taken],
            )
        return taken

    def requeued(self, key, job_id, action, detail=""):
        """Record that a new job now carries the event, and why."""
        with self.transaction() as db:
            db.execute(
                "UPDATE webhook_events SET status = 'queued', job_id = ?,"
                " lease_until = NULL, next_attempt_at = NULL, updated_at = ?"
                " WHERE event_key = ?",
                (job_id, now_iso(), key),
            )
            self.audit(key, action, detail)

    def anything_to_queue(self):
        """Tell, with reads that take no lock, whether anything waits for the relay."""
        events_mark, audit_mark = self._inbox_marks()
        return bool(
            self.inbox.db.execute(
                "SELECT EXISTS (SELECT 1 FROM inbox_events WHERE id > ?)"
                " OR EXISTS (SELECT 1 FROM inbox_audit WHERE id > ?)",
                (events_mark, audit_mark),
            ).fetchone()[0]
            or self.db.execute(
                "SELECT EXISTS (SELECT 1 FROM webhook_events WHERE status = 'received')"
            ).fetchone()[0]
        )

    def waiting_for_queue(self, older_than_seconds=0.0):
        """Count events stored but not queued yet, received over this long ago."""
        cutoff = now_iso(-older_than_seconds)
        events_mark, _ = self._inbox_marks()
        in_inbox = self.inbox.db.execute(
            "SELECT COUNT(*) FROM inbox_events WHERE id > ? AND received_at < ?",
            (events_mark, cutoff),
        ).fetchone()[0]
        return (
            in_inbox
            + self.db.execute(
                "SELECT COUNT(*) FROM webhook_events"
                " WHERE status = 'received' AND received_at < ?",
                (cutoff,),
            ).fetchone()[0]
        )

    def start_checkpoints(self, interval=CHECKPOINT_INTERVAL_SECONDS, web=False):
        """Checkpoint every ``interval`` seconds in a background thread.

        Each web and worker process runs one (see WAL_AUTOCHECKPOINT_PAGES),
        for the file it writes most: the web the inbox, the worker the main
        database. The web's also deletes moved inbox rows every
        INBOX_CLEAN_SECONDS. SQLite releases the GIL while it copies, so
        requests go on meanwhile.
        """
        checkpoint = self.inbox.checkpoint if web else self.checkpoint
        clean_inbox_every = INBOX_CLEAN_SECONDS if web else None

        def run():
            cleaned = time.monotonic()
            while True:
                time.sleep(interval)
                try:
                    if clean_inbox_every and (
                        time.monotonic() - cleaned >= clean_inbox_every
                    ):
                        self.clean_inbox()
                        cleaned = time.monotonic()
                    checkpoint()
                except (sqlite3.Error, StorageError) as exc:
                    log.debug("checkpoint skipped: %s", exc)

        thread = threading.Thread(target=run, name="sqlite-checkpoints", daemon=True)
        thread.start()
        return thread

    def abandoned_events(self, limit):
        """Return events whose attempt outlived its lease: its worker died."""
        return list(
            self.db.query(
                "SELECT * FROM webhook_events WHERE status = 'queued'"
                " AND lease_until < ? ORDER BY lease_until LIMIT ?",
                (now_iso(), limit),
            )
        )

    def stalled_events(self, stale_seconds, limit):
        """Return queued events left untouched stale_seconds past their due time."""
        return list(
            self.db.query(
                "SELECT * FROM webhook_events WHERE status = 'queued'"
                " AND lease_until IS NULL"
                " AND COALESCE(next_attempt_at, updated_at) < ?"
                " ORDER BY updated_at LIMIT ?",
                (now_iso(-stale_seconds), limit),
            )
        )

    def get_event(self, key):
        """Return the event row as a dict, or None."""
        rows = list(
            self.db.query("SELECT * FROM webhook_events WHERE event_key = ?", [key])
        )
        return rows[0] if rows else None

    def start_attempt(self, key, lease_seconds):
        """Take the event for one attempt; return its row, or None if it is not ours.

        Returns None when the event is gone, already final, or held by another
        worker whose lease has not run out, so a duplicate job does nothing.
        A 'dead' event taken again was requeued from rq-dashboard: it starts
        afresh, like a replay.
        """
        now = now_iso()
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE webhook_events SET attempts = attempts + 1, lease_until = ?,"
                " next_attempt_at = NULL, updated_at = ? WHERE event_key = ?"
                " AND status NOT IN ('done', 'ignored')"
                " AND (lease_until IS NULL OR lease_until < ?)",
                (now_iso(lease_seconds), now, key, now),
            )
            if cursor.rowcount != 1:
                return None
            event = self.get_event(key)
            if event["status"] == "dead":
                db.execute(
                    "UPDATE webhook_events SET status = 'queued', attempts = 1"
                    " WHERE event_key = ?",
                    (key,),
                )
                self._set_dead_letter_status(db, key, "replayed", ("open",))
                self.audit(key, "replayed", "requeued from rq-dashboard")
                event = self.get_event(key)
            return event

    def mark_send_started(self, key):
        """Record that a Send API call for this event is about to go out."""
        with self.transaction() as db:
            db.execute(
                "UPDATE webhook_events SET send_started_at = ? WHERE event_key = ?",
                (now_iso(), key),
            )

    def mark_send_uncertain(self, key):
        """Record that a send may have reached Meta although it did not answer."""
        with self.transaction() as db:
            db.execute(
                "UPDATE webhook_events SET send_uncertain = 1 WHERE event_key = ?",
                (key,),
            )
            self.audit(key, "send_outcome_unknown", "the reply may have gone out")

    def record_reply(self, key, message_id):
        """Record the reply's message_id and end the event 'done', at once."""
        with self.transaction() as db:
            ended = db.execute(
                "UPDATE webhook_events SET status = 'done', reply_message_id = ?,"
                " replied_at = ?, outcome = 'replied', lease_until = NULL,"
                " updated_at = ? WHERE event_key = ? RETURNING kind",
                (message_id, now_iso(), now_iso(), key),
            ).fetchall()
            self.audit(key, "replied")
            self._resolve_dead_letter(db, key)
        _count_finished(ended, "done")

    def finish(self, key, status, outcome):
        """End an event 'done' or 'ignored' with a short outcome."""
        with self.transaction() as db:
            ended = db.execute(
                "UPDATE webhook_events SET status = ?, outcome = ?, lease_until = NULL,"
                " updated_at = ? WHERE event_key = ? RETURNING kind",
                (status, outcome, now_iso(), key),
            ).fetchall()
            self.audit(key, status, outcome)
            self._resolve_dead_letter(db, key)
        _count_finished(ended, status)

    def release(self, key, action, detail="", retry_in=None):
        """Give the event back after an attempt; a retry is due in retry_in seconds."""
        with self.transaction() as db:
            db.execute(
                "UPDATE webhook_events SET lease_until = NULL, next_attempt_at = ?,"
                " send_started_at = NULL, updated_at = ? WHERE event_key = ?",
                (None if retry_in is None else now_iso(retry_in), now_iso(), key),
            )
            self.audit(key, action, detail)

    # -- dead letters --------------------------------------------------------

    def dead_letter(self, key, reason, error, attempts):
        """End an event 'dead' with exactly one open dead-letter row.

        The sender's reply slot is freed, unless a send may have gone out.
        """
        now = now_iso()
        with self.transaction() as db:
            ended = db.execute(
                "UPDATE webhook_events SET status = 'dead', outcome = ?,"
                " lease_until = NULL, send_started_at = NULL, updated_at = ?"
                " WHERE event_key = ? RETURNING kind",
                (reason, now, key),
            ).fetchall()
            db.execute(
                "DELETE FROM reply_cooldowns WHERE event_key = ? AND NOT EXISTS"
                " (SELECT 1 FROM webhook_events"
                " WHERE event_key = ? AND send_uncertain)",
                (key, key),
            )
            db.execute(
                "INSERT INTO dead_letter (event_key, reason, error, attempts, status,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, 'open', ?, ?)"
                " ON CONFLICT (event_key) DO UPDATE SET reason = excluded.reason,"
                " error = excluded.error, attempts = excluded.attempts,"
                " status = 'open', updated_at = excluded.updated_at",
                (key, reason, error, attempts, now, now),
            )
            self.audit(key, "dead_lettered", reason)
        _count_finished(ended, "dead")

    def store_unparseable(self, key, raw_text, problem):
        """Keep a signed body we cannot read, as a dead event; return True if new."""
        now = now_iso()
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO webhook_events (event_key, kind, status, received_at,"
                " updated_at, payload, outcome)"
                " VALUES (?, 'unparseable', 'dead', ?, ?, ?, 'unparseable')"
                " ON CONFLICT (event_key) DO NOTHING",
                (key, now, now, raw_text),
            )
            if cursor.rowcount != 1:
                self.audit(key, "duplicate", "unparseable")
                return False
            db.execute(
                "INSERT INTO dead_letter (event_key, reason, error, attempts, status,"
                " created_at, updated_at)"
                " VALUES (?, 'unparseable', ?, 0, 'open', ?, ?)",
                (key, problem, now, now),
            )
            self.audit(key, "dead_lettered", "unparseable")
        return True

    def _resolve_dead_letter(self, db, key):
        if self._set_dead_letter_status(db, key, "resolved", ("open", "replayed")):
            self.audit(key, "resolved")

    def _set_dead_letter_status(self, db, key, status, current):
        marks = ", ".join("?" * len(current))
        cursor = db.execute(
            f"UPDATE dead_letter SET status = ?, updated_at = ?"
            f" WHERE event_key = ? AND status IN ({marks})",
            (status, now_iso(), key, *current),
        )
        return cursor.rowcount

    def get_dead_letter(self, dead_id):
        """Return one dead-letter row joined with its event, or None."""
        rows = list(
            self.db.query(
                "SELECT d.*, e.kind, e.status AS event_status, e.job_id,"
                " e.reply_message_id, e.send_uncertain"
                " FROM dead_letter d JOIN webhook_events e USING (event_key)"
                " WHERE d.id = ?",
                [dead_id],
            )
        )
        return rows[0] if rows else None

    def dead_letters(self, reason=None, status=None, older_than=None, newer_than=None):
        """Return dead-letter rows with their event's kind, newest first."""
        where, params = _filters(
            {"d.reason": reason, "d.status": status},
            "d.created_at",
            older_than,
            newer_than,
        )
        return list(
            self.db.query(
                "SELECT d.*, e.kind, e.reply_message_id, e.job_id"
                " FROM dead_letter d JOIN webhook_events e USING (event_key)"
                f" WHERE {where} ORDER BY d.id DESC",
                params,
            )
        )

    def replay(self, key, job_id):
        """Mark a dead letter replayed and its event queued again, attempts reset."""
        with self.transaction() as db:
            db.execute(
                "UPDATE webhook_events SET status = 'queued', attempts = 0, job_id = ?,"
                " lease_until = NULL, next_attempt_at = NULL, updated_at = ?"
                " WHERE event_key = ?",
                (job_id, now_iso(), key),
            )
            self._set_dead_letter_status(db, key, "replayed", ("open", "replayed"))
            self.audit(key, "replayed")

    def discard(self, key):
        """Mark a dead letter discarded; it stays for the audit."""
        with self.transaction() as db:
            changed = self._set_dead_letter_status(db, key, "discarded", ("open",))
            if changed:
                self.audit(key, "discarded")
        return bool(changed)

    def audit_trail(self, key):
        """Return the steps of one event's life, oldest first.

        The first, its receipt, comes from the event's own row (received_at
        and kind); every later step is a row of audit_log, or of the inbox
        for duplicates the relay has not moved yet.
        """
        event = self.find_event(key)
        received = []
        if event:
            received.append(
                {
                    "event_key": key,
                    "action": "received",
                    "detail": event["kind"],
                    "at": event["received_at"],
                }
            )
        rows = self.db.query(
            "SELECT * FROM audit_log WHERE event_key = ? ORDER BY id", [key]
        )
        _, audit_mark = self._inbox_marks()
        unmoved = self.inbox.db.query(
            "SELECT event_key, action, detail, at FROM inbox_audit"
            " WHERE id > ? AND event_key = ? ORDER BY id",
            [audit_mark, key],
        )
        return received + list(rows) + list(unmoved)

    # -- reply cooldown ------------------------------------------------------

    def claim_cooldown(self, sender, key, cooldown_seconds):
        """Take the sender's reply slot for this event; False if it is taken.

        The slot is free when the last default reply is older than the
        cooldown, or when it was taken by this same event (a retry).
        """
        if cooldown_seconds <= 0:
            return True
        now = now_iso()
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO reply_cooldowns (sender, event_key, replied_at)"
                " VALUES (?, ?, ?)"
                " ON CONFLICT (sender) DO UPDATE SET event_key = excluded.event_key,"
                " replied_at = excluded.replied_at"
                " WHERE reply_cooldowns.replied_at < ?"
                " OR reply_cooldowns.event_key = ?",
                (sender, key, now, now_iso(-cooldown_seconds), key),
            )
            return cursor.rowcount == 1

    # -- audit ---------------------------------------------------------------

    def audit(self, key, action, detail=""):
        """Add one row to the audit trail."""
        row = (key, action, detail, now_iso())
        sql = "INSERT INTO audit_log (event_key, action, detail, at) VALUES (?,?,?,?)"
        if self.db.conn.in_transaction:
            self.db.execute(sql, row)
            return
        with self.transaction() as db:  # every write takes its turn (module doc)
            db.execute(sql, row)

    def audit_count(self, key, action):
        """Count the audit rows of one event with this action."""
        return self.db.execute(
            "SELECT COUNT(*) FROM audit_log WHERE event_key = ? AND action = ?",
            (key, action),
        ).fetchone()[0]

    # -- operator commands -----------------------------------------------------

    def events(
        self, kind=None, status=None, older_than=None, newer_than=None, limit=50
    ):
        """Return events, newest first, without their payload.

        Events still in the inbox are listed too, as 'received'.
        """
        where, params = _filters({"kind": kind}, "received_at", older_than, newer_than)
        found = {}
        if status in (None, "received"):
            # The inbox first: an event moved in between is then in both
            # reads, never in neither; its main row wins.
            for event in self._unmoved_events(where, params, limit):
                found[event["event_key"]] = {c: event[c] for c in _LISTED}
        where, params = _filters(
            {"kind": kind, "status": status}, "received_at", older_than, newer_than
        )
        for event in self.db.query(
            f"SELECT {', '.join(_LISTED)} FROM webhook_events"
            f" WHERE {where} ORDER BY id DESC LIMIT ?",
            [*params, limit],
        ):
            found[event["event_key"]] = event
        listed = sorted(found.values(), key=lambda e: e["received_at"], reverse=True)
        return listed[:limit]

    def find_event(self, key):
        """Return an event as get_event does, also while it is still in the inbox.

        The inbox is read first, for the reason events() gives.
        """
        unmoved = next(iter(self._unmoved_events("event_key = ?", [key], 1)), None)
        return self.get_event(key) or unmoved

    def _unmoved_events(self, where, params, limit):
        """Return inbox events the relay has not moved, as 'received' event rows."""
        events_mark, _ = self._inbox_marks()
        rows = self.inbox.db.query(
            "SELECT event_key, kind, account_id, occurred_at, received_at, payload"
            f" FROM inbox_events WHERE id > ? AND {where} ORDER BY id DESC LIMIT ?",
            [events_mark, *params, limit],
        )
        return [{**_NOT_MOVED, **row, "updated_at": row["received_at"]} for row in rows]

    def dead_letter_of(self, key):
        """Return the dead-letter row of one event, or None."""
        rows = list(
            self.db.query("SELECT * FROM dead_letter WHERE event_key = ?", [key])
        )
        return rows[0] if rows else None

    def purge(self, older_than, cooldown_seconds=0, dry_run=False):
        """Delete what is older than older_than seconds; return counts per table.

        An event goes when it arrived before the cut-off, is finished, and has
        no dead letter still open or replayed, or closed after the cut-off; its
        dead letter and all its audit rows go with it, and so do audit rows
        older than the cut-off that belong to no event. A reply cooldown goes
        when it is older than both the cut-off and the cooldown. With dry_run
        the same statements run and are rolled back, so the counts agree.
        """
        cutoff = now_iso(-older_than)
        params = {
            "cutoff": cutoff,
            "cooldown_cutoff": min(cutoff, now_iso(-cooldown_seconds)),
        }
        counts = {}
        # Deleted pages are overwritten, not just freed: payloads are personal.
        self.db.execute("PRAGMA secure_delete = ON")
        try:
            with self.transaction() as db:
                for name, sql in _PURGE_COUNTS:
                    counts[name] = db.execute(sql, params).fetchone()[0]
                for name, sql in _PURGE_DELETES:
                    counts[name] = db.execute(sql, params).rowcount
                if dry_run:
                    raise _RollBack
        except _RollBack:
            pass
        else:
            # The deleted rows' earlier versions go from the log, too.
            try:
                emptied = self.empty_log()
            except sqlite3.Error as exc:
                emptied, reason = False, str(exc)
            else:
                reason = "a reader held it for the whole busy timeout"
            if not emptied:
                log.warning(
                    "purge: the write-ahead log still holds purged rows (%s);"
                    " run purge again to empty it",
                    reason,
                )
        return counts


def _switch_to_wal(conn, timeout):
    """Put the database in WAL mode, waiting up to ``timeout`` for other openers.

    While another process switches a new file to WAL, SQLite refuses the
    switch at once ("database is locked") instead of waiting its busy
    timeout: processes started together would fail for no reason.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _count_finished(rows, status):
    for (kind,) in rows:
        metrics.EVENTS_FINISHED.labels(kind, status).inc()


class _RollBack(Exception):
    """Raised inside a transaction to undo it on purpose (a dry run)."""


# An event whose dead letter must stay: open, replayed, or closed lately.
_HELD = (
    "EXISTS (SELECT 1 FROM dead_letter d WHERE d.event_key = e.event_key"
    " AND (d.status IN ('open', 'replayed') OR d.updated_at >= :cutoff))"
)
# An old event that may go: finished, and no dead letter that must stay.
_PURGEABLE = (
    "SELECT e.event_key FROM webhook_events e WHERE e.received_at < :cutoff"
    f" AND e.status IN ('done', 'ignored', 'dead') AND NOT {_HELD}"
)
_NO_EVENT = "event_key NOT IN (SELECT event_key FROM webhook_events)"
# Old events that stay, and why, counted before anything is deleted.
_PURGE_COUNTS = (
    (
        "kept_dead_letter",
        "SELECT count(*) FROM webhook_events e WHERE e.received_at < :cutoff"
        f" AND {_HELD}",
    ),
    (
        "kept_unfinished",
        "SELECT count(*) FROM webhook_events e WHERE e.received_at < :cutoff"
        f" AND e.status NOT IN ('done', 'ignored', 'dead') AND NOT {_HELD}",
    ),
)
# In this order: the events go last, as the others are chosen through them.
_PURGE_DELETES = (
    (
        "audit_log",
        f"DELETE FROM audit_log WHERE event_key IN ({_PURGEABLE})"
        f" OR (at < :cutoff AND (event_key IS NULL OR {_NO_EVENT}))",
    ),
    (
        "dead_letter",
        "DELETE FROM dead_letter WHERE status IN ('resolved', 'discarded')"
        f" AND updated_at < :cutoff AND (event_key IN ({_PURGEABLE}) OR {_NO_EVENT})",
    ),
    (
        "reply_cooldowns",
        "DELETE FROM reply_cooldowns WHERE replied_at < :cooldown_cutoff",
    ),
    ("webhook_events", f"DELETE FROM webhook_events WHERE event_key IN ({_PURGEABLE})"),
)


#: The columns `events list` shows.
_LISTED = (
    "id",
    "event_key",
    "kind",
    "status",
    "attempts",
    "outcome",
    "occurred_at",
    "received_at",
    "updated_at",
)
#: What an event still in the inbox has in the columns the inbox lacks.
_NOT_MOVED = {
    "id": None,
    "status": "received",
    "attempts": 0,
    "outcome": None,
    "job_id": None,
    "next_attempt_at": None,
    "lease_until": None,
    "send_started_at": None,
    "send_uncertain": 0,
    "reply_message_id": None,
    "replied_at": None,
}


def _filters(equal, time_column, older_than, newer_than):
    """Build a WHERE clause: columns equal to the given values, and an age range."""
    where, params = ["1 = 1"], []
    for column, value in equal.items():
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if older_than is not None:
        where.append(f"{time_column} < ?")
        params.append(now_iso(-older_than))
    if newer_than is not None:
        where.append(f"{time_column} >= ?")
        params.append(now_iso(-newer_than))
    return " AND ".join(where), params
