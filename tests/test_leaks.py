"""No secret or personal value leaves webhook_events.payload in plain form.

Distinctive marker values stand in for the access token, the app secrets,
the verify and metrics tokens, a message text, a username and user ids.
After a burst of deliveries that takes every path (replies, Graph errors,
retries, timeouts, unreadable and forged deliveries), every log line,
every table but the stored payloads, every Redis key and value, every HTTP
answer and every operator command's output is searched for them.
"""

import base64
import contextlib
import json
import logging
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import payloads
import pytest
import requests
from conftest import GRAPH_BASE, rows, wait_for
from graph_stub import GraphStub
from redis import Redis
from test_recovery import Stack

import reconciler

SEND_URL = f"{GRAPH_BASE}/v24.0/{payloads.ACCOUNT_ID}/messages"
HOOK = "/webhooks/instagram"

ACCESS_TOKEN = "IGAAleakMarkerTOKENq7X2lm9PzR4tW8vB1nK5sD3fH6jY0cAe"
APP_SECRETS = ("leakMarkerSECRETnew7c41a0", "leakMarkerSECRETold2d9e5b")
VERIFY_TOKEN = "leakMarkerVERIFY-5b3a90e1"
METRICS_TOKEN = "leakMarkerMETRICS-8f20c4d1"
TEXT = "leakMarkerTEXT: meet me at 5/6 Rue Café ☕, door code 4481"
USERNAME = "leak.marker.username_93"
#: Instagram-scoped user ids, one per path an event can take.
USERS = {
    name: f"48044177{number:08d}"
    for number, name in enumerate(
        [
            "replied",
            "token_invalid",
            "unavailable",
            "server_error",
            "timeout",
            "too_old",
            "reactor",
            "commenter",
            "unreadable",
            "forger",
        ],
        start=1,
    )
}
#: A comment rule, so the marked comment gets a private reply.
RULES = [{"on": "comment", "keywords": ["door code"], "reply": "Sent you a DM!"}]

MARKERS = {
    "access token": ACCESS_TOKEN,
    "app secret (new)": APP_SECRETS[0],
    "app secret (old)": APP_SECRETS[1],
    "verify token": VERIFY_TOKEN,
    "metrics token": METRICS_TOKEN,
    "message text": TEXT,
    "message text (start)": "leakMarkerTEXT",
    "username": USERNAME,
    **{f"user id ({name})": user_id for name, user_id in USERS.items()},
}


def marked_settings(folder):
    """Return the settings that carry markers, with a rules file in folder."""
    rules_file = folder / "rules.json"
    rules_file.write_text(json.dumps(RULES))
    return {
        "IG_APP_SECRET": ",".join(APP_SECRETS),
        "IG_VERIFY_TOKEN": VERIFY_TOKEN,
        "IG_ACCESS_TOKEN": ACCESS_TOKEN,
        "METRICS_TOKEN": METRICS_TOKEN,
        "REPLY_RULES_FILE": str(rules_file),
        # A cooldown fills reply_cooldowns, which is scanned too.
        "REPLY_COOLDOWN_SECONDS": "3600",
    }


# -- scanning ------------------------------------------------------------------


def marker_forms(value):
    """Return the ways a value may be written: as is, JSON-escaped, URL-quoted."""
    escaped = json.dumps(value)[1:-1]
    return {
        value,
        escaped,
        escaped.replace("/", "\\/"),
        json.dumps(value, ensure_ascii=False)[1:-1],
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
    }


