"""Hostile and odd input gets a clear status; nothing is stored that should not be."""

import hashlib
import hmac

import payloads
import pytest
from conftest import rows

URL = "/webhooks/instagram"


def valid_body():
    return payloads.body(payloads.delivery(payloads.text_message(payloads.new_id())))


def sha256_hex(raw, secret=payloads.APP_SECRET):
    return hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


SIGNATURE_CASES = {
    "missing header": lambda raw: [],
    "empty value": lambda raw: [("X-Hub-Signature-256", "")],
    "prefix only": lambda raw: [("X-Hub-Signature-256", "sha256=")],
    "no prefix": lambda raw: [("X-Hub-Signature-256", sha256_hex(raw))],
    "other prefix": lambda raw: [("X-Hub-Signature-256", "sha1=" + sha256_hex(raw))],
    "non-hex": lambda raw: [("X-Hub-Signature-256", "sha256=" + "g" * 64)],
    "too short": lambda raw: [
        ("X-Hub-Signature-256", "sha256=" + sha256_hex(raw)[:63])
    ],
    "too long": lambda raw: [
        ("X-Hub-Signature-256", "sha256=" + sha256_hex(raw) + "0")
    ],
    "upper-case hex": lambda raw: [
        ("X-Hub-Signature-256", "sha256=" + sha256_hex(raw).upper())
    ],
    "several headers": lambda raw: [
        ("X-Hub-Signature-256", "sha256=" + sha256_hex(raw)),
        ("X-Hub-Signature-256", "sha256=" + sha256_hex(raw)),
    ],
    "legacy sha1 header only": lambda raw: [
        (
            "X-Hub-Signature",
            "sha1="
            + hmac.new(payloads.APP_SECRET.encode(), raw, hashlib.sha1).hexdigest(),
        )
    ],
    "signed with the verify token": lambda raw: [
        ("X-Hub-Signature-256", "sha256=" + sha256_hex(raw, payloads.VERIFY_TOKEN))
    ],
    "whitespace around": lambda raw: [
        ("X-Hub-Signature-256", " sha256=" + sha256_hex(raw) + " ")
    ],
}


@pytest.mark.parametrize("case", SIGNATURE_CASES, ids=list(SIGNATURE_CASES))
def test_bad_signature_is_refused_and_nothing_is_stored(client, store, queue, case):
    raw = valid_body()
    headers = [("Content-Type", "application/json"), *SIGNATURE_CASES[case](raw)]

    response = client.post(URL, data=raw, headers=headers)

    assert response.status_code == 401
    assert response.is_json and response.get_json()["error"]
    assert rows(store, "webhook_events") == []
    assert queue.count == 0


def test_a_repeated_signature_header_is_named_in_the_answer(client, store):
    # Servers join repeated headers with commas: even two good copies are refused.
    raw = valid_body()
    good = payloads.signed_headers(raw)["X-Hub-Signature-256"]
    headers = [("X-Hub-Signature-256", good), ("X-Hub-Signature-256", good)]

    response = client.post(URL, data=raw, headers=headers)

    assert response.status_code == 401
    assert "more than one X-Hub-Signature-256" in response.get_json()["error"]
    assert rows(store, "webhook_events") == []


def test_a_body_changed_after_signing_is_refused(client, store):
    raw = valid_body()
    headers = payloads.signed_headers(raw)

    response = client.post(URL, data=raw.replace(b"hello", b"hellO"), headers=headers)

    assert response.status_code == 401
    assert rows(store, "webhook_events") == []


def test_a_400_kb_delivery_is_accepted(post, store):
    messages = [
        payloads.text_message(payloads.new_id(), "x" * 380) for _ in range(1000)
    ]
    raw = payloads.body(payloads.delivery(*messages))
    assert 400_000 < len(raw) < 600_000

    assert post(raw).status_code == 200
    assert len(rows(store, "webhook_events")) == 1000


def test_an_oversized_body_is_refused_before_it_is_read(client, store, app):
    limit = app.extensions["settings"].max_body_bytes
    raw = b"{" + b" " * limit + b"}"

    response = client.post(URL, data=raw, headers=payloads.signed_headers(raw))

    assert response.status_code == 413
    assert rows(store, "webhook_events") == []


@pytest.mark.parametrize(
    "challenge",
    ["-1", "0x1F", "1e9", "  padded  ", "é✓", "<script>alert(1)</script>", "a&b=c"],
)
def test_any_challenge_is_echoed_exactly_and_never_sniffed(client, challenge):
    response = client.get(
        URL,
        query_string={
            "hub.mode": "subscribe",
            "hub.verify_token": payloads.VERIFY_TOKEN,
            "hub.challenge": challenge,
        },
    )

    assert response.status_code == 200
    assert response.get_data(as_text=True) == challenge
    assert response.mimetype == "text/plain"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/nope"),
        ("POST", "/webhooks/other"),
        ("PUT", URL),
        ("OPTIONS", "/healthz"),
    ],
)
def test_unknown_routes_and_methods_answer_json_without_internals(client, method, path):
    response = client.open(path, method=method)

    assert response.status_code in (404, 405, 200)
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "werkzeug" not in text.lower()


def test_an_unexpected_error_answers_500_without_internals(client, monkeypatch):
    import webhook_app

    def explode(*args):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(webhook_app, "parse_delivery", explode)
    raw = valid_body()

    response = client.post(URL, data=raw, headers=payloads.signed_headers(raw))

    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error"}


def test_a_batch_with_odd_events_stores_every_event_once(post, store, queue, relay):
    good = payloads.text_message(payloads.new_id())
    odd = [
        {"sender": {"id": 12345}, "recipient": {"id": None}, "timestamp": "yesterday"},
        {"message": {"mid": 7, "text": ["not", "text"]}},
        {"sender": {}, "message": {"text": "\u200b\u202e\u0000"}},
        {"deep": [[[[[[[[[[{"x": 1}]]]]]]]]]]},
        "not an object",
        {"sender": {"id": "9" * 5000}, "message": {"mid": "m" * 10_000}},
    ]
    delivery = {
        "object": "something_new",
        "unknown_top": {"a": 1},
        "entry": [payloads.entry([good, *odd]), 42, {"id": "1", "unknown": True}],
    }

    response = post(delivery)

    assert response.status_code == 200
    assert len(rows(store, "webhook_events")) == len(odd) + 3
    assert relay() == len(odd) + 3
    assert queue.count == len(odd) + 3


def test_a_flood_of_forged_deliveries_writes_one_audit_row_a_second(client, store):
    for _ in range(50):
        client.post(
            URL, data=b"{}", headers={"X-Hub-Signature-256": "sha256=" + "0" * 64}
        )

    rejected = rows(store, "audit_log", "action = 'rejected_delivery'")
    assert len(rejected) == 1


def test_rejections_in_between_are_counted_into_the_next_row(store):
    from webhook_app import RejectionAudit

    now = [100.0]
    audit = RejectionAudit(interval=1.0, clock=lambda: now[0])
    for _ in range(5):
        audit.record(store, "signature does not match the body")
    now[0] += 1.5
    audit.record(store, "missing X-Hub-Signature-256 header")

    details = [r["detail"] for r in rows(store, "audit_log")]
    assert details == [
        "signature does not match the body",
        "missing X-Hub-Signature-256 header (and 4 more rejected since the last row)",
    ]
