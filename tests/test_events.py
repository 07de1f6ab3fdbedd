"""A delivery splits into classified events, each with a key stable across batches."""

import json

import pytest

import events
from tests import payloads
from tests.payloads import ACCOUNT_ID

USER = "9100000000077"
OTHER_USER = "9100000000088"


def parse(obj, account_id=ACCOUNT_ID):
    return events.parse_delivery(payloads.body(obj), account_id=account_id)


def only_event(obj, account_id=ACCOUNT_ID):
    parsed = parse(obj, account_id)
    assert len(parsed) == 1
    return parsed[0]


def raw_entry(**fields):
    """One entry exactly as given, without the builder's defaults."""
    return {"object": "instagram", "entry": [{"id": ACCOUNT_ID, **fields}]}


# Kinds


@pytest.mark.parametrize(
    "event, kind",
    [
        (payloads.text_message(USER), "message"),
        (payloads.attachment_message(USER, "image"), "message"),
        (payloads.attachment_message(USER, "ig_reel"), "message"),
        (payloads.attachment_message(USER, "a_type_not_invented_yet"), "message"),
        (payloads.echo(USER), "echo"),
        (payloads.deleted(USER, payloads.new_mid()), "deleted"),
        (payloads.unsupported(USER), "unsupported"),
        (payloads.edit(USER, payloads.new_mid()), "edit"),
        (payloads.reaction(USER, payloads.new_mid()), "reaction"),
        (payloads.reaction(USER, payloads.new_mid(), action="unreact"), "reaction"),
        (payloads.read(USER, payloads.new_mid()), "read"),
        (payloads.postback(USER), "postback"),
        (payloads.referral(USER), "referral"),
        (payloads.messaging(USER, something_new={"x": 1}), "unknown"),
        (payloads.messaging(USER), "unknown"),
    ],
    ids=[
        "text",
        "image",
        "reel",
        "unknown-attachment-type",
        "echo",
        "deleted",
        "unsupported",
        "edit",
        "reaction",
        "unreaction",
        "read",
        "postback",
        "referral",
        "unknown-field",
        "no-field",
    ],
)
def test_a_messaging_event_is_classified_by_its_shape(event, kind):
    parsed = only_event(payloads.delivery(event))

    assert parsed.kind == kind
    assert events.classify("messaging", event, ACCOUNT_ID) == kind


def test_a_message_from_the_account_itself_is_an_echo_without_is_echo():
    own = payloads.text_message(ACCOUNT_ID)

    assert only_event(payloads.delivery(own)).kind == "echo"


def test_a_message_from_the_account_is_a_message_when_the_account_is_unknown():
    own = payloads.text_message(ACCOUNT_ID)

    assert only_event(payloads.delivery(own), account_id="").kind == "message"


def test_a_message_from_a_user_is_not_an_echo():
    assert only_event(payloads.delivery(payloads.text_message(USER))).kind == (
        "message"
    )


def test_a_standby_event_is_classified_standby_whatever_its_shape():
    delivery = payloads.delivery(
        standby=[payloads.text_message(USER), payloads.read(USER, "m")]
    )

    assert [event.kind for event in parse(delivery)] == ["standby", "standby"]


@pytest.mark.parametrize(
    "change, kind",
    [
        (payloads.comment_change(), "comment"),
        ({**payloads.comment_change(), "field": "live_comments"}, "comment"),
        (payloads.mention_change(), "mention"),
        ({"field": "story_insights", "value": {"media_id": "1", "reach": 3}}, "change"),
        ({"field": "a_field_not_invented_yet", "value": {}}, "change"),
    ],
    ids=["comments", "live-comments", "mentions", "story-insights", "new-field"],
)
def test_a_change_is_classified_by_its_field(change, kind):
    assert only_event(payloads.delivery(changes=[change])).kind == kind


def test_an_entry_with_no_known_list_is_kept_whole_as_one_unknown_event():
    delivery = raw_entry(time=1700000000, something_new=[{"a": 1}, {"b": 2}])

    event = only_event(delivery)

    assert event.kind == "unknown"
    assert event.data()["event"]["something_new"] == [{"a": 1}, {"b": 2}]


