"""The operator commands init-db, check-config, events, send-test-event and purge."""

import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import payloads
import pytest
import requests
from conftest import GRAPH_BASE, free_port, rows
from test_commands import parse_table
from werkzeug.serving import make_server

import sample_events
import storage
from errors import StorageError
from events import parse_delivery
from security import SIGNATURE_HEADER, verify_signature
from storage import SCHEMA_PATH, SCHEMA_VERSION, Store, now_iso
from webhook_app import create_app

DAY = 86400
ME_URL = f"{GRAPH_BASE}/v24.0/me"


def invoke(app, *args):
    """Run `flask ARGS...` against the app; return click's Result."""
    return app.test_cli_runner().invoke(args=[str(a) for a in args])


@pytest.fixture
def cli(app):
    return lambda *args: invoke(app, *args)


def one_error_line(result, exit_code=1):
    """Assert the command failed with exactly one `error:` line; return it."""
    assert result.exit_code == exit_code, result.output
    [line] = result.output.splitlines()
    assert line.startswith("error: ")
    return line


def old_database(path, version=1):
    """Make a database as the code before migrations left it: schema.sql alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    with open(SCHEMA_PATH) as f:
        conn.executescript(f.read())
    conn.execute(
        "INSERT INTO webhook_events (event_key, kind, received_at, updated_at,"
        " payload) VALUES ('old-key', 'message', ?, ?, '{}')",
        (now_iso(), now_iso()),
    )
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()


def indexes(store):
    return {r["name"] for r in rows(store, "sqlite_master", "type = 'index'")}


# -- init-db and migrations ------------------------------------------------------


def test_migrations_are_numbered_in_order_from_2():
    versions = [version for version, _ in storage.MIGRATIONS]
    assert versions == list(range(2, len(versions) + 2))
    assert SCHEMA_VERSION == versions[-1]


def test_a_new_database_ends_at_the_latest_version(cli, store, env):
    result = cli("init-db")

    assert result.exit_code == 0, result.output
    assert result.output == (
        f"{env['DATABASE_PATH']}: schema version 0 (new) -> {SCHEMA_VERSION}\n"
    )
    assert store.schema_version() == SCHEMA_VERSION
    assert {"webhook_events_received", "audit_log_at"} <= indexes(store)


def test_a_version_1_database_is_migrated_and_keeps_its_rows(env, tmp_path):
    path = tmp_path / "data" / "webhooks.db"
    old_database(path)

    app = create_app()
    first = invoke(app, "init-db")
    again = invoke(create_app(), "init-db")

    assert first.exit_code == 0, first.output
    assert first.output == f"{path}: schema version 1 -> {SCHEMA_VERSION}\n"
    assert again.exit_code == 0, again.output
    assert again.output == f"{path}: schema version {SCHEMA_VERSION}, up to date\n"
    store = app.extensions["store"]
    assert store.schema_version() == SCHEMA_VERSION
    assert {"webhook_events_received", "audit_log_at"} <= indexes(store)
    assert [r["event_key"] for r in rows(store, "webhook_events")] == ["old-key"]


def test_migrating_twice_is_harmless(tmp_path):
    path = tmp_path / "webhooks.db"
    old_database(path)
    store = Store(str(path))

    assert store.init_schema() == (1, SCHEMA_VERSION)
    assert store.init_schema() == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert Store(str(path)).init_schema() == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert [r["event_key"] for r in rows(store, "webhook_events")] == ["old-key"]


def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "webhooks.db"
    old_database(path)
    monkeypatch.setattr(
        storage,
        "MIGRATIONS",
        (
            *storage.MIGRATIONS,
            (SCHEMA_VERSION + 1, "CREATE TABLE half_done (x); NOT SQL AT ALL;"),
        ),
    )
    monkeypatch.setattr(storage, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    store = Store(str(path))

    with pytest.raises(StorageError, match=r"from version 1 to \d+"):
        store.init_schema()

    assert store.schema_version() == 1
    assert "half_done" not in store.db.table_names()
    assert "webhook_events_received" not in indexes(store)


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    path = tmp_path / "webhooks.db"
    old_database(path, version=SCHEMA_VERSION + 5)

    with pytest.raises(StorageError, match="newer than this code"):
        Store(str(path)).init_schema()


# -- check-config -----------------------------------------------------------------

SECRETS = {
    "IG_APP_SECRET": "rotated-secret-aaaa1111,current-secret-bbbb2222",
    "IG_VERIFY_TOKEN": "verify-token-cccc3333",
    "IG_ACCESS_TOKEN": "IGAAsecretTOKENdddd4444eeee5555",
    "METRICS_TOKEN": "metrics-token-ffff6666",
}
REDIS_PASSWORD = "redis-password-gggg7777"


@pytest.fixture
def secret_app(env, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("REDIS_URL", f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0")
    return create_app()


def settings_table(result):
    return {r["SETTING"]: r for r in parse_table(result.output.split("\n\n")[0])}


def test_check_config_prints_every_setting_and_masks_every_secret(secret_app):
    result = invoke(secret_app, "check-config")

    assert result.exit_code == 0, result.output
    for value in [*SECRETS.values(), REDIS_PASSWORD]:
        for part in value.split(","):
            assert part not in result.output
    table = settings_table(result)
    assert table["IG_APP_SECRET"]["VALUE"] == "****11 (23 chars), ****22 (23 chars)"
    assert table["IG_ACCESS_TOKEN"]["VALUE"] == "****55 (31 chars)"
    assert table["REDIS_URL"]["VALUE"] == "redis://:****@127.0.0.1:1/0"
    assert table["IG_ACCOUNT_ID"]["VALUE"] == payloads.ACCOUNT_ID
    assert (table["IG_ACCOUNT_ID"]["SOURCE"], table["PORT"]["SOURCE"]) == (
        "set",
        "default",
    )
    assert table["GRAPH_API_VERSION"]["SOURCE"] == "default"
    assert table["RETRY_DELAYS"]["VALUE"] == "0,0"
    for name in ("DATABASE_PATH", "AUTO_REPLY_TEXT", "MAX_BODY_BYTES", "LOG_LEVEL"):
        assert name in table


def test_check_config_says_an_unset_access_token_is_not_set(env, monkeypatch):
    monkeypatch.delenv("IG_ACCESS_TOKEN")

    result = invoke(create_app(), "check-config")

    assert result.exit_code == 0, result.output
    row = settings_table(result)["IG_ACCESS_TOKEN"]
    assert (row["VALUE"], row["SOURCE"]) == ("not set", "default")


RULES = [{"on": "message", "keywords": ["price"], "reply": "See our site."}]


def test_check_config_checks_the_rules_file(env, tmp_path, monkeypatch):
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps(RULES * 2))
    monkeypatch.setenv("REPLY_RULES_FILE", str(rules_file))
    app = create_app()

    good = invoke(app, "check-config")
    # Edited after start-up: check-config reads the file as a restart would.
    rules_file.write_text(json.dumps([*RULES, {**RULES[0], "on": "email"}]))
    bad = invoke(app, "check-config")

    assert good.exit_code == 0, good.output
    assert f"rules file: {rules_file}: OK, 2 rules" in good.output
    assert bad.exit_code == 1
    assert f"rules file: {rules_file}: rule 2: field 'on'" in bad.output
    last = bad.output.splitlines()[-1]
    assert last.startswith("error: REPLY_RULES_FILE rule 2: field 'on'")


def test_check_config_online_names_the_account(app, requests_mock):
    requests_mock.get(ME_URL, json={"id": payloads.ACCOUNT_ID, "username": "shop"})

    result = invoke(app, "check-config", "--online")

    assert result.exit_code == 0, result.output
    assert f"access token: OK, it belongs to @shop (id {payloads.ACCOUNT_ID})" in (
        result.output
    )
    [call] = requests_mock.request_history
    assert call.headers["Authorization"] == f"Bearer {payloads.ACCESS_TOKEN}"
    assert payloads.ACCESS_TOKEN not in call.url
    assert call.qs == {"fields": ["id,username"]}
    assert payloads.ACCESS_TOKEN not in result.output


def test_check_config_online_with_an_expired_token_fails(app, requests_mock):
    requests_mock.get(
        ME_URL,
        status_code=400,
        json=payloads.graph_error(
            190, 463, message=f"Session of {payloads.ACCESS_TOKEN} was invalidated"
        ),
    )

    result = invoke(app, "check-config", "--online")

    assert result.exit_code == 1
    assert "access token: refused: Graph API answered HTTP 400" in result.output
    last = result.output.splitlines()[-1]
    assert last.startswith("error: Graph API answered HTTP 400: access token invalid")
    assert "code=190" in last and "IG_ACCESS_TOKEN" in last
    assert payloads.ACCESS_TOKEN not in result.output
    assert "invalidated" not in result.output  # Meta's words never show


@pytest.mark.parametrize(
    "answer",
    [
        {"exc": requests.ConnectionError(f"{ME_URL}?access_token=leak")},
        {"status_code": 200, "text": "not json"},
    ],
    ids=["unreachable", "odd-answer"],
)
def test_check_config_online_without_a_usable_answer_fails(app, requests_mock, answer):
    requests_mock.get(ME_URL, **answer)

    result = invoke(app, "check-config", "--online")

    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith("error: ")
    assert "leak" not in result.output


def test_check_config_online_without_a_token_fails(env, monkeypatch, requests_mock):
    monkeypatch.delenv("IG_ACCESS_TOKEN")

    result = invoke(create_app(), "check-config", "--online")

    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "error: IG_ACCESS_TOKEN is not set"
    assert requests_mock.request_history == []


# -- events --------------------------------------------------------------------------


@pytest.fixture
def stored(post, relay):
    """Post a signed delivery of these events and let the relay queue them, as a
    running worker's does; return their keys, in order."""

    def stored(*events, changes=()):
        delivery = payloads.delivery(*events, changes=changes)
        assert post(delivery).status_code == 200
        relay()
        return [e.key for e in parse_delivery(payloads.body(delivery))]

    return stored