def find_markers(where, data, markers=MARKERS):
    """Return one line per marker found in data (text or bytes), in any case."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    haystack = data.lower()
    found = []
    for name, value in markers.items():
        for form in marker_forms(value):
            at = haystack.find(form.lower().encode())
            if at >= 0:
                context = data[max(at - 40, 0) : at + len(form) + 40]
                found.append(f"{where}: {name} in {context!r}")
                break
    return found


def scan(items, markers=MARKERS):
    """Search every (where, data) pair; return where markers were found."""
    return [
        line for where, data in items for line in find_markers(where, data, markers)
    ]


def decoded(blob, depth=2):
    """Yield blob and what zlib and base64 make of it (RQ compresses job data)."""
    yield blob
    if depth == 0:
        return
    for decode in (zlib.decompress, lambda b: base64.b64decode(b, validate=True)):
        try:
            inner = decode(blob)
        except (zlib.error, ValueError):
            continue
        yield from decoded(inner, depth - 1)


def redis_values(connection, key):
    """Return (label, bytes) for everything one Redis key holds, whatever its type."""
    kind = connection.type(key).decode()
    if kind == "string":
        return [("value", connection.get(key))]
    if kind == "hash":
        return [
            (label, data)
            for field, value in connection.hgetall(key).items()
            for label, data in (
                ("field name", field),
                (field.decode(errors="replace"), value),
            )
        ]
    if kind == "list":
        return [("item", item) for item in connection.lrange(key, 0, -1)]
    if kind == "set":
        return [("member", member) for member in connection.smembers(key)]
    if kind == "zset":
        return [
            (label, data)
            for member, score in connection.zrange(key, 0, -1, withscores=True)
            for label, data in (("member", member), ("score", repr(score).encode()))
        ]
    if kind == "stream":
        return [
            (f"entry {entry_id.decode()} {field.decode(errors='replace')}", value)
            for entry_id, fields in connection.xrange(key)
            for field, value in fields.items()
        ]
    assert kind == "none", f"unexpected Redis type {kind} of {key!r}"
    return []  # expired between SCAN and TYPE


def redis_items(connection):
    """Yield (where, bytes) for every key of a Redis database and all it holds."""
    for key in connection.scan_iter(count=1000):
        name = key.decode(errors="replace")
        yield f"redis key name {name}", key
        for label, value in redis_values(connection, key):
            for blob in decoded(value or b""):
                yield f"redis {name} [{label}]", blob


def table_items(conn):
    """Yield (where, text) for every cell of every table but the stored payloads."""
    tables = [
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    ]
    for table in tables:
        cursor = conn.execute(f'SELECT rowid, * FROM "{table}"')
        columns = [d[0] for d in cursor.description]
        for row in cursor:
            for column, value in zip(columns[1:], row[1:], strict=True):
                if (table, column) == ("webhook_events", "payload"):
                    continue
                if value is not None:
                    yield f"sqlite {table}.{column} (rowid {row[0]})", str(value)


def payload_items(conn):
    cursor = conn.execute("SELECT rowid, payload FROM webhook_events")
    return [(f"webhook_events.payload (rowid {r[0]})", r[1]) for r in cursor]


def http_text(status, headers, body):
    lines = [f"HTTP {status}", *(f"{name}: {value}" for name, value in headers)]
    return "\n".join(lines).encode() + b"\n\n" + body


def report(found):
    """Print where markers were found, for the test's output; return the text."""
    text = "\n".join(["markers found outside webhook_events.payload:", *found])
    if found:
        print(text)
    return text


# -- what Meta and others send -------------------------------------------------


def quoting_message(user):
    """Meta's error text, quoting the token, a user and what they wrote."""
    return (
        f"Error validating access token {ACCESS_TOKEN} for user {user}"
        f" ({USERNAME}) who wrote: {TEXT}"
    )


def graph_error(code, user, status=400):
    """A Graph error answer whose message quotes the token and a user."""
    body = payloads.graph_error(
        code, message=quoting_message(user), fbtrace_id="AtraceLeak1"
    )
    return {"status_code": status, "json": body}