@pytest.mark.parametrize(
    "delivery, count",
    [
        (raw_entry(messaging=["text", 5, None, [1, 2], True]), 5),
        (raw_entry(changes=["text", None]), 2),
        (raw_entry(standby=[7]), 1),
        (raw_entry(messaging="not a list"), 1),
        (raw_entry(messaging={"message": {"mid": "m", "text": "a dict"}}), 1),
        ({"object": "instagram", "entry": ["text", 5, None, [], True]}, 5),
        (raw_entry(messaging=[{"sender": "9100", "message": "not a dict"}]), 1),
        (raw_entry(messaging=[{"sender": {"id": ["x"]}, "message": {"mid": 5}}]), 1),
        (raw_entry(changes=[{"field": "comments", "value": "not a dict"}]), 1),
        ({"object": "instagram", "entry": [{"id": {"odd": 1}, "time": "soon"}]}, 1),
    ],
    ids=[
        "messaging-scalars",
        "changes-scalars",
        "standby-scalar",
        "messaging-string",
        "messaging-dict",
        "entries-scalars",
        "message-string",
        "odd-ids",
        "change-value-string",
        "entry-odd-id-and-time",
    ],
)
def test_odd_shapes_never_crash_and_keep_every_item(delivery, count):
    parsed = parse(delivery)

    assert len(parsed) == count
    for event in parsed:
        assert len(event.key) == 32
        assert isinstance(event.data(), dict)


@pytest.mark.parametrize("field", [["comments"], {"name": "comments"}])
def test_a_change_with_an_unhashable_field_is_kept_as_a_change(field):
    delivery = payloads.delivery(changes=[{"field": field, "value": {"id": "1"}}])

    assert only_event(delivery).kind == "change"


def test_non_dict_messaging_items_are_unknown_events():
    parsed = parse(raw_entry(messaging=["text", 5, None]))

    assert [event.kind for event in parsed] == ["unknown"] * 3
    assert [event.data()["event"] for event in parsed] == ["text", 5, None]


# Batches


def test_a_batch_of_two_entries_gives_every_event_in_order():
    first = payloads.text_message(USER, text="first")
    second = payloads.reaction(USER, first["message"]["mid"])
    third = payloads.text_message(OTHER_USER, text="third")
    delivery = {
        "object": "instagram",
        "entry": [payloads.entry([first, second]), payloads.entry([third])],
    }

    parsed = parse(delivery)

    assert [event.data()["event"] for event in parsed] == [first, second, third]
    assert [event.kind for event in parsed] == ["message", "reaction", "message"]
    assert len({event.key for event in parsed}) == 3


def test_an_entry_with_messaging_and_changes_gives_both():
    delivery = payloads.delivery(
        payloads.text_message(USER), changes=[payloads.comment_change()]
    )

    assert [event.kind for event in parse(delivery)] == ["message", "comment"]


def test_events_carry_their_entry_account_id():
    event = only_event(payloads.delivery(payloads.text_message(USER)))

    assert event.account_id == ACCOUNT_ID
    assert event.data()["entry_id"] == ACCOUNT_ID


# Keys


@pytest.mark.parametrize(
    "event",
    [
        payloads.text_message(USER),
        payloads.reaction(USER, payloads.new_mid()),
        payloads.read(USER, payloads.new_mid()),
        payloads.deleted(USER, payloads.new_mid()),
        payloads.edit(USER, payloads.new_mid()),
        payloads.postback(USER),
    ],
    ids=["message", "reaction", "read", "deleted", "edit", "postback"],
)
def test_an_event_keeps_its_key_inside_a_differently_composed_batch(event):
    alone = {"object": "instagram", "entry": [payloads.entry([event], time_ms=1)]}
    batch = {
        "object": "instagram",
        "entry": [
            payloads.entry([payloads.text_message(OTHER_USER)], time_ms=2),
            payloads.entry(
                [payloads.read(OTHER_USER, "m"), event, payloads.postback(USER)],
                time_ms=3,
            ),
        ],
    }

    alone_key = only_event(alone).key
    batch_keys = [parsed.key for parsed in parse(batch)]

    assert batch_keys[2] == alone_key
    assert batch_keys.count(alone_key) == 1