def age(store, key, seconds):
    store.db.execute(
        "UPDATE webhook_events SET received_at = ? WHERE event_key = ?",
        [now_iso(-seconds), key],
    )


def listed_keys(result):
    assert result.exit_code == 0, result.output
    return [r["KEY"] for r in parse_table(result.output.split("\n(")[0])]


def test_events_list_shows_newest_first_without_personal_data(cli, stored, store):
    sender = payloads.new_id()
    [message] = stored(payloads.text_message(sender, "my secret address"))
    [comment] = stored(changes=[payloads.comment_change(username="private_person")])
    store.finish(message, "done", "replied")

    result = cli("events", "list")

    assert result.output.splitlines()[0].split() == [
        "KEY",
        "KIND",
        "STATUS",
        "TRIES",
        "AGE",
        "OUTCOME",
    ]
    table = parse_table(result.output)
    assert [(r["KEY"], r["KIND"], r["STATUS"], r["OUTCOME"]) for r in table] == [
        (comment, "comment", "queued", "-"),
        (message, "message", "done", "replied"),
    ]
    assert {r["AGE"] for r in table} == {"0s"}
    for private in (sender, "my secret address", "private_person"):
        assert private not in result.output


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], ["comment", "echo", "old_message"]),
        (["--kind", "echo"], ["echo"]),
        (["--kind", "message"], ["old_message"]),
        (["--status", "ignored"], ["echo"]),
        (["--status", "queued"], ["comment", "old_message"]),
        (["--status", "dead"], []),
        (["--older-than", "1d"], ["old_message"]),
        (["--newer-than", "1h"], ["comment", "echo"]),
        (
            ["--kind", "comment", "--newer-than", "1h", "--status", "queued"],
            ["comment"],
        ),
    ],
)
def test_events_list_filters(cli, stored, store, args, expected):
    [old_message] = stored(payloads.text_message(payloads.new_id()))
    age(store, old_message, 3 * DAY)
    [echo] = stored(payloads.echo(payloads.new_id()))
    store.finish(echo, "ignored", "echo")
    [comment] = stored(changes=[payloads.comment_change()])
    keys = {"old_message": old_message, "echo": echo, "comment": comment}

    result = cli("events", "list", *args)

    if expected:
        assert listed_keys(result) == [keys[name] for name in expected]
    else:
        assert result.exit_code == 0
        assert result.output == "no events match\n"