def stub_send_api(requests_mock):
    """Answer the Send API per recipient, as the burst's scenarios need."""

    def success(request, context):
        recipient = request.json()["recipient"]
        # A private reply's answer names the commenter, as Meta's does.
        user = recipient.get("id") or USERS["commenter"]
        return {"recipient_id": user, "message_id": f"m_{user[-4:]}"}

    def to(name):
        return lambda request: request.json()["recipient"].get("id") == USERS[name]

    requests_mock.post(SEND_URL, json=success)
    for name, code in (("token_invalid", 190), ("unavailable", 551)):
        requests_mock.post(
            SEND_URL, additional_matcher=to(name), **graph_error(code, USERS[name])
        )
    requests_mock.post(
        SEND_URL,
        additional_matcher=to("server_error"),
        status_code=500,
        text=f"<html>{quoting_message(USERS['server_error'])}</html>",
    )
    timeout = requests.exceptions.ReadTimeout(
        "HTTPSConnectionPool(host='graph.test', port=443): Read timed out."
        f" (recipient {USERS['timeout']})"
    )
    requests_mock.post(
        SEND_URL,
        [{"exc": timeout}, {"json": success}],
        additional_matcher=to("timeout"),
    )


def marked_comment(user):
    return payloads.comment_change(text=TEXT, user_id=user, username=USERNAME)


def unreadable_bodies():
    """Signed bodies that hold the markers but are no delivery we can read."""
    truncated = (
        '{"object":"instagram","entry":[{"id":"1","messaging":[{"sender":'
        f'{{"id":"{USERS["unreadable"]}"}},"message":{{"mid":"m1","text":"{TEXT}"'
    )
    not_a_list = {"object": "instagram", "entry": {"user": USERNAME, "text": TEXT}}
    return [truncated.encode(), payloads.body(not_a_list), f"[{TEXT!r}]".encode()]


def burst():
    """Return (label, raw body, secret) of every signed delivery of the burst."""
    messages = {
        name: payloads.text_message(USERS[name], TEXT)
        for name in ("replied", "token_invalid", "unavailable", "server_error")
    }
    messages["timeout"] = payloads.text_message(USERS["timeout"], TEXT)
    old = payloads.now_ms() - 25 * 3600 * 1000
    messages["too_old"] = payloads.text_message(USERS["too_old"], TEXT, timestamp=old)
    mid, reactor = messages["replied"]["message"]["mid"], USERS["reactor"]
    reactions = payloads.delivery(
        payloads.reaction(reactor, mid),
        payloads.reaction(reactor, mid, action="unreact"),
        payloads.read(reactor, mid),
        payloads.edit(reactor, mid, text=TEXT),
        payloads.postback(reactor, payload=TEXT),
        payloads.echo(reactor, text=TEXT),
    )
    comments = payloads.delivery(
        changes=[marked_comment(USERS["commenter"]), payloads.mention_change()]
    )

    deliveries = [
        (f"message ({name})", payloads.body(payloads.delivery(event)), APP_SECRETS[0])
        for name, event in messages.items()
    ]
    deliveries += [
        ("reactions and reads", payloads.body(reactions), APP_SECRETS[1]),
        ("comment", payloads.meta_escaped(comments), APP_SECRETS[0]),
        ("redelivery", deliveries[0][1], APP_SECRETS[1]),
    ]
    return deliveries + [
        (f"unreadable {i}", raw, APP_SECRETS[0])
        for i, raw in enumerate(unreadable_bodies())
    ]


def forged():
    """Return (label, raw body, headers) of marked deliveries that fail the check."""
    forger = USERS["forger"]
    raw = payloads.body(
        payloads.delivery(
            payloads.text_message(forger, TEXT), changes=[marked_comment(forger)]
        )
    )
    return [
        (
            "forged: wrong secret",
            raw,
            payloads.signed_headers(raw, secret="not-" + APP_SECRETS[0]),
        ),
        (
            "forged: no signature",
            raw,
            payloads.signed_headers(raw, X_Hub_Signature_256=None),
        ),
        (
            "forged: garbled signature",
            raw,
            payloads.signed_headers(
                raw, X_Hub_Signature_256=f"sha256={USERNAME} {forger}"
            ),
        ),
    ]


