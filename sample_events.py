"""Meta-shaped sample deliveries, signed like Meta's, for trying a deployment.

``flask send-test-event`` posts them. Every event comes from TEST_SENDER_ID
(unless told otherwise) with current timestamps and fresh ids, so each one
is new to the service and easy to tell apart from real traffic.
"""

import json
import secrets
import time

#: The made-up sender of every sample event; no real account has this id.
TEST_SENDER_ID = "9990000000000001"
#: Text of the sample message and comment: accents, an emoji and a URL, so the
#: signature is checked over Meta's escaped form (\uXXXX and \/).
SAMPLE_TEXT = "Test from send-test-event: caf\u00e9 \u2615 https://example.com/a/b"
#: The kinds send-test-event builds; a batch holds several in two entries.
KINDS = (
    "message",
    "echo",
    "reaction",
    "read",
    "comment",
    "mention",
    "edit",
    "deleted",
    "postback",
    "batch",
)
#: What a batch holds: its first entry's messaging events, then its second's changes.
BATCH_MESSAGING = ("message", "reaction", "read")
BATCH_CHANGES = ("comment", "mention")


def build(kind, account_id, sender=TEST_SENDER_ID, now=None, text=SAMPLE_TEXT):
    """Return a delivery (a dict) holding one event of this kind, or a batch."""
    if kind not in KINDS:
        raise ValueError(f"expected one of {', '.join(KINDS)}, got {kind!r}")
    now = time.time() if now is None else now
    if kind == "batch":
        return _delivery(
            _entry(
                account_id,
                now,
                messaging=[
                    _messaging(k, account_id, sender, now, text)
                    for k in BATCH_MESSAGING
                ],
            ),
            _entry(
                account_id,
                now,
                changes=[_change(k, sender, text) for k in BATCH_CHANGES],
            ),
        )
    if kind in BATCH_CHANGES:
        return _delivery(_entry(account_id, now, changes=[_change(kind, sender, text)]))
    return _delivery(
        _entry(
            account_id, now, messaging=[_messaging(kind, account_id, sender, now, text)]
        )
    )


def kinds_of(kind):
    """Return the event kinds the service should store for build(kind)."""
    return [*BATCH_MESSAGING, *BATCH_CHANGES] if kind == "batch" else [kind]


def serialise(delivery):
    """Return the body as Meta sends it: compact, non-ASCII as \\uXXXX, '/' as '\\/'.

    '/' occurs only inside JSON strings, so escaping every one keeps the JSON
    valid and its meaning unchanged.
    """
    text = json.dumps(delivery, ensure_ascii=True, separators=(",", ":"))
    return text.replace("/", "\\/").encode("ascii")


def _delivery(*entries):
    return {"object": "instagram", "entry": list(entries)}


def _entry(account_id, now, messaging=(), changes=()):
    # Meta gives entry.time in milliseconds for messaging, in seconds for changes.
    entry = {"id": account_id, "time": int(now * 1000) if messaging else int(now)}
    if messaging:
        entry["messaging"] = list(messaging)
    if changes:
        entry["changes"] = list(changes)
    return entry


def _messaging(kind, account_id, sender, now, text):
    event = {
        "sender": {"id": sender},
        "recipient": {"id": account_id},
        "timestamp": int(now * 1000),
    }
    earlier = _mid()  # the message a reaction, read, edit or deletion is about
    if kind == "message":
        event["message"] = {"mid": _mid(), "text": text}
    elif kind == "echo":
        event["sender"], event["recipient"] = {"id": account_id}, {"id": sender}
        event["message"] = {"mid": _mid(), "text": text, "is_echo": True}
    elif kind == "reaction":
        event["reaction"] = {
            "mid": earlier,
            "action": "react",
            "reaction": "love",
            "emoji": "\u2764\ufe0f",
        }
    elif kind == "read":
        event["read"] = {"mid": earlier}
    elif kind == "edit":
        event["message_edit"] = {"mid": earlier, "text": text, "num_edit": 1}
    elif kind == "deleted":
        event["message"] = {"mid": earlier, "is_deleted": True}
    elif kind == "postback":
        event["postback"] = {"mid": _mid(), "title": "Start", "payload": "TEST_START"}
    return event


def _change(kind, sender, text):
    if kind == "comment":
        return {
            "field": "comments",
            "value": {
                "id": _numeric_id("1790"),
                "text": text,
                "from": {"id": sender, "username": "send_test_event"},
                "media": {"id": _numeric_id("1800"), "media_product_type": "FEED"},
            },
        }
    return {
        "field": "mentions",
        "value": {"media_id": _numeric_id("1800"), "comment_id": _numeric_id("1790")},
    }


def _mid():
    """Return a fresh message id shaped like Meta's."""
    return "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQx" + secrets.token_hex(12)


def _numeric_id(prefix):
    return prefix + f"{secrets.randbelow(10**13):013d}"
