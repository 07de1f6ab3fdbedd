"""The web side: Meta's handshake, signed deliveries stored once, health.

Serve with ``gunicorn "webhook_app:create_app()"``. Nothing slow happens while
Meta waits: a delivery is checked and its new events are stored in SQLite,
in one short transaction, before the answer. Redis is not on this path at
all: each worker process's relay (reconciler.Relay) moves stored events onto the
queue a moment later, so a delivery is answered the same whether Redis is
up or not, and an event stored is never lost on the way to the queue.
"""

import functools
import hashlib
import logging
import os
import sqlite3
import time

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

import commands
import metrics
import queueing
import settings as settings_module
from errors import ConfigError, SignatureError, SignatureMismatch, StorageError
from events import UnparseableDelivery, parse_delivery
from security import SIGNATURE_HEADER, token_matches, verify_signature
from storage import Store

log = logging.getLogger(__name__)
bp = Blueprint("webhooks", __name__)

MAX_CHALLENGE_LENGTH = 256
#: /readyz says the relay is behind when a stored event waits this long.
RELAY_LATE_SECONDS = 30


def create_app(config=None):
    """Build the app.

    ``config`` is a Settings, or a mapping of setting names (as in the
    environment) that override the environment; None reads .env and the
    environment.
    """
    if config is not None:
        return _build(config)
    # Started from a command line (gunicorn, flask): one line, no traceback.
    try:
        return _build(None)
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    except StorageError as exc:
        raise SystemExit(f"storage error: {exc}") from None


def _build(config):
    if isinstance(config, settings_module.Settings):
        settings = config
    elif config is not None:
        settings = settings_module.from_env({**os.environ, **config})
    else:
        settings = settings_module.load()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["settings"] = settings
    app.extensions["store"] = Store(settings.database_path)
    app.extensions["queue"] = queueing.get_queue(settings)
    app.extensions["rejections"] = RejectionAudit()
    app.extensions["store"].init_schema()

    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.cli.add_command(commands.init_db)
    app.cli.add_command(commands.dead_letter)
    app.cli.add_command(commands.check_config)
    app.cli.add_command(commands.events_group)
    app.cli.add_command(commands.send_test_event)
    app.cli.add_command(commands.purge)
    return app


def _settings():
    return current_app.extensions["settings"]


def _store():
    return current_app.extensions["store"]


@bp.get("/webhooks/instagram")
def handshake():
    """Answer Meta's verification handshake with the challenge, or 403."""
    mode = request.args.get("hub.mode")
    challenge = request.args.get("hub.challenge")

    if mode != "subscribe" or not token_matches(
        request.args.get("hub.verify_token"), _settings().verify_token
    ):
        log.warning(
            "handshake refused: hub.mode is not 'subscribe' or hub.verify_token"
            " differs from IG_VERIFY_TOKEN"
        )
        return _text("forbidden\n", 403)
    if not challenge or len(challenge) > MAX_CHALLENGE_LENGTH:
        log.warning("handshake refused: hub.challenge missing or too long")
        return _text("hub.challenge is missing or too long\n", 400)

    log.info("handshake answered")
    return _text(challenge, 200)


@bp.post("/webhooks/instagram")
def receive():
    """Check the signature, then store every event once; the relay queues them."""
    app = current_app._get_current_object()
    settings, store = app.extensions["settings"], app.extensions["store"]
    raw = request.get_data(cache=False)

    # The signature is checked on the raw bytes, before anything is parsed.
    # Servers join a repeated header with commas, which no signature has.
    signature = request.environ.get(_SIGNATURE_KEY)
    try:
        if signature is not None and "," in signature:
            raise SignatureError(f"more than one {SIGNATURE_HEADER} header")
        verify_signature(raw, signature, settings.app_secrets)
    except SignatureError as exc:
        hint = " (check IG_APP_SECRET)" if isinstance(exc, SignatureMismatch) else ""
        log.warning("delivery %s rejected%s: %s", _delivery_id(raw), hint, exc)
        metrics.DELIVERIES.labels("rejected").inc()
        app.extensions["rejections"].record(store, str(exc))
        return jsonify(error=str(exc)), 401

    try:
        events = parse_delivery(raw, settings.account_id)
    except UnparseableDelivery as exc:
        return _keep_unparseable(store, raw, _delivery_id(raw), str(exc))

    try:
        new = store.store_events(events)
    except (sqlite3.Error, StorageError) as exc:
        log.error("delivery %s not stored, answering 503: %s", _delivery_id(raw), exc)
        metrics.DELIVERIES.labels("storage_unavailable").inc()
        return jsonify(error="storage unavailable, retry later"), 503

    _ACCEPTED.inc()
    for event in new:
        _events_received(event.kind).inc()
    # DEBUG, not INFO: a line per delivery cost the web a twelfth of its
    # time, and the worker logs every event's outcome anyway.
    if log.isEnabledFor(logging.DEBUG):
        delivery = _delivery_id(raw)
        log.debug(
            "delivery %s: %d events, %d new, %d duplicate",
            delivery,
            len(events),
            len(new),
            len(events) - len(new),
        )
        for event in new:
            log.debug("delivery %s: event %s kind=%s", delivery, event.key, event.kind)
    # Built directly: jsonify's generality cost more than storing the event.
    body = f'{{"received": {len(events)}, "new": {len(new)}}}'
    return Response(body, 200, mimetype="application/json")