def pages():
    """Return (label, path, headers) of the handshake and the service's pages."""
    right = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN}
    handshakes = [
        ("handshake", {**right, "hub.challenge": "1158201444"}),
        ("handshake: wrong mode", {**right, "hub.mode": "unsubscribe"}),
        ("handshake: no challenge", right),
        ("handshake: wrong token", {**right, "hub.verify_token": "not-it"}),
    ]
    return [
        (label, f"{HOOK}?{urllib.parse.urlencode(query)}", {})
        for label, query in handshakes
    ] + [
        ("healthz", "/healthz", {}),
        ("readyz", "/readyz", {}),
        ("metrics: no token", "/metrics", {}),
        ("metrics", "/metrics", {"Authorization": f"Bearer {METRICS_TOKEN}"}),
    ]


# -- in one process ------------------------------------------------------------


@pytest.fixture
def env(env, tmp_path, monkeypatch):
    """The tests' environment, with marker values for every secret."""
    marked = marked_settings(tmp_path)
    for name, value in marked.items():
        monkeypatch.setenv(name, value)
    return {**env, **marked}


def test_no_marker_leaks_from_web_worker_reconciler_or_commands(
    app, client, store, queue, settings, work, requests_mock, caplog, capsys
):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="rq.worker")
    stub_send_api(requests_mock)
    answers = []
    for label, raw, secret in burst():
        headers = payloads.signed_headers(raw, secret=secret)
        answers.append((label, client.post(HOOK, data=raw, headers=headers)))
    for label, raw, headers in forged():
        answers.append((label, client.post(HOOK, data=raw, headers=headers)))

    work()
    reconciler.run_pass(store, queue, settings)
    # One more refused send, last, so /readyz reports the token as invalid.
    raw = payloads.body(
        payloads.delivery(payloads.text_message(USERS["token_invalid"], TEXT))
    )
    client.post(HOOK, data=raw, headers=payloads.signed_headers(raw, APP_SECRETS[0]))
    work()
    answers += [(label, client.get(path, headers=h)) for label, path, h in pages()]
    runner = app.test_cli_runner()
    outputs = []
    for args in (["list"], ["list", "--status", "all"]) + tuple(
        ["show", str(row["id"])] for row in rows(store, "dead_letter")
    ):
        result = runner.invoke(args=["dead-letter", *args])
        assert result.exit_code == 0, result.output
        outputs.append((f"flask dead-letter {' '.join(args)}", result.output))

    # The burst took every path it was meant to.
    statuses = {label: answer.status_code for label, answer in answers}
    assert [s for label, s in statuses.items() if "forged" in label] == [401] * 3
    assert statuses["handshake"] == statuses["metrics"] == 200
    assert statuses["readyz"] == 503
    assert all(s == 200 for label, s in statuses.items() if "message" in label)
    assert sorted(row["reason"] for row in rows(store, "dead_letter")) == sorted(
        ["token_invalid", "token_invalid", "recipient_unavailable"]
        + ["retries_exhausted"]
        + ["outside_window"]
        + ["unparseable"] * 3
    )
    done = rows(store, "webhook_events", "status = 'done'")
    assert sorted(e["kind"] for e in done) == ["comment", "message", "message"]
    assert any(e["send_uncertain"] for e in done)
    assert rows(store, "reply_cooldowns")
    actions = {row["action"] for row in rows(store, "audit_log")}
    assert {"rejected_delivery", "duplicate", "retried", "ignored"} <= actions
    # The scanner finds what is there: the payloads, and what RQ compresses.
    assert scan(payload_items(store.db.conn))
    redis = queue.connection
    assert any(b"worker.handle_event" in blob for _, blob in redis_items(redis))
    assert any(b"Traceback (most recent" in blob for _, blob in redis_items(redis))

    found = scan(
        [
            ("log (caplog, DEBUG)", caplog.text),
            *(
                (f"HTTP answer to {label}", http_text(*answer_parts(answer)))
                for label, answer in answers
            ),
            *outputs,
            *table_items(store.db.conn),
            *redis_items(redis),
            ("stdout/stderr", "".join(capsys.readouterr())),
        ]
    )
    assert not found, report(found)


