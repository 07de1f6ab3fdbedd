"""Operator commands of ``flask --app webhook_app``: dead-letter, events, init-db...

``dead-letter list|show|replay|discard``, ``events list|show``, ``init-db``,
``check-config``, ``send-test-event`` and ``purge``. Errors end a command
with one ``error:`` line and a non-zero status. Payloads are personal data:
``show`` prints one only when asked with --payload.
"""

import dataclasses
import os
import re
import sqlite3
import sys
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import click
import requests
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry

import queueing
import sample_events
from errors import ConfigError, StorageError
from events import parse_delivery
from instagram_client import error_from_response
from security import SIGNATURE_HEADER, sign
from storage import parse_iso

dead_letter = AppGroup(
    "dead-letter", help="Inspect, replay and discard events that finally failed."
)

STATUSES = ("open", "replayed", "resolved", "discarded", "all")
#: A dead letter's id: a positive integer SQLite can hold.
ID = click.IntRange(1, 2**63 - 1)
_AGE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_AGE_SECONDS = 100 * 365 * 86400


class Age(click.ParamType):
    """A duration such as 30m, 12h or 7d, in seconds."""

    name = "age"

    def convert(self, value, param, ctx):
        match = _AGE.match(str(value).strip())
        if not match:
            self.fail(f"expected a number and a unit (s, m, h, d), got {value!r}")
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if seconds > MAX_AGE_SECONDS:
            self.fail(f"expected at most 100 years, got {value!r}")
        return seconds


def _store():
    return current_app.extensions["store"]


def _settings():
    return current_app.extensions["settings"]


