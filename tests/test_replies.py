"""Keyword replies to messages and private replies to comments, through the worker."""

import json

import payloads
import pytest
from conftest import GRAPH_BASE, rows

SEND_URL = f"{GRAPH_BASE}/v24.0/{payloads.ACCOUNT_ID}/messages"
RULES = [
    {"on": "message", "keywords": ["price", "prix"], "reply": "Prices: example.com"},
    {"on": "message", "keywords": ["hours"], "reply": "Open 9 to 6."},
    {"on": "comment", "keywords": ["link"], "reply": "Here is the link."},
]


@pytest.fixture
def with_rules(env, tmp_path, monkeypatch):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(RULES))
    monkeypatch.setenv("REPLY_RULES_FILE", str(path))
    monkeypatch.setenv("REPLY_COOLDOWN_SECONDS", "3600")


def sent(graph):
    return [r.json() for r in graph.request_history if r.method == "POST"]


def test_keyword_message_gets_its_rule_reply_every_time(with_rules, post, work, graph):
    sender = payloads.new_id()
    for text in ("Quel PRIX ?", "and the price?", "hi"):
        post(payloads.delivery(payloads.text_message(sender, text)))

    work()

    texts = [call["message"]["text"] for call in sent(graph)]
    # Keyword replies ignore the cooldown; the default reply is the third's.
    assert texts == [
        "Prices: example.com",
        "Prices: example.com",
        "Thanks, we got your message.",
    ]


def test_default_reply_still_waits_out_the_cooldown(
    with_rules, post, work, graph, store
):
    sender = payloads.new_id()
    post(payloads.delivery(payloads.text_message(sender, "hello")))
    post(payloads.delivery(payloads.text_message(sender, "hello again")))

    work()

    assert len(sent(graph)) == 1
    assert sorted(r["outcome"] for r in rows(store, "webhook_events")) == [
        "cooldown",
        "replied",
    ]


def test_keyword_reply_is_sent_even_with_default_replies_off(
    with_rules, post, work, graph, monkeypatch
):
    monkeypatch.setenv("AUTO_REPLY_TEXT", "")
    post(payloads.delivery(payloads.text_message(payloads.new_id(), "opening hours?")))
    post(payloads.delivery(payloads.text_message(payloads.new_id(), "hello")))

    work()

    assert [call["message"]["text"] for call in sent(graph)] == ["Open 9 to 6."]


def test_matching_comment_gets_one_private_reply(with_rules, post, work, graph, store):
    change = payloads.comment_change(text="LINK please!")
    comment_id = change["value"]["id"]

    post(payloads.delivery(changes=[change]))
    post(payloads.delivery(changes=[change]))  # Meta delivers some comments twice
    work()

    assert sent(graph) == [
        {
            "recipient": {"comment_id": comment_id},
            "message": {"text": "Here is the link."},
        }
    ]
    [event] = rows(store, "webhook_events")
    assert (event["kind"], event["status"]) == ("comment", "done")


@pytest.mark.parametrize(
    "change, outcome",
    [
        (payloads.comment_change(text="nice photo"), "no comment rule matched"),
        (
            payloads.comment_change(text="link?", user_id=payloads.ACCOUNT_ID),
            "no reply to our own comment",
        ),
    ],
    ids=["no rule", "our own comment"],
)
def test_comment_without_a_reason_to_answer_is_ignored(
    with_rules, post, work, graph, store, change, outcome
):
    post(payloads.delivery(changes=[change]))
    work()
    assert sent(graph) == []
    assert rows(store, "webhook_events")[0]["outcome"] == outcome


def test_comment_older_than_seven_days_gets_no_private_reply(
    with_rules, post, work, graph, store
):
    delivery = payloads.delivery(changes=[payloads.comment_change(text="link")])
    delivery["entry"][0]["time"] = payloads.now_ms() - 8 * 86400 * 1000

    post(delivery)
    work()

    assert sent(graph) == []
    assert rows(store, "dead_letter")[0]["reason"] == "outside_window"


def test_message_rules_never_answer_comments_and_the_reverse(
    with_rules, post, work, graph
):
    post(payloads.delivery(changes=[payloads.comment_change(text="price?")]))
    post(payloads.delivery(payloads.text_message(payloads.new_id(), "link")))
    work()
    texts = [call["message"]["text"] for call in sent(graph)]
    assert texts == ["Thanks, we got your message."]
