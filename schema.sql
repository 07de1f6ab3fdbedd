-- The service's SQLite schema at version 1: the baseline, never edited again.
-- Store.init_schema applies it to a new database (PRAGMA user_version 0), then
-- every later change in storage.MIGRATIONS, in order; an existing database
-- gets only the migrations above its user_version. Change the schema there.

-- One row per event Meta delivered, whatever its kind.
CREATE TABLE IF NOT EXISTS webhook_events (
    id               INTEGER PRIMARY KEY,
    event_key        TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    -- received -> queued -> done | ignored | dead
    status           TEXT NOT NULL DEFAULT 'received'
                     CHECK (status IN ('received', 'queued', 'done', 'ignored', 'dead')),
    account_id       TEXT NOT NULL DEFAULT '',
    occurred_at      TEXT,              -- the event's own time (UTC, ISO 8601)
    received_at      TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    payload          TEXT NOT NULL,     -- the event as Meta sent it, with its entry's id and time
    attempts         INTEGER NOT NULL DEFAULT 0,
    outcome          TEXT,              -- why it ended ignored or dead, in a few words
    job_id           TEXT,              -- the RQ job that carries it now
    next_attempt_at  TEXT,              -- when a scheduled retry is due
    lease_until      TEXT,              -- a worker is handling it until then
    send_started_at  TEXT,              -- set before each Send API call
    send_uncertain   INTEGER NOT NULL DEFAULT 0,  -- 1: an earlier send may have gone out
    reply_message_id TEXT,              -- the Graph API's message_id once a reply went out
    replied_at       TEXT
);
CREATE INDEX IF NOT EXISTS webhook_events_status ON webhook_events (status, updated_at);

-- One row per event that finally failed; an operator inspects and replays it.
CREATE TABLE IF NOT EXISTS dead_letter (
    id         INTEGER PRIMARY KEY,
    event_key  TEXT NOT NULL UNIQUE REFERENCES webhook_events (event_key),
    -- token_invalid, outside_window, recipient_unavailable, permission_denied,
    -- bad_request, retries_exhausted, unparseable, timeout, abandoned,
    -- internal_error
    reason     TEXT NOT NULL,
    error      TEXT NOT NULL DEFAULT '',  -- redacted
    attempts   INTEGER NOT NULL DEFAULT 0,
    -- open -> replayed -> resolved (or open again); discarded
    status     TEXT NOT NULL DEFAULT 'open'
               CHECK (status IN ('open', 'replayed', 'resolved', 'discarded')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letter_status ON dead_letter (status, reason);

-- One row per change in an event's life. Never message text, names or tokens.
CREATE TABLE IF NOT EXISTS audit_log (
    id        INTEGER PRIMARY KEY,
    event_key TEXT,
    action    TEXT NOT NULL,
    detail    TEXT NOT NULL DEFAULT '',
    at        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_event ON audit_log (event_key);

-- The last default reply per sender, for REPLY_COOLDOWN_SECONDS.
CREATE TABLE IF NOT EXISTS reply_cooldowns (
    sender     TEXT PRIMARY KEY,   -- a keyed pseudonym of the sender's id
    event_key  TEXT NOT NULL,
    replied_at TEXT NOT NULL
);

PRAGMA user_version = 1;