def _fail(message):
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def age_of(text, now=None):
    """Return how long ago a stored time was, in a few characters."""
    moment = parse_iso(text)
    if moment is None:
        return "-"
    seconds = int(((now or datetime.now(UTC)) - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(headers, rows):
    """Return rows as text columns a person can read."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(cell))) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(
            str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


def age_options(command):
    """Add --older-than and --newer-than (ages such as 2h or 7d) to a command."""
    newer = click.option(
        "--newer-than", type=Age(), help="Only those newer than this, e.g. 7d."
    )
    older = click.option(
        "--older-than", type=Age(), help="Only those older than this, e.g. 2h."
    )
    return older(newer(command))


@dead_letter.command("list")
@click.option("--reason", help="Only this reason, e.g. token_invalid.")
@click.option(
    "--status",
    type=click.Choice(STATUSES),
    default="open",
    show_default=True,
    help="Only dead letters in this state.",
)
@age_options
def list_command(reason, status, older_than, newer_than):
    """List dead letters, newest first."""
    rows = _store().dead_letters(
        reason=reason,
        status=None if status == "all" else status,
        older_than=older_than,
        newer_than=newer_than,
    )
    if not rows:
        click.echo("no dead letters match")
        return
    click.echo(
        table(
            ["ID", "EVENT", "KIND", "REASON", "STATUS", "TRIES", "AGE", "ERROR"],
            [
                [
                    r["id"],
                    r["event_key"],
                    r["kind"],
                    r["reason"],
                    r["status"],
                    r["attempts"],
                    age_of(r["created_at"]),
                    _short(r["error"], 60),
                ]
                for r in rows
            ],
        )
    )


@dead_letter.command("show")
@click.argument("dead_id", type=ID)
@click.option(
    "--payload",
    is_flag=True,
    help="Also print the event as Meta sent it (personal data).",
)
def show_command(dead_id, payload):
    """Show one dead letter, its event and every step of its life."""
    store = _store()
    row = store.get_dead_letter(dead_id)
    if row is None:
        _fail(f"no dead letter with id {dead_id}")
    event = store.get_event(row["event_key"])

    for label, value in (
        ("id", row["id"]),
        ("event", row["event_key"]),
        ("kind", event["kind"]),
        ("event status", event["status"]),
        ("reason", row["reason"]),
        ("status", row["status"]),
        ("attempts", row["attempts"]),
        ("created", row["created_at"]),
        ("updated", row["updated_at"]),
        ("job", event["job_id"] or "-"),
        ("reply sent", event["reply_message_id"] or "no"),
        (
            "send uncertain",
            "yes, an attempt may have gone out" if event["send_uncertain"] else "no",
        ),
        ("error", row["error"]),
    ):
        click.echo(f"{label + ':':<16}{value}")

    click.echo("\nhistory:")
    click.echo(
        table(
            ["AT", "ACTION", "DETAIL"],
            [
                [a["at"], a["action"], a["detail"]]
                for a in store.audit_trail(row["event_key"])
            ],
        )
    )
    if payload:
        click.echo("\npayload:")
        click.echo(event["payload"])
    else:
        click.echo(
            "\n(payload hidden: it holds personal data; add --payload to see it)"
        )


@dead_letter.command("replay")
@click.argument("ids", nargs=-1, type=ID)
@click.option("--reason", help="Replay every open dead letter with this reason.")
@click.option(
    "--all", "replay_all", is_flag=True, help="Replay every open dead letter."
)
def replay_command(ids, reason, replay_all):
    """Queue dead letters again; an event whose reply went out is never resent."""
    if bool(ids) + bool(reason) + replay_all != 1:
        _fail("give dead-letter IDs, or --reason REASON, or --all (one of them)")
    rows = _select(ids, reason, replay_all)
    queue = queueing.get_queue(_settings())
    replayed = refused = 0
    for row in rows:
        problem = _why_not_replayable(row)
        if problem:
            click.echo(f"{row['id']}: not replayed: {problem}")
            refused += 1
            continue
        try:
            job_id = _requeue(queue, row)
        except RedisError as exc:
            _fail(
                f"cannot reach Redis at REDIS_URL ({type(exc).__name__}); "
                f"{replayed} replayed before it failed"
            )
        except sqlite3.Error as exc:
            _fail(f"cannot write to the database ({exc}); {replayed} replayed before")
        click.echo(f"{row['id']}: replayed as job {job_id}")
        replayed += 1
    click.echo(f"{replayed} replayed, {refused} refused")
    if refused and not replayed:
        sys.exit(1)


@dead_letter.command("discard")
@click.argument("ids", nargs=-1, type=ID, required=True)
def discard_command(ids):
    """Mark dead letters discarded; they stay in the table for the audit."""
    store = _store()
    queue = queueing.get_queue(_settings())
    discarded = 0
    for row in _select(ids, None, False):
        try:
            changed = store.discard(row["event_key"])
        except sqlite3.Error as exc:
            _fail(f"cannot write to the database ({exc}); {discarded} discarded before")
        if not changed:
            click.echo(f"{row['id']}: not discarded: it is {row['status']}, not open")
            continue
        _drop_failed_job(queue, row["job_id"])
        click.echo(f"{row['id']}: discarded")
        discarded += 1
    if not discarded:
        sys.exit(1)


def _select(ids, reason, replay_all):
    store = _store()
    if ids:
        rows = []
        for dead_id in ids:
            row = store.get_dead_letter(dead_id)
            if row is None:
                _fail(f"no dead letter with id {dead_id}")
            rows.append(row)
        return rows
    rows = store.dead_letters(reason=reason, status="open")
    if not rows:
        _fail("no open dead letters match")
    return rows


def _why_not_replayable(row):
    if row["reply_message_id"]:
        return (
            "its reply was already sent (message_id recorded); it is never sent twice"
        )
    if row["kind"] == "unparseable":
        return "the delivery's body could not be read; there is nothing to replay"
    if row["status"] not in ("open", "replayed"):
        return f"it is {row['status']}"
    return None


def _requeue(queue, row):
    """Queue the event again: its failed job if RQ still has it, else a new one."""
    store, key = _store(), row["event_key"]
    registry = FailedJobRegistry(queue=queue)
    job_id = row["job_id"]
    if job_id and job_id in registry.get_job_ids():
        if Job.exists(job_id, connection=queue.connection):
            store.replay(key, job_id)
            registry.requeue(job_id)
            return job_id
        registry.remove(job_id)  # listed, but its data is gone
    job_id = queueing.new_job_id(key)
    store.replay(key, job_id)
    queueing.enqueue_events(queue, [(key, row["kind"])], _settings(), {key: job_id})
    return job_id


def _drop_failed_job(queue, job_id):
    """Remove a discarded event's job from RQ's failed registry, so both agree."""
    if not job_id:
        return
    try:
        job = Job.fetch(job_id, connection=queue.connection)
        FailedJobRegistry(queue=queue).remove(job, delete_job=True)
    except (NoSuchJobError, RedisError):
        pass


def _short(text, width):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


# -- init-db -------------------------------------------------------------------


@click.command("init-db")
@with_appcontext
def init_db():
    """Create the database, or migrate it to the latest schema version."""
    store = _store()
    # The app migrated at start-up already; report what it found then.
    before = store.found_version
    try:
        _, after = store.init_schema()
    except StorageError as exc:
        _fail(str(exc))
    store.found_version = None  # a second run in this process reports afresh
    before = after if before is None else before
    path = _settings().database_path
    if before == after:
        click.echo(f"{path}: schema version {after}, up to date")
    elif before == 0:
        click.echo(f"{path}: schema version 0 (new) -> {after}")
    else:
        click.echo(f"{path}: schema version {before} -> {after}")


# -- check-config --------------------------------------------------------------

# Environment names of the settings whose name is not their field's, upper-cased.
_ENV_NAMES = {
    "app_secrets": "IG_APP_SECRET",
    "verify_token": "IG_VERIFY_TOKEN",
    "access_token": "IG_ACCESS_TOKEN",
    "account_id": "IG_ACCOUNT_ID",
    "queue_name": "RQ_QUEUE",
}
# A setting whose name holds one of these words is never printed.
_SECRET_WORDS = ("secret", "token", "password", "passwd", "key")


@click.command("check-config")
@with_appcontext
@click.option(
    "--online",
    is_flag=True,
    help="Also ask the Graph API whose IG_ACCESS_TOKEN this is.",
)
def check_config(online):
    """Print every setting, secrets masked; check the rules file and the token.

    Exit 1 when the rules file is wrong or, with --online, the token is refused.
    """
    settings = _settings()
    click.echo(table(["SETTING", "VALUE", "SOURCE"], _setting_rows(settings)))

    problems = []
    rules_path = getattr(settings, "reply_rules_file", None) or os.environ.get(
        "REPLY_RULES_FILE"
    )
    if rules_path:
        verdict, problem = _check_rules(rules_path)
        click.echo(f"\nrules file: {verdict}")
        if problem:
            problems.append(problem)
    if online:
        verdict, problem = _check_token(settings)
        click.echo(f"\naccess token: {verdict}")
        if problem:
            problems.append(problem)

    if problems:
        _fail("; ".join(problems))


def _setting_rows(settings):
    rows = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        is_default = field.default is not dataclasses.MISSING and value == field.default
        rows.append(
            [
                _ENV_NAMES.get(field.name, field.name.upper()),
                _shown(field.name, value),
                "default" if is_default else "set",
            ]
        )
    return rows


def _shown(name, value):
    """Return a setting's value as printed: secrets masked, URL passwords hidden."""
    if any(word in name for word in _SECRET_WORDS):
        values = value if isinstance(value, tuple) else (value,)
        return ", ".join(_masked(v) for v in values) or "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        if all(isinstance(v, int | float | str) for v in value):
            return ",".join(map(str, value))
        return f"{len(value)} loaded"  # e.g. the rules read from REPLY_RULES_FILE
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        if "://" in value:
            value = _without_password(value)
        return _short(value, 60) if value else "(empty)"
    return str(value)


def _masked(secret):
    """Show a secret's length, and its last 2 characters when it is long."""
    if not secret:
        return "not set"
    if len(secret) < 16:
        return f"**** ({len(secret)} chars)"
    return f"****{secret[-2:]} ({len(secret)} chars)"


def _without_password(url):
    parts = urlsplit(url)
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2****", parts.query)
    parts = parts._replace(query=query)
    if parts.password is None:
        return urlunsplit(parts)
    netloc = f"{parts.username or ''}:****@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _check_rules(path):
    """Return (what to print, problem or None) for the reply rules file."""
    try:
        import rules
    except ImportError:
        return f"{path}: not checked (this version has no rules module)", None
    try:
        loaded = rules.load_rules(path)
    except ConfigError as exc:
        return f"{path}: {exc.problem}", str(exc)
    try:
        count = f", {len(loaded)} rules"
    except TypeError:
        count = ""
    return f"{path}: OK{count}", None


def _check_token(settings):
    """Ask the Graph API who the token belongs to; return (verdict, problem)."""
    if not settings.access_token:
        return "not set", "IG_ACCESS_TOKEN is not set"
    url = f"{settings.graph_api_base}/{settings.graph_api_version}/me"
    try:
        response = requests.get(
            url,
            params={"fields": "id,username"},
            # Only in the header: a token in the URL ends up in error messages.
            headers={"Authorization": f"Bearer {settings.access_token}"},
            timeout=settings.graph_timeout_seconds,
        )
    except requests.RequestException as exc:
        problem = f"cannot reach the Graph API at GRAPH_API_BASE ({type(exc).__name__})"
        return "not checked", problem

    if response.status_code >= 400:
        error = error_from_response(response)
        hint = "; set a new IG_ACCESS_TOKEN" if error.reason == "token_invalid" else ""
        return f"refused: {error}", f"{error}{hint}"
    try:
        me = response.json()
        who = f"@{me['username']} (id {me['id']})"
    except (ValueError, KeyError, TypeError):
        return "accepted", (
            f"the Graph API answered HTTP {response.status_code} without"
            " the account's id and username"
        )
    return f"OK, it belongs to {who}", None


# -- events --------------------------------------------------------------------

events_group = AppGroup("events", help="Look at stored events (payloads hidden).")
EVENT_STATUSES = ("received", "queued", "done", "ignored", "dead", "all")


@events_group.command("list")
@click.option("--kind", help="Only this kind, e.g. message, comment, echo.")
@click.option(
    "--status",
    type=click.Choice(EVENT_STATUSES),
    default="all",
    show_default=True,
    help="Only events in this state.",
)
@age_options
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=50,
    show_default=True,
    help="Show at most this many.",
)
def events_list(kind, status, older_than, newer_than, limit):
    """List events, newest first, without their payloads."""
    rows = _store().events(
        kind=kind,
        status=None if status == "all" else status,
        older_than=older_than,
        newer_than=newer_than,
        limit=limit + 1,
    )
    if not rows:
        click.echo("no events match")
        return
    click.echo(
        table(
            ["KEY", "KIND", "STATUS", "TRIES", "AGE", "OUTCOME"],
            [
                [
                    r["event_key"],
                    r["kind"],
                    r["status"],
                    r["attempts"],
                    age_of(r["received_at"]),
                    _short(r["outcome"] or "-", 40),
                ]
                for r in rows[:limit]
            ],
        )
    )
    if len(rows) > limit:
        click.echo(f"(the newest {limit} shown; --limit shows more)")


@events_group.command("show")
@click.argument("key")
@click.option(
    "--payload",
    is_flag=True,
    help="Also print the event as Meta sent it (personal data).",
)
def events_show(key, payload):
    """Show one event, its dead letter if any, and every step of its life."""
    store = _store()
    event = store.find_event(key.strip())
    if event is None:
        _fail(f"no event with key {_short(key, 40)!r}")
    key = event["event_key"]
    letter = store.dead_letter_of(key)

    for label, value in (
        ("key", key),
        ("kind", event["kind"]),
        ("status", event["status"]),
        ("outcome", event["outcome"] or "-"),
        ("attempts", event["attempts"]),
        ("account", event["account_id"] or "-"),
        ("occurred", event["occurred_at"] or "-"),
        ("received", event["received_at"]),
        ("updated", event["updated_at"]),
        ("job", event["job_id"] or "-"),
        ("reply sent", event["reply_message_id"] or "no"),
        (
            "send uncertain",
            "yes, an attempt may have gone out" if event["send_uncertain"] else "no",
        ),
        (
            "dead letter",
            f"{letter['id']} ({letter['status']}, {letter['reason']})"
            if letter
            else "-",
        ),
    ):
        click.echo(f"{label + ':':<16}{value}")

    click.echo("\nhistory:")
    click.echo(
        table(
            ["AT", "ACTION", "DETAIL"],
            [[a["at"], a["action"], a["detail"]] for a in store.audit_trail(key)],
        )
    )
    if payload:
        click.echo("\npayload:")
        click.echo(event["payload"])
    else:
        click.echo(
            "\n(payload hidden: it holds personal data; add --payload to see it)"
        )


# -- send-test-event -----------------------------------------------------------

SEND_TIMEOUT_SECONDS = 10


@click.command("send-test-event")
@with_appcontext
@click.argument("kind", type=click.Choice(sample_events.KINDS), metavar="KIND")
@click.option(
    "--url",
    show_default="http://127.0.0.1:PORT/webhooks/instagram",
    help="Where to post it.",
)
@click.option(
    "--sender",
    default=sample_events.TEST_SENDER_ID,
    show_default=True,
    help="Sender id of the events; an account of yours gets a real reply.",
)
@click.option(
    "--text",
    default=sample_events.SAMPLE_TEXT,
    help="Text of the message, edit or comment, e.g. to try a reply rule.",
)
def send_test_event(kind, url, sender, text):
    """Post a signed, Meta-shaped delivery of KIND and print the answer.

    KIND is one of: message, echo, reaction, read, comment, mention, edit,
    deleted, postback, batch.

    The delivery is built like Meta's (IG_ACCOUNT_ID as entry and recipient,
    current timestamps, fresh ids, Meta's escaping) and signed with the first
    IG_APP_SECRET. A batch holds a message, a reaction and a read in one
    entry, a comment and a mention in a second. The worker handles the events
    as real ones: a message from the made-up sender gets a reply the Graph API
    refuses, and ends in dead-letter.
    """
    settings = _settings()
    if not settings.account_id:
        _fail("IG_ACCOUNT_ID is not set; the delivery needs the account's id")
    url = url or f"http://127.0.0.1:{settings.port}/webhooks/instagram"
    raw = sample_events.serialise(
        sample_events.build(kind, settings.account_id, sender, text=text)
    )
    keys = [(e.key, e.kind) for e in parse_delivery(raw, settings.account_id)]

    try:
        response = requests.post(
            url,
            data=raw,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(raw, settings.app_secrets[0]),
            },
            timeout=SEND_TIMEOUT_SECONDS,
        )
    except requests.RequestException as exc:
        _fail(f"cannot post to {url}: {type(exc).__name__}")
    answer = _short(response.text, 200) or "(empty body)"
    if not 200 <= response.status_code < 300:
        _fail(f"{url} answered HTTP {response.status_code}: {answer}")

    click.echo(
        f"posted {kind} ({len(keys)} events from sender {sender}, {len(raw)} bytes)"
        f" to {url}"
    )
    click.echo(f"answer: HTTP {response.status_code} {answer}")
    click.echo(table(["KEY", "KIND"], keys))