#: Where WSGI servers put the signature header.
_SIGNATURE_KEY = "HTTP_" + SIGNATURE_HEADER.upper().replace("-", "_")
#: Children of labelled counters, looked up once: labels() costs more than inc().
_ACCEPTED = metrics.DELIVERIES.labels("accepted")
_events_received = functools.lru_cache(maxsize=None)(metrics.EVENTS_RECEIVED.labels)


def _delivery_id(raw):
    """Name a delivery in logs by a digest of its body, never by its content."""
    return hashlib.sha256(raw).hexdigest()[:12]


def _keep_unparseable(store, raw, delivery, problem):
    """Keep a signed body we cannot read in dead_letter; a retry would not fix it."""
    key = "unparseable-" + hashlib.sha256(raw).hexdigest()[:20]
    try:
        store.store_unparseable(key, raw.decode("utf-8", "backslashreplace"), problem)
    except (sqlite3.Error, StorageError) as exc:
        log.error("delivery %s not stored, answering 503: %s", delivery, exc)
        metrics.DELIVERIES.labels("storage_unavailable").inc()
        return jsonify(error="storage unavailable, retry later"), 503
    log.warning("delivery %s kept as %s in dead_letter: %s", delivery, key, problem)
    metrics.DELIVERIES.labels("unparseable").inc()
    return jsonify(received=0, new=0, unparseable=True), 200


@bp.get("/healthz")
def healthz():
    """Say that the process is up."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Say whether Redis answers, SQLite is writable and the token still works."""
    checks = {
        "redis": _check_redis(),
        "database": _check_database(),
        "graph_token": _check_token(),
        "relay": _check_relay(),
    }
    ready = all(value == "ok" for value in checks.values())
    return jsonify(status="ready" if ready else "not ready", checks=checks), (
        200 if ready else 503
    )


def _check_redis():
    try:
        current_app.extensions["queue"].connection.ping()
    except RedisError as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"


def _check_database():
    """Say whether deliveries can be stored: the inbox takes a write, the rest reads.

    The main database is only read here: its write lock is the workers',
    and waiting for a worker the web outranks for the CPU would make the
    check slow exactly when the service is busy.
    """
    store = _store()
    try:
        conn = store.inbox.db.conn
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        store.schema_version()
    except (sqlite3.Error, StorageError) as exc:
        return f"not writable ({exc})"
    return "ok"


def _check_relay():
    """Say whether stored events reach the queue: a worker's relay takes them.

    Under a backlog events may wait longer than RELAY_LATE_SECONDS while a
    relay keeps the queue full; they are late only when no relay is at work.
    """
    try:
        late = _store().waiting_for_queue(RELAY_LATE_SECONDS)
    except (sqlite3.Error, StorageError):
        return "unknown (database unreadable)"
    if not late:
        return "ok"
    try:
        relaying = current_app.extensions["queue"].connection.exists(
            queueing.relay_heartbeat_key(_settings())
        )
    except RedisError:
        return "unknown (Redis unreachable)"
    if relaying:
        return "ok"
    return (
        f"behind: {late} events stored over {RELAY_LATE_SECONDS} s ago are"
        " not queued yet; is a worker running, and does Redis answer?"
    )


def _check_token():
    try:
        flagged = queueing.token_flagged(
            current_app.extensions["queue"], _settings().access_token
        )
    except RedisError:
        return "unknown (Redis unreachable)"
    if flagged:
        return "invalid: the Graph API refused IG_ACCESS_TOKEN; set a new one"
    return "ok"


@bp.get("/metrics")
def metrics_page():
    """Serve Prometheus metrics of every process, behind METRICS_TOKEN if set."""
    token = _settings().metrics_token
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if token and not (scheme.lower() == "bearer" and token_matches(given, token)):
        return jsonify(error="metrics need Authorization: Bearer METRICS_TOKEN"), 401
    body, content_type = metrics.render(_store(), current_app.extensions["queue"])
    return Response(body, 200, content_type=content_type)


class RejectionAudit:
    """Write rejected deliveries to audit_log, at most one row a second.

    Anyone can post to the webhook URL: one row per forged request would let
    a flood grow the database without bound. Rejections in between are
    counted into the next row.
    """

    def __init__(self, interval=1.0, clock=time.monotonic):
        self.interval, self.clock = interval, clock
        self.last_written = None
        self.unwritten = 0

    def record(self, store, reason):
        now = self.clock()
        if self.last_written is not None and now - self.last_written < self.interval:
            self.unwritten += 1
            return
        detail = reason
        if self.unwritten:
            detail += f" (and {self.unwritten} more rejected since the last row)"
        try:
            store.audit(None, "rejected_delivery", detail)
        except (sqlite3.Error, StorageError):
            log.warning("could not write the audit row of a rejected delivery")
            return
        self.last_written, self.unwritten = now, 0


def _text(body, status):
    response = Response(body, status, mimetype="text/plain")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _http_error(exc):
    if exc.code == 413:
        metrics.DELIVERIES.labels("too_large").inc()
    return jsonify(
        error=exc.description if exc.code != 500 else "internal error"
    ), exc.code


def _unexpected_error(exc):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return jsonify(error="internal error"), 500
