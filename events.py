"""Split a Meta delivery into events, classify each one and give it a stable key."""

import hashlib
import json
import time
from dataclasses import dataclass

# Kinds the worker may answer; everything else ends "ignored".
MESSAGE = "message"
COMMENT = "comment"

# Keys of a messaging event that name its kind, in the order they are tested.
_MESSAGING_KINDS = (
    ("message_edit", "edit"),
    ("reaction", "reaction"),
    ("read", "read"),
    ("postback", "postback"),
    ("referral", "referral"),
)
_CHANGE_KINDS = {"comments": COMMENT, "live_comments": COMMENT, "mentions": "mention"}
# Encoders made once: json.dumps with options builds a new one on every call.
# Stored payloads are ASCII and compact; keys also sort, so they never change.
_COMPACT = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=True, separators=(",", ":"))


class UnparseableDelivery(ValueError):
    """The body is signed but is not a delivery we can read at all."""


@dataclass(frozen=True)
class Event:
    """One event of a delivery, ready to store."""

    key: str
    kind: str
    account_id: str
    occurred_at: float | None
    payload: str

    def data(self):
        """Return the stored payload as a dict."""
        return json.loads(self.payload)


def parse_delivery(raw_body, account_id=""):
    """Return the events of a delivery body, in the order they came.

    Raise UnparseableDelivery when the body is not a JSON object with an
    ``entry`` list. Entries and events of unknown shapes are kept as events
    of kind "unknown", never dropped.
    """
    try:
        body = json.loads(raw_body)
    except (ValueError, RecursionError) as exc:
        raise UnparseableDelivery(f"body is not JSON: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise UnparseableDelivery(f"expected a JSON object, got {type(body).__name__}")
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise UnparseableDelivery("expected an 'entry' list")

    events = []
    try:
        for entry in entries:
            events.extend(_entry_events(entry, body.get("object"), account_id))
    except RecursionError:
        raise UnparseableDelivery("an event is nested too deeply to store") from None
    return events


def _entry_events(entry, object_type, account_id):
    if not isinstance(entry, dict):
        yield _event("entry", entry, {}, object_type, account_id)
        return
    known = False
    for channel in ("messaging", "standby", "changes"):
        items = entry.get(channel)
        if items is None:
            continue
        known = True
        for item in items if isinstance(items, list) else [items]:
            yield _event(channel, item, entry, object_type, account_id)
    if not known:
        # An entry without any list we know: keep it whole.
        yield _event("entry", entry, entry, object_type, account_id)


def _event(channel, item, entry, object_type, account_id):
    entry_id = _as_id(entry.get("id")) if isinstance(entry, dict) else ""
    kind = classify(channel, item, account_id)
    stored = {
        "object": object_type,
        "entry_id": entry_id,
        "entry_time": entry.get("time") if isinstance(entry, dict) else None,
        "channel": channel,
        "event": item,
    }
    return Event(
        key=event_key(channel, item, entry_id),
        kind=kind,
        account_id=entry_id,
        occurred_at=_occurred_at(item, entry),
        payload=_COMPACT.encode(stored),
    )


def classify(channel, item, account_id=""):
    """Name the kind of one event: message, echo, comment, read, unknown..."""
    if not isinstance(item, dict):
        return "unknown"
    if channel == "standby":
        return "standby"
    if channel == "changes":
        field = item.get("field")
        return (
            _CHANGE_KINDS.get(field, "change") if isinstance(field, str) else "change"
        )
    if channel != "messaging":
        return "unknown"

    message = item.get("message")
    if isinstance(message, dict):
        sender = item.get("sender")
        sender = _as_id(sender.get("id")) if isinstance(sender, dict) else ""
        if message.get("is_echo") or (account_id and sender == account_id):
            return "echo"
        if message.get("is_deleted"):
            return "deleted"
        if message.get("is_unsupported"):
            return "unsupported"
        return MESSAGE
    for field, kind in _MESSAGING_KINDS:
        if field in item:
            return kind
    return "unknown"


def event_key(channel, item, entry_id=""):
    """Return the key that identifies this event across redeliveries.

    A plain message is identified by its ``mid``. Reactions, reads, edits and
    deletions carry the ``mid`` of an earlier message, so they (and every
    other shape) are identified by their whole content instead, which Meta
    repeats verbatim when it redelivers, whatever batch it is in.
    """
    identity = None
    if isinstance(item, dict):
        message = item.get("message")
        value = item.get("value")
        if (
            channel == "messaging"
            and isinstance(message, dict)
            and isinstance(message.get("mid"), str)
            and not message.get("is_deleted")
        ):
            identity = ["mid", message["mid"]]
        elif (
            channel == "changes" and isinstance(value, dict) and _as_id(value.get("id"))
        ):
            # comments and live_comments name the same comment: one key for both.
            field = item.get("field")
            kind = _CHANGE_KINDS.get(field, field) if isinstance(field, str) else field
            identity = ["change", kind, _as_id(value["id"])]
    if identity is None:
        identity = ["content", channel, entry_id, item]
    canonical = _CANONICAL.encode(identity)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def sender_id(event_data):
    """Return the sender's id of a stored messaging event, or '' when absent."""
    event = event_data.get("event")
    sender = event.get("sender") if isinstance(event, dict) else None
    return _as_id(sender.get("id")) if isinstance(sender, dict) else ""


def message_text(event_data):
    """Return the text of a stored message event, or '' when it has none."""
    event = event_data.get("event")
    message = event.get("message") if isinstance(event, dict) else None
    text = message.get("text") if isinstance(message, dict) else None
    return text if isinstance(text, str) else ""


def comment_fields(event_data):
    """Return (comment id, author's id, text) of a stored comment event."""
    event = event_data.get("event")
    value = event.get("value") if isinstance(event, dict) else None
    if not isinstance(value, dict):
        return "", "", ""
    author = value.get("from")
    text = value.get("text")
    return (
        _as_id(value.get("id")),
        _as_id(author.get("id")) if isinstance(author, dict) else "",
        text if isinstance(text, str) else "",
    )


def _occurred_at(item, entry):
    """Return the event's own time in epoch seconds, or None when unknown."""
    stamp = item.get("timestamp") if isinstance(item, dict) else None
    if stamp is None and isinstance(entry, dict):
        stamp = entry.get("time")
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
        return None
    if not -1e15 < stamp < 1e15:  # also rules out NaN and infinities
        return None
    # Meta sends milliseconds for messaging and seconds for some changes.
    seconds = stamp / 1000 if stamp > 100_000_000_000 else float(stamp)
    return seconds if 0 < seconds < time.time() + 10 * 365 * 86400 else None


def _as_id(value):
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # Lone surrogates (from \u escapes) cannot be stored as text: escape them.
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return ""