# -- purge ---------------------------------------------------------------------


@click.command("purge")
@with_appcontext
@click.option(
    "--older-than",
    "days",
    type=click.IntRange(1, 36500),
    required=True,
    metavar="DAYS",
    help="Delete what is older than this many days.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
def purge(days, dry_run):
    """Delete old events, their audit rows and closed dead letters.

    Payloads are personal data: keep them no longer than needed. An event
    stays while it is unfinished or its dead letter is open or replayed (or
    was closed less than DAYS days ago); its history stays with it.
    """
    try:
        counts = _store().purge(
            days * 86400,
            cooldown_seconds=_settings().reply_cooldown_seconds,
            dry_run=dry_run,
        )
    except (sqlite3.Error, StorageError) as exc:
        _fail(f"nothing deleted: {exc}")
    click.echo(
        table(
            ["TABLE", "WOULD DELETE" if dry_run else "DELETED"],
            [
                [name, counts[name]]
                for name in (
                    "webhook_events",
                    "audit_log",
                    "dead_letter",
                    "reply_cooldowns",
                )
            ],
        )
    )
    click.echo(
        f"kept, although older than {days} days:\n"
        f"  {counts['kept_dead_letter']} events whose dead letter is open,"
        " replayed or closed recently\n"
        f"  {counts['kept_unfinished']} events not finished yet"
    )
    if dry_run:
        click.echo("(dry run: nothing deleted)")