def test_events_list_shows_events_no_worker_has_queued_yet_as_received(
    cli, stored, post
):
    [queued] = stored(payloads.text_message(payloads.new_id()))
    delivery = payloads.delivery(payloads.text_message(payloads.new_id()))
    assert post(delivery).status_code == 200  # and no relay ran since
    [waiting] = [e.key for e in parse_delivery(payloads.body(delivery))]

    table = parse_table(cli("events", "list").output)

    assert [(r["KEY"], r["STATUS"]) for r in table] == [
        (waiting, "received"),
        (queued, "queued"),
    ]
    assert listed_keys(cli("events", "list", "--status", "received")) == [waiting]


def test_events_list_limit_says_there_are_more(cli, stored):
    keys = stored(*(payloads.text_message(payloads.new_id()) for _ in range(4)))

    result = cli("events", "list", "--limit", "3")

    assert listed_keys(result) == keys[::-1][:3]
    assert result.output.endswith("(the newest 3 shown; --limit shows more)\n")
    assert "more" not in cli("events", "list", "--limit", "4").output


@pytest.mark.parametrize(
    "args",
    [["--limit", "0"], ["--limit", "x"], ["--status", "lost"], ["--older-than", "7w"]],
)
def test_events_list_refuses_bad_options(cli, args):
    result = cli("events", "list", *args)

    assert result.exit_code == 2
    assert "Invalid value" in result.output


