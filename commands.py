"""Operator commands: ``flask --app webhook_app dead-letter list|show|replay|discard``.

Errors end the command with one line and a non-zero status. Payloads are
personal data: ``show`` prints one only when asked with --payload.
"""

import re
import sys
from datetime import UTC, datetime

import click
from flask import current_app
from flask.cli import AppGroup
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry

import queueing
from storage import parse_iso

dead_letter = AppGroup(
    "dead-letter", help="Inspect, replay and discard events that finally failed."
)

STATUSES = ("open", "replayed", "resolved", "discarded", "all")
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


@dead_letter.command("list")
@click.option("--reason", help="Only this reason, e.g. token_invalid.")
@click.option(
    "--status",
    type=click.Choice(STATUSES),
    default="open",
    show_default=True,
    help="Only dead letters in this state.",
)
@click.option("--older-than", type=Age(), help="Only those older than this, e.g. 2h.")
@click.option("--newer-than", type=Age(), help="Only those newer than this, e.g. 7d.")
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
@click.argument("dead_id", type=int)
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
@click.argument("ids", nargs=-1, type=int)
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
        click.echo(f"{row['id']}: replayed as job {job_id}")
        replayed += 1
    click.echo(f"{replayed} replayed, {refused} refused")
    if refused and not replayed:
        sys.exit(1)


@dead_letter.command("discard")
@click.argument("ids", nargs=-1, type=int, required=True)
def discard_command(ids):
    """Mark dead letters discarded; they stay in the table for the audit."""
    store = _store()
    queue = queueing.get_queue(_settings())
    for row in _select(ids, None, False):
        if not store.discard(row["event_key"]):
            click.echo(f"{row['id']}: not discarded: it is {row['status']}, not open")
            continue
        _drop_failed_job(queue, row["job_id"])
        click.echo(f"{row['id']}: discarded")


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
