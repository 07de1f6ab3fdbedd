"""Property tests: arbitrary and mutated deliveries through the real app and worker.

For any signed body: no 5xx, every event the body holds is stored exactly
once, and the worker ends every one of them without an unexpected error.
"""

import json

import payloads
import pytest
from conftest import GRAPH_BASE, rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import events

SEND_URL = f"{GRAPH_BASE}/v24.0/{payloads.ACCOUNT_ID}/messages"

# Any text, lone surrogates, NUL, zero-width and right-to-left marks included.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    any_text,
    st.sampled_from(["\u200b", "\u202e", "\x00", "\ud800", "9" * 40]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(any_text, st.sampled_from(["id", "mid", "text"])),
            children,
            max_size=4,
        ),
    ),
    max_leaves=12,
)
odd_ids = st.sampled_from(["", "\ud800", "1\x00", "\u202e42", "9" * 400, "-1"])
ids = st.one_of(st.integers(0, 10**20).map(str), odd_ids, any_text, json_values)


def maybe(strategy):
    """The real shape most of the time, anything at all sometimes."""
    return st.one_of(strategy, strategy, strategy, json_values)


messages = st.fixed_dictionaries(
    {"mid": maybe(st.text(min_size=1, max_size=20)), "text": maybe(any_text)},
    optional={
        "is_echo": maybe(st.booleans()),
        "is_deleted": maybe(st.booleans()),
        "attachments": maybe(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "type": maybe(
                            st.sampled_from(
                                ["image", "ig_reel", "story_mention", "new"]
                            )
                        ),
                        "payload": json_values,
                    }
                ),
                max_size=2,
            )
        ),
    },
)
messaging_events = st.fixed_dictionaries(
    {
        "sender": maybe(st.fixed_dictionaries({"id": ids})),
        "recipient": maybe(st.fixed_dictionaries({"id": ids})),
        "timestamp": maybe(st.integers(0, 2 * payloads.now_ms())),
    },
    optional={
        "message": maybe(messages),
        "reaction": json_values,
        "read": json_values,
        "message_edit": json_values,
        "postback": json_values,
        "referral": json_values,
        "unknown_kind": json_values,
    },
)
changes = st.fixed_dictionaries(
    {
        "field": maybe(st.sampled_from(["comments", "mentions", "story_insights"])),
        "value": maybe(st.fixed_dictionaries({"id": ids, "text": maybe(any_text)})),
    }
)
entries = st.fixed_dictionaries(
    {
        "id": maybe(st.one_of(st.just(payloads.ACCOUNT_ID), odd_ids)),
        "time": maybe(st.integers(0, 2**45)),
    },
    optional={
        "messaging": maybe(st.lists(maybe(messaging_events), max_size=4)),
        "standby": maybe(st.lists(messaging_events, max_size=2)),
        "changes": maybe(st.lists(maybe(changes), max_size=3)),
    },
)
shaped = st.fixed_dictionaries(
    {
        "object": maybe(st.just("instagram")),
        "entry": st.lists(maybe(entries), max_size=4),
    }
)
deliveries = st.one_of(shaped, shaped, shaped, json_values)

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def clean(store, queue):
    """Empty the database and Redis between examples of one test."""

    def clean():
        for table in ("webhook_events", "dead_letter", "audit_log", "reply_cooldowns"):
            store.db.execute(f"DELETE FROM {table}")
        for table in ("inbox_events", "inbox_audit"):
            store.inbox.db.execute(f"DELETE FROM {table}")
        store.db.execute("DELETE FROM inbox_moved")  # inbox ids start again
        queue.connection.flushdb()

    return clean


@SETTINGS
@given(delivery=deliveries)
def test_any_signed_delivery_is_stored_once_and_worked_without_a_crash(
    delivery, post, store, work, requests_mock, clean
):
    clean()
    requests_mock.post(SEND_URL, json={"message_id": "m_prop"})
    raw = json.dumps(delivery).encode()  # ASCII: surrogates travel as \u escapes

    first = post(raw)
    again = post(raw)

    assert first.status_code == 200 and again.status_code == 200
    try:
        expected = {e.key for e in events.parse_delivery(raw, payloads.ACCOUNT_ID)}
    except events.UnparseableDelivery:
        expected = None
    stored = rows(store, "webhook_events")
    if expected is None:
        assert len(stored) == 1 and stored[0]["status"] == "dead"
    else:
        assert sorted(r["event_key"] for r in stored) == sorted(expected)

    work()

    statuses = {
        r["status"] for r in store.db.query("SELECT status FROM webhook_events")
    }
    assert statuses <= {"done", "ignored", "dead"}
    reasons = {r["reason"] for r in store.db.query("SELECT reason FROM dead_letter")}
    assert reasons <= {"unparseable", "outside_window"}, reasons


@SETTINGS
@given(
    noise=json_values, where=st.sampled_from(["message", "sender", "entry", "extra"])
)
def test_a_mutated_real_message_keeps_its_batch_mates_answered(
    noise, where, post, store, work, requests_mock, clean
):
    clean()
    requests_mock.post(SEND_URL, json={"message_id": "m_prop"})
    good = payloads.text_message(payloads.new_id())
    odd = payloads.text_message(payloads.new_id())
    if where == "message":
        odd["message"] = noise
    elif where == "sender":
        odd["sender"] = noise
    elif where == "extra":
        odd["surprise"] = noise
    delivery = payloads.delivery(good, odd)
    if where == "entry":
        delivery["entry"].append(noise)

    assert post(delivery).status_code == 200
    work()

    [good_row] = [
        r
        for r in store.db.query("SELECT * FROM webhook_events")
        if json.loads(r["payload"])["event"] == good
    ]
    assert good_row["status"] == "done"