def shown(result):
    """Return show's `label: value` lines and its history actions."""
    assert result.exit_code == 0, result.output
    head, rest = result.output.split("\nhistory:\n", 1)
    fields = dict(
        (label.strip(), value.strip())
        for label, value in (line.split(":", 1) for line in head.splitlines())
    )
    history = parse_table(rest.split("\n\n", 1)[0])
    return fields, [h["ACTION"] for h in history]


def test_events_show_prints_the_event_and_hides_its_payload(cli, stored, store):
    sender = payloads.new_id()
    [key] = stored(payloads.text_message(sender, "call me on 555 0100"))
    store.dead_letter(key, "token_invalid", "Graph API answered HTTP 400", 1)
    [letter] = rows(store, "dead_letter")

    hidden = cli("events", "show", key)
    revealed = cli("events", "show", key, "--payload")

    fields, history = shown(hidden)
    assert fields["key"] == key
    assert (fields["kind"], fields["status"], fields["outcome"]) == (
        "message",
        "dead",
        "token_invalid",
    )
    assert fields["dead letter"] == f"{letter['id']} (open, token_invalid)"
    assert fields["reply sent"] == "no"
    assert history == ["received", "queued", "dead_lettered"]
    assert sender not in hidden.output
    assert "555 0100" not in hidden.output
    assert "add --payload" in hidden.output
    assert revealed.exit_code == 0
    assert sender in revealed.output and "555 0100" in revealed.output


@pytest.mark.parametrize("key", ["0" * 32, "nope", "' OR 1=1 --"])
def test_events_show_of_an_unknown_key_is_one_error_line(cli, stored, key):
    stored(payloads.text_message(payloads.new_id()))

    line = one_error_line(cli("events", "show", key))

    assert "no event with key" in line


# -- send-test-event -----------------------------------------------------------------