def test_a_change_keeps_its_key_inside_a_differently_composed_batch():
    change = payloads.comment_change()

    alone = only_event(payloads.delivery(changes=[change])).key
    batch = parse(
        payloads.delivery(
            payloads.text_message(USER), changes=[payloads.comment_change(), change]
        )
    )

    assert batch[2].key == alone


def test_events_that_refer_to_an_earlier_message_get_keys_of_their_own():
    message = payloads.text_message(USER)
    mid = message["message"]["mid"]
    stamp = message["timestamp"]
    followers = [
        payloads.reaction(USER, mid),
        payloads.read(USER, mid),
        payloads.edit(USER, mid),
        payloads.deleted(USER, mid),
    ]
    for follower in followers:
        follower["timestamp"] = stamp

    keys = [event.key for event in parse(payloads.delivery(message, *followers))]

    assert len(set(keys)) == 5


def test_two_different_reactions_to_the_same_message_get_different_keys():
    mid = payloads.new_mid()
    love = payloads.reaction(USER, mid, emoji="\u2764\ufe0f", action="react")
    laugh = payloads.reaction(USER, mid, emoji="\U0001f602", action="react")
    unreact = payloads.reaction(USER, mid, emoji="\u2764\ufe0f", action="unreact")
    for event in (laugh, unreact):
        event["timestamp"] = love["timestamp"]

    keys = [event.key for event in parse(payloads.delivery(love, laugh, unreact))]

    assert len(set(keys)) == 3


def test_two_edits_of_the_same_message_get_different_keys():
    mid = payloads.new_mid()
    first = payloads.edit(USER, mid, text="fixed a typo", num_edit=1)
    second = payloads.edit(USER, mid, text="fixed another", num_edit=2)
    second["timestamp"] = first["timestamp"]

    keys = [event.key for event in parse(payloads.delivery(first, second))]

    assert keys[0] != keys[1]


@pytest.mark.parametrize(
    "own",
    [payloads.echo(USER), payloads.text_message(ACCOUNT_ID)],
    ids=["is-echo", "sent-by-the-account"],
)
def test_echo_classification_does_not_change_the_key(own):
    as_echo = only_event(payloads.delivery(own), account_id=ACCOUNT_ID)
    without_account = only_event(payloads.delivery(own), account_id="")

    assert as_echo.kind == "echo"
    assert as_echo.key == without_account.key


def test_the_same_mid_redelivered_with_a_new_timestamp_keeps_its_key():
    message = payloads.text_message(USER, timestamp=1700000000000)
    again = {**message, "timestamp": 1700000005000}

    assert only_event(payloads.delivery(message)).key == (
        only_event(payloads.delivery(again)).key
    )


# Bodies that are not deliveries


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"not json at all", "body is not JSON"),
        (b"", "body is not JSON"),
        (b"\xff\xfe{}", "body is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "body is not JSON"),
        (b'[{"entry": []}]', "expected a JSON object, got list"),
        (b'"entry"', "expected a JSON object, got str"),
        (b"null", "expected a JSON object, got NoneType"),
        (b'{"object": "instagram"}', "expected an 'entry' list"),
        (b'{"object": "instagram", "entry": {"id": "1"}}', "expected an 'entry' list"),
        (b'{"object": "instagram", "entry": null}', "expected an 'entry' list"),
    ],
    ids=[
        "not-json",
        "empty",
        "not-utf8",
        "too-deep",
        "array",
        "string",
        "null",
        "no-entry",
        "entry-object",
        "entry-null",
    ],
)
def test_a_body_that_is_not_a_delivery_is_unparseable(raw, message):
    with pytest.raises(events.UnparseableDelivery, match=message):
        events.parse_delivery(raw, ACCOUNT_ID)


def test_an_empty_entry_list_gives_no_events():
    assert parse({"object": "instagram", "entry": []}) == []


# occurred_at


def test_a_messaging_timestamp_in_milliseconds_becomes_seconds():
    event = payloads.text_message(USER, timestamp=1700000000123)

    assert only_event(payloads.delivery(event)).occurred_at == pytest.approx(
        1700000000.123
    )


def test_an_entry_time_in_seconds_is_kept():
    delivery = raw_entry(time=1700000000, changes=[payloads.mention_change()])

    assert only_event(delivery).occurred_at == 1700000000.0


