"""Meta-shaped deliveries for tests, and a helper that signs them like Meta does."""

import itertools
import json
import time
import urllib.error
import urllib.request

import security

ACCOUNT_ID = "17841400000000042"
APP_SECRET = "test-app-secret-3b1f"
VERIFY_TOKEN = "test-verify-token-77aa"
ACCESS_TOKEN = "IGAAtestTOKENneverLogged0123456789abcdef"

_counter = itertools.count(1)


def now_ms():
    return int(time.time() * 1000)


def new_id(prefix="9100"):
    """Return a fresh numeric id, for senders and comments."""
    return f"{prefix}{int(time.time() * 1000) % 10**9:09d}{next(_counter):05d}"


def new_mid():
    return f"aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQx{next(_counter):08d}"


def messaging(sender, recipient=ACCOUNT_ID, timestamp=None, **fields):
    """One messaging event: sender, recipient, timestamp and the given fields."""
    return {
        "sender": {"id": sender},
        "recipient": {"id": recipient},
        "timestamp": now_ms() if timestamp is None else timestamp,
        **fields,
    }


def text_message(sender, text="hello there", mid=None, timestamp=None):
    return messaging(
        sender, timestamp=timestamp, message={"mid": mid or new_mid(), "text": text}
    )


def attachment_message(sender, kind="image", mid=None):
    attachment = {"type": kind, "payload": {"url": "https://lookaside.example/x.jpg"}}
    return messaging(
        sender, message={"mid": mid or new_mid(), "attachments": [attachment]}
    )


def echo(user, text="our own reply", mid=None):
    event = messaging(
        ACCOUNT_ID, message={"mid": mid or new_mid(), "text": text, "is_echo": True}
    )
    event["recipient"] = {"id": user}
    return event


def reaction(sender, mid, emoji="\u2764\ufe0f", action="react"):
    return messaging(
        sender,
        reaction={"mid": mid, "action": action, "reaction": "love", "emoji": emoji},
    )


def read(sender, mid):
    return messaging(sender, read={"mid": mid})


def deleted(sender, mid):
    return messaging(sender, message={"mid": mid, "is_deleted": True})


def edit(sender, mid, text="edited text", num_edit=1):
    return messaging(
        sender, message_edit={"mid": mid, "text": text, "num_edit": num_edit}
    )


def postback(sender, payload="START"):
    return messaging(
        sender, postback={"mid": new_mid(), "title": "Start", "payload": payload}
    )


def comment_change(
    comment_id=None, text="price please", user_id=None, username="a_user"
):
    return {
        "field": "comments",
        "value": {
            "id": comment_id or new_id("1790"),
            "text": text,
            "from": {"id": user_id or new_id(), "username": username},
            "media": {"id": "18000000000000001", "media_product_type": "FEED"},
        },
    }


def mention_change(comment_id=None):
    return {
        "field": "mentions",
        "value": {
            "media_id": "18000000000000002",
            "comment_id": comment_id or new_id(),
        },
    }


def entry(
    messaging_events=(), changes=(), standby=(), account_id=ACCOUNT_ID, time_ms=None
):
    item = {"id": account_id, "time": now_ms() if time_ms is None else time_ms}
    if messaging_events:
        item["messaging"] = list(messaging_events)
    if changes:
        item["changes"] = list(changes)
    if standby:
        item["standby"] = list(standby)
    return item


def delivery(*events, changes=(), standby=()):
    """A delivery of one entry holding the given messaging events and changes."""
    return {"object": "instagram", "entry": [entry(events, changes, standby)]}


def body(obj):
    """Serialise like Meta: compact, non-ASCII escaped as \\uXXXX."""
    return json.dumps(obj, separators=(",", ":")).encode()


def meta_escaped(obj):
    """Serialise like Meta's wire format, which also escapes '/' as '\\/'."""
    return body(obj).replace(b"/", b"\\/")


def signed_headers(raw, secret=APP_SECRET, **overrides):
    """Headers of a correctly signed delivery; keyword overrides replace or drop any."""
    headers = {
        "Content-Type": "application/json",
        security.SIGNATURE_HEADER: security.sign(raw, secret),
    }
    for name, value in overrides.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def unsupported(sender, mid=None):
    return messaging(sender, message={"mid": mid or new_mid(), "is_unsupported": True})


def referral(sender, ref="summer-ad"):
    return messaging(
        sender, referral={"ref": ref, "source": "ADS", "type": "OPEN_THREAD"}
    )


def graph_error(code, subcode=None, message="An error occurred", **fields):
    """A Graph API error body: {"error": {...}} with the given code and subcode."""
    error = {"message": message, "type": "OAuthException", "code": code, **fields}
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


def post_signed(base_url, raw, timeout=10):
    """POST a correctly signed delivery to a running service; return the status."""
    request = urllib.request.Request(
        base_url + "/webhooks/instagram",
        data=raw,
        headers=signed_headers(raw),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