class Receiver(BaseHTTPRequestHandler):
    """Keeps every POST it gets and answers with the server's `answer`."""

    disable_nagle_algorithm = True

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.headers, raw))
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    """A small HTTP server on 127.0.0.1 that records what it is sent."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.received = []
    server.answer = (200, b'{"received":1,"new":1}')
    server.url = f"http://127.0.0.1:{server.server_port}/webhooks/instagram"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", sample_events.KINDS)
def test_send_test_event_posts_a_signed_meta_shaped_delivery(cli, receiver, kind):
    result = cli("send-test-event", kind, "--url", receiver.url)

    assert result.exit_code == 0, result.output
    [(headers, raw)] = receiver.received
    verify_signature(raw, headers[SIGNATURE_HEADER], [payloads.APP_SECRET])
    events = parse_delivery(raw, payloads.ACCOUNT_ID)
    assert [e.kind for e in events] == sample_events.kinds_of(kind)
    body = json.loads(raw)
    assert {entry["id"] for entry in body["entry"]} == {payloads.ACCOUNT_ID}
    assert len(body["entry"]) == (2 if kind == "batch" else 1)
    assert 'answer: HTTP 200 {"received":1,"new":1}' in result.output
    for event in events:
        assert f"{event.key}  {event.kind}" in result.output


def test_send_test_event_escapes_like_meta(cli, receiver):
    cli("send-test-event", "message", "--url", receiver.url)

    [(_, raw)] = receiver.received
    assert raw.isascii()
    assert b"/" not in raw.replace(b"\\/", b"")
    assert b"caf\\u00e9 \\u2615 https:\\/\\/example.com\\/a\\/b" in raw
    [event] = parse_delivery(raw, payloads.ACCOUNT_ID)
    assert event.data()["event"]["message"]["text"] == sample_events.SAMPLE_TEXT
    assert event.data()["event"]["sender"] == {"id": sample_events.TEST_SENDER_ID}


def test_send_test_event_makes_fresh_events_each_time(cli, receiver):
    cli("send-test-event", "reaction", "--url", receiver.url)
    cli("send-test-event", "reaction", "--url", receiver.url)

    first, second = (parse_delivery(raw)[0] for _, raw in receiver.received)
    assert first.key != second.key


def test_send_test_event_signs_with_the_first_app_secret(env, monkeypatch, receiver):
    monkeypatch.setenv("IG_APP_SECRET", "new-secret-1234,old-secret-5678")

    result = invoke(create_app(), "send-test-event", "echo", "--url", receiver.url)

    assert result.exit_code == 0, result.output
    [(headers, raw)] = receiver.received
    verify_signature(raw, headers[SIGNATURE_HEADER], ["new-secret-1234"])


def test_send_test_event_uses_the_given_sender(cli, receiver):
    cli("send-test-event", "comment", "--url", receiver.url, "--sender", "4242")

    [(_, raw)] = receiver.received
    [event] = parse_delivery(raw)
    assert event.data()["event"]["value"]["from"]["id"] == "4242"


@pytest.mark.parametrize(
    "kind, path", [("message", ("message",)), ("comment", ("value",))]
)
def test_send_test_event_carries_the_given_text(cli, receiver, kind, path):
    cli("send-test-event", kind, "--url", receiver.url, "--text", "link please")

    [(_, raw)] = receiver.received
    [event] = parse_delivery(raw, payloads.ACCOUNT_ID)
    inner = event.data()["event"]
    for step in path:
        inner = inner[step]
    assert inner["text"] == "link please"


def test_send_test_event_fails_on_an_answer_that_is_not_2xx(cli, receiver):
    receiver.answer = (401, b'{"error":"signature does not match the body"}')

    line = one_error_line(cli("send-test-event", "message", "--url", receiver.url))

    assert line == (
        f"error: {receiver.url} answered HTTP 401:"
        ' {"error":"signature does not match the body"}'
    )


def test_send_test_event_fails_when_nothing_listens(cli):
    url = f"http://127.0.0.1:{free_port()}/webhooks/instagram"

    line = one_error_line(cli("send-test-event", "message", "--url", url))

    assert line == f"error: cannot post to {url}: ConnectionError"


def test_send_test_event_refuses_an_unknown_kind(cli):
    result = cli("send-test-event", "telegram")

    assert result.exit_code == 2
    assert "Invalid value for 'KIND'" in result.output


@pytest.mark.parametrize("kind", sample_events.KINDS)
def test_a_sample_delivery_is_stored_with_the_right_kinds(client, store, kind):
    raw = sample_events.serialise(sample_events.build(kind, payloads.ACCOUNT_ID))

    response = client.post(
        "/webhooks/instagram", data=raw, headers=payloads.signed_headers(raw)
    )

    expected = sample_events.kinds_of(kind)
    assert response.status_code == 200, response.json
    assert response.json == {"received": len(expected), "new": len(expected)}
    assert [r["kind"] for r in rows(store, "webhook_events")] == expected


def test_send_test_event_end_to_end_through_the_real_app(env):
    port = free_port()
    app = create_app({"PORT": str(port)})
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = invoke(app, "send-test-event", "batch")  # the default URL
    finally:
        server.shutdown()

    assert result.exit_code == 0, result.output
    assert f"to http://127.0.0.1:{port}/webhooks/instagram" in result.output
    [answer] = [line for line in result.output.splitlines() if "answer:" in line]
    assert answer.startswith("answer: HTTP 200 {")
    assert json.loads(answer.split(" ", 3)[3]) == {"received": 5, "new": 5}
    store = app.extensions["store"]
    stored = [(r["event_key"], r["kind"]) for r in rows(store, "webhook_events")]
    assert [kind for _, kind in stored] == sample_events.kinds_of("batch")
    for key, kind in stored:
        assert f"{key}  {kind}" in result.output


# -- purge ---------------------------------------------------------------------------


def backdate(store, key, seconds):
    """Make an event and everything about it look `seconds` old."""
    then = now_iso(-seconds)
    store.db.execute(
        "UPDATE webhook_events SET received_at = ?, updated_at = ? WHERE event_key = ?",
        [then, then, key],
    )
    store.db.execute(
        "UPDATE dead_letter SET created_at = ?, updated_at = ? WHERE event_key = ?",
        [then, then, key],
    )
    store.db.execute("UPDATE audit_log SET at = ? WHERE event_key = ?", [then, key])


@pytest.fixture
def history(stored, store):
    """Events of every state and age; return their keys by name."""
    names = (
        "old_done",
        "old_resolved",
        "old_discarded",
        "old_open",
        "old_replayed",
        "old_queued",
        "old_closed_lately",
        "new_done",
    )
    keys = dict(
        zip(
            names,
            stored(*(payloads.text_message(payloads.new_id()) for _ in names)),
            strict=True,
        )
    )
    for name in ("old_done", "old_resolved", "new_done"):
        store.finish(keys[name], "done", "replied")
    for name in ("old_discarded", "old_open", "old_replayed", "old_closed_lately"):
        store.dead_letter(keys[name], "token_invalid", "refused", 1)
    store.discard(keys["old_discarded"])
    store.discard(keys["old_closed_lately"])
    store.replay(keys["old_replayed"], "job-1")
    for name in names:
        if name.startswith("old_"):
            backdate(store, keys[name], 40 * DAY)
    # Resolved long ago: dead, then done, its dead letter closed 40 days back.
    store.dead_letter(keys["old_resolved"], "token_invalid", "refused", 1)
    store.finish(keys["old_resolved"], "done", "replied")
    backdate(store, keys["old_resolved"], 40 * DAY)
    # Discarded 40 days after it arrived, so only 0 days ago.
    store.db.execute(
        "UPDATE dead_letter SET updated_at = ? WHERE event_key = ?",
        [now_iso(), keys["old_closed_lately"]],
    )
    # A forged delivery long ago, one today; a reply slot long ago, one today.
    store.audit(None, "rejected_delivery", "bad signature")
    store.db.execute(
        "UPDATE audit_log SET at = ? WHERE event_key IS NULL", [now_iso(-40 * DAY)]
    )
    store.audit(None, "rejected_delivery", "bad signature")
    store.claim_cooldown("p_old", keys["old_done"], 3600)
    store.db.execute("UPDATE reply_cooldowns SET replied_at = ?", [now_iso(-40 * DAY)])
    store.claim_cooldown("p_new", keys["new_done"], 3600)
    return keys


def counts(store):
    return {
        table: store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in ("webhook_events", "audit_log", "dead_letter", "reply_cooldowns")
    }


def purged(result):
    assert result.exit_code == 0, result.output
    table = result.output.split("\nkept")[0]
    return {
        r["TABLE"]: int(r.get("DELETED") or r["WOULD DELETE"])
        for r in parse_table(table)
    }


def test_purge_deletes_old_finished_events_and_keeps_what_is_still_needed(
    cli, store, history
):
    before = counts(store)
    gone = ("old_done", "old_resolved", "old_discarded")
    gone_audit = sum(
        len(rows(store, "audit_log", "event_key = ?", [history[name]])) for name in gone
    )
    kept = ("old_open", "old_replayed", "old_closed_lately", "old_queued", "new_done")
    kept_history = {name: store.audit_trail(history[name]) for name in kept}

    dry = cli("purge", "--older-than", "30", "--dry-run")
    assert counts(store) == before
    real = cli("purge", "--older-than", "30")

    expected = {
        "webhook_events": 3,
        "audit_log": gone_audit + 1,  # and the old forgery
        "dead_letter": 2,
        "reply_cooldowns": 1,
    }
    assert purged(dry) == expected
    assert "(dry run: nothing deleted)" in dry.output
    assert purged(real) == expected
    assert "dry run" not in real.output
    assert "  3 events whose dead letter is open, replayed or closed" in real.output
    assert "  1 events not finished yet" in real.output
    assert {r["event_key"] for r in rows(store, "webhook_events")} == {
        history[name] for name in kept
    }
    assert {r["event_key"] for r in rows(store, "dead_letter")} == {
        history[name] for name in ("old_open", "old_replayed", "old_closed_lately")
    }
    # The kept events keep their whole history, old as it is.
    for name in kept:
        assert store.audit_trail(history[name]) == kept_history[name]
        assert [a["action"] for a in kept_history[name]][:2] == ["received", "queued"]
    for name in gone:
        assert store.audit_trail(history[name]) == []
    assert len(rows(store, "audit_log", "event_key IS NULL")) == 1
    assert [r["sender"] for r in rows(store, "reply_cooldowns")] == ["p_new"]
    assert purged(cli("purge", "--older-than", "30")) == dict.fromkeys(expected, 0)


def test_purge_keeps_a_reply_slot_the_cooldown_still_needs(env, store, monkeypatch):
    monkeypatch.setenv("REPLY_COOLDOWN_SECONDS", str(60 * DAY))
    app = create_app()
    store = app.extensions["store"]
    store.claim_cooldown("p_40", "k40", 1)
    store.db.execute("UPDATE reply_cooldowns SET replied_at = ?", [now_iso(-40 * DAY)])

    result = invoke(app, "purge", "--older-than", "30")

    assert purged(result)["reply_cooldowns"] == 0
    assert purged(invoke(app, "purge", "--older-than", "30"))["reply_cooldowns"] == 0
    store.db.execute("UPDATE reply_cooldowns SET replied_at = ?", [now_iso(-61 * DAY)])
    assert purged(invoke(app, "purge", "--older-than", "30"))["reply_cooldowns"] == 1


def test_purge_of_an_empty_database_deletes_nothing(cli):
    assert purged(cli("purge", "--older-than", "1")) == dict.fromkeys(
        ("webhook_events", "audit_log", "dead_letter", "reply_cooldowns"), 0
    )


@pytest.mark.parametrize(
    "args", [[], ["--older-than", "0"], ["--older-than", "-3"], ["--older-than", "2d"]]
)
def test_purge_needs_a_positive_number_of_days(cli, stored, store, args):
    stored(payloads.text_message(payloads.new_id()))

    result = cli("purge", *args)

    assert result.exit_code == 2
    assert "--older-than" in result.output
    assert len(rows(store, "webhook_events")) == 1


# -- every command -------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["init-db"],
        ["check-config"],
        ["events"],
        ["events", "list"],
        ["events", "show"],
        ["send-test-event"],
        ["purge"],
    ],
)
def test_every_command_explains_itself(cli, command):
    result = cli(*command, "--help")

    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: webhook_app {' '.join(command)}")
    description = result.output.split("\n\n")[1].strip()
    assert len(description) > 20


def test_check_config_masks_a_redis_password_in_the_query(env, monkeypatch):
    url = env["REDIS_URL"] + "?password=QuerySecret77"
    monkeypatch.setenv("REDIS_URL", url)

    result = invoke(create_app(), "check-config")

    assert result.exit_code == 0, result.output
    assert "QuerySecret77" not in result.output
    assert "password=****" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ("dead-letter", "show", "99999999999999999999"),
        ("dead-letter", "discard", "99999999999999999999"),
        ("events", "list", "--limit", "99999999999999999999"),
    ],
)
def test_numbers_too_big_for_the_database_are_usage_errors(cli, args):
    result = cli(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit


def test_discard_on_a_locked_database_is_one_error_line(
    env, app, post, work, requests_mock
):
    import sqlite3

    import storage

    requests_mock.post(
        f"https://graph.test/v24.0/{payloads.ACCOUNT_ID}/messages",
        status_code=400,
        json={"error": {"code": 551}},
    )
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    work()
    storage.BUSY_TIMEOUT_SECONDS, saved = 0.1, storage.BUSY_TIMEOUT_SECONDS
    locked_app = create_app()
    blocker = sqlite3.connect(env["DATABASE_PATH"], isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        result = invoke(locked_app, "dead-letter", "discard", "1")
    finally:
        blocker.execute("ROLLBACK")
        storage.BUSY_TIMEOUT_SECONDS = saved

    line = one_error_line(result)
    assert "cannot write to the database" in line