def test_an_entry_time_in_milliseconds_becomes_seconds():
    delivery = raw_entry(time=1700000000500, changes=[payloads.comment_change()])

    assert only_event(delivery).occurred_at == pytest.approx(1700000000.5)


def test_the_event_timestamp_wins_over_the_entry_time():
    event = payloads.text_message(USER, timestamp=1700000000000)
    delivery = raw_entry(time=1600000000000, messaging=[event])

    assert only_event(delivery).occurred_at == pytest.approx(1700000000.0)


@pytest.mark.parametrize(
    "timestamp",
    [True, False, "1700000000000", None, [1700000000000], {"ms": 1}, 0, -5],
)
def test_a_timestamp_that_is_not_a_usable_number_gives_none(timestamp):
    event = payloads.messaging(USER, message={"mid": "m", "text": "hi"})
    event["timestamp"] = timestamp
    delivery = raw_entry(messaging=[event])

    assert only_event(delivery).occurred_at is None


def test_a_missing_timestamp_and_entry_time_give_none():
    event = payloads.messaging(USER, message={"mid": "m", "text": "hi"})
    del event["timestamp"]

    assert only_event(raw_entry(messaging=[event])).occurred_at is None


@pytest.mark.parametrize("where", ["event", "entry"])
def test_a_timestamp_too_large_for_a_float_gives_none(where):
    huge = 10**400
    event = payloads.messaging(USER, message={"mid": "m", "text": "hi"})
    if where == "event":
        event["timestamp"] = huge
        delivery = raw_entry(messaging=[event])
    else:
        delivery = raw_entry(time=huge, changes=[payloads.comment_change()])

    assert only_event(delivery).occurred_at is None


# Stored payload


def test_the_payload_keeps_the_event_and_its_envelope():
    message = payloads.text_message(USER, text="hello")
    delivery = payloads.delivery(message)

    stored = only_event(delivery).data()

    assert stored == {
        "object": "instagram",
        "entry_id": ACCOUNT_ID,
        "entry_time": delivery["entry"][0]["time"],
        "channel": "messaging",
        "event": message,
    }


@pytest.mark.parametrize(
    "escaped_text, text",
    [
        ("\\ud800", "\ud800"),
        ("lone low \\udc00 end", "lone low \udc00 end"),
        ("\\ud83d\\ude00 grin", "\U0001f600 grin"),
        ("Caf\\u00e9 \\u2764\\ufe0f", "Caf\u00e9 \u2764\ufe0f"),
    ],
    ids=["lone-high-surrogate", "lone-low-surrogate", "non-bmp", "accents"],
)
def test_the_payload_is_stored_as_ascii_only_json(escaped_text, text):
    message = payloads.text_message(USER, text="TEXT-HERE")
    raw = payloads.body(payloads.delivery(message))
    raw = raw.replace(b"TEXT-HERE", escaped_text.encode("ascii"))

    (event,) = events.parse_delivery(raw, ACCOUNT_ID)

    event.payload.encode("ascii")
    assert event.data()["event"]["message"]["text"] == text
    assert event.kind == "message"


def test_a_raw_utf8_non_bmp_text_is_stored_as_ascii_only_json():
    message = payloads.text_message(USER, text="\U0001f600 caf\u00e9")
    raw = json.dumps(payloads.delivery(message), ensure_ascii=False).encode("utf-8")

    (event,) = events.parse_delivery(raw, ACCOUNT_ID)

    event.payload.encode("ascii")
    assert event.data()["event"] == message


def test_a_comment_under_comments_and_live_comments_has_one_key():
    value = {"id": "17900000000000123", "text": "hello"}
    comments = events.event_key("changes", {"field": "comments", "value": value})
    live = events.event_key("changes", {"field": "live_comments", "value": value})
    assert comments == live


@pytest.mark.parametrize("odd_id", [["1"], {"id": "1"}, 1.5, None, ""])
def test_comments_with_odd_ids_are_told_apart_by_content(odd_id):
    first = {"field": "comments", "value": {"id": odd_id, "text": "first"}}
    second = {"field": "comments", "value": {"id": odd_id, "text": "second"}}
    assert events.event_key("changes", first) != events.event_key("changes", second)