def answer_parts(response):
    return response.status_code, response.headers.items(), response.get_data()


# -- as processes --------------------------------------------------------------


def http(method, url, raw=None, headers=None):
    """Call the stack's web server on loopback, never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        url, data=raw, headers=headers or {}, method=method
    )
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers.items(), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.items(), exc.read()


def test_no_marker_leaks_from_gunicorn_and_worker_processes(tmp_path):
    with GraphStub() as graph:
        stack = Stack(
            tmp_path,
            graph.url,
            **marked_settings(tmp_path),
            LOG_LEVEL="DEBUG",
            LOG_FORMAT="json",
        )
        try:
            found, answers = run_small_burst(stack, graph)
        finally:
            stack.close()

    statuses = {label: status for label, (status, _, _) in answers}
    assert statuses.pop("readyz") in (200, 503)
    assert statuses == {
        **dict.fromkeys(["replied", "token_invalid", "server_error", "comment"], 200),
        "forged: wrong secret": 401,
        "handshake": 200,
        "metrics": 200,
    }
    assert "Listening on" in stack.logs()
    found += scan([("process logs (redis, web, worker)", stack.logs())])
    assert not found, report(found)


def run_small_burst(stack, graph):
    """Work a few deliveries through real processes; return findings and answers."""
    stack.start_redis()
    stack.start_web()
    started = time.monotonic()
    stack.start_worker()
    base = f"http://127.0.0.1:{stack.web_port}"
    for name, code, status in (("token_invalid", 190, 400), ("server_error", 2, 500)):
        answer = graph_error(code, USERS[name], status)
        graph.script[USERS[name]] = [{"status": status, "json": answer["json"]}]

    answers = []
    deliveries = [
        (name, payloads.delivery(payloads.text_message(USERS[name], TEXT)))
        for name in ("replied", "token_invalid", "server_error")
    ]
    deliveries.append(
        ("comment", payloads.delivery(changes=[marked_comment(USERS["commenter"])]))
    )
    for name, delivery in deliveries:
        raw = payloads.meta_escaped(delivery)
        headers = payloads.signed_headers(raw, secret=APP_SECRETS[-1])
        answers.append((name, http("POST", base + HOOK, raw, headers)))
    label, raw, headers = forged()[0]
    answers.append((label, http("POST", base + HOOK, raw, headers)))

    assert wait_for(lambda: stack.all_final(4), seconds=60), stack.statuses()
    # Let the worker's reconciler run at least one pass over the final state.
    time.sleep(max(0.0, started + reconciler.INTERVAL_SECONDS + 3 - time.monotonic()))
    for label, path, headers in pages():
        if label in ("handshake", "readyz", "metrics"):
            answers.append((label, http("GET", base + path, headers=headers)))
    reasons = [r["reason"] for r in stack.query("SELECT reason FROM dead_letter")]
    assert reasons == ["token_invalid"]
    assert len(graph.successes_to(USERS["server_error"])) == 1
    assert any("comment_id" in c["body"]["recipient"] for c in graph.calls)

    in_redis = list(redis_items(Redis.from_url(stack.env["REDIS_URL"])))
    assert any(b"worker.handle_event" in blob for _, blob in in_redis)
    with contextlib.closing(sqlite3.connect(stack.db_path)) as db:
        assert scan(payload_items(db))
        items = [*table_items(db), *in_redis]
    items += [(f"HTTP answer to {label}", http_text(*a)) for label, a in answers]
    return scan(items), answers
