"""The dead-letter commands, driven through Flask's CLI against real dead letters."""

import itertools
import re

import payloads
import pytest
from conftest import GRAPH_BASE, rows
from rq.job import Job
from rq.registry import FailedJobRegistry

from storage import now_iso

SEND_URL = f"{GRAPH_BASE}/v24.0/{payloads.ACCOUNT_ID}/messages"
TOKEN_INVALID, RECIPIENT_UNAVAILABLE = 190, 551


class SendApi:
    """The Send API, stubbed: success, or a Graph error code for chosen senders."""

    def __init__(self, requests_mock):
        self.mock = requests_mock
        self.refuse = {}  # recipient id -> Graph error code
        self._ids = itertools.count(1)
        requests_mock.post(SEND_URL, json=self._answer)

    def _answer(self, request, context):
        recipient = request.json()["recipient"]["id"]
        code = self.refuse.get(recipient)
        if code is None:
            return {"recipient_id": recipient, "message_id": f"m_{next(self._ids)}"}
        context.status_code = 400
        # Meta's message quotes the token: it must never reach the operator.
        return payloads.graph_error(
            code,
            message=f"Token {payloads.ACCESS_TOKEN} refused",
            fbtrace_id="Atrace123",
        )

    def calls_to(self, recipient):
        return [
            r
            for r in self.mock.request_history
            if r.method == "POST" and r.json()["recipient"]["id"] == recipient
        ]

    def calls(self):
        return [r for r in self.mock.request_history if r.method == "POST"]


@pytest.fixture
def send_api(requests_mock):
    return SendApi(requests_mock)


@pytest.fixture
def cli(app):
    """Run `flask dead-letter ...` against the test app; return click's Result."""
    runner = app.test_cli_runner()

    def cli(*args):
        return runner.invoke(args=["dead-letter", *map(str, args)])

    return cli


@pytest.fixture
def dead(post, work, send_api, store):
    """Make a real dead letter from one direct message; return its row and sender.

    The Graph API refuses the reply with ``code``; a message ``hours_old``
    past the reply window never reaches it.
    """

    def dead(code=TOKEN_INVALID, hours_old=0):
        sender = payloads.new_id()
        text = f"my phone is {payloads.new_id('55')}"
        send_api.refuse[sender] = code
        timestamp = payloads.now_ms() - hours_old * 3600 * 1000 if hours_old else None
        post(
            payloads.delivery(payloads.text_message(sender, text, timestamp=timestamp))
        )
        work()
        [row] = store.db.query(
            "SELECT d.*, e.job_id FROM dead_letter d"
            " JOIN webhook_events e USING (event_key) WHERE e.payload LIKE ?",
            [f"%{sender}%"],
        )
        return {**row, "sender": sender, "text": text}

    return dead


@pytest.fixture
def unreadable(post, store):
    """Make a dead letter from a signed body that is not JSON; return its row."""

    def unreadable():
        assert post(b"not json").status_code == 200
        [row] = rows(store, "dead_letter", "reason = 'unparseable'")
        return row

    return unreadable


def parse_table(text):
    """Return the rows of a printed table as dicts keyed by its headers."""
    header, dashes, *body = text.splitlines()
    starts = [m.start() for m in re.finditer(r"-+", dashes)]
    ends = [*starts[1:], None]

    def cells(line):
        return [line[s:e].strip() for s, e in zip(starts, ends, strict=True)]

    names = cells(header)
    return [dict(zip(names, cells(line), strict=True)) for line in body]


def listed(result):
    """Return the IDs a successful `list` printed, in its order."""
    assert result.exit_code == 0, result.output
    return [int(r["ID"]) for r in parse_table(result.output)]


def dead_letter_row(store, dead_id):
    [row] = rows(store, "dead_letter", "id = ?", [dead_id])
    return row


def event_row(store, key):
    return store.get_event(key)


def actions(store, key):
    return [a["action"] for a in store.audit_trail(key)]


def failed_job_ids(queue):
    return FailedJobRegistry(queue=queue).get_job_ids()


# -- list ----------------------------------------------------------------------


def test_list_shows_open_dead_letters_newest_first_without_personal_data(
    cli, dead, unreadable
):
    token = dead(TOKEN_INVALID)
    gone = dead(RECIPIENT_UNAVAILABLE)
    late = dead(hours_old=25)
    junk = unreadable()

    result = cli("list")

    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split()
    assert header[:5] == ["ID", "EVENT", "KIND", "REASON", "STATUS"]
    table = parse_table(result.output)
    assert [
        (int(r["ID"]), r["EVENT"], r["KIND"], r["REASON"], r["STATUS"]) for r in table
    ] == [
        (junk["id"], junk["event_key"], "unparseable", "unparseable", "open"),
        (late["id"], late["event_key"], "message", "outside_window", "open"),
        (gone["id"], gone["event_key"], "message", "recipient_unavailable", "open"),
        (token["id"], token["event_key"], "message", "token_invalid", "open"),
    ]
    for private in (token, gone, late):
        assert private["text"] not in result.output
        assert private["sender"] not in result.output
    assert payloads.ACCESS_TOKEN not in result.output


def test_list_reason_shows_only_that_reason(cli, dead):
    first = dead(TOKEN_INVALID)
    dead(RECIPIENT_UNAVAILABLE)
    second = dead(TOKEN_INVALID)

    result = cli("list", "--reason", "token_invalid")

    assert listed(result) == [second["id"], first["id"]]
    assert {r["REASON"] for r in parse_table(result.output)} == {"token_invalid"}


@pytest.mark.parametrize(
    "status, expected",
    [
        (None, ["open"]),
        ("open", ["open"]),
        ("replayed", ["replayed"]),
        ("resolved", ["resolved"]),
        ("discarded", ["discarded"]),
        ("all", ["discarded", "replayed", "resolved", "open"]),
    ],
)
def test_list_status_chooses_which_dead_letters_show(
    cli, dead, send_api, work, status, expected
):
    made = {name: dead() for name in ("open", "resolved", "replayed", "discarded")}
    send_api.refuse.clear()
    assert cli("replay", made["resolved"]["id"]).exit_code == 0
    work()
    assert cli("replay", made["replayed"]["id"]).exit_code == 0
    assert cli("discard", made["discarded"]["id"]).exit_code == 0

    result = cli("list", *(["--status", status] if status else []))

    assert listed(result) == [made[name]["id"] for name in expected]
    assert [r["STATUS"] for r in parse_table(result.output)] == expected


@pytest.mark.parametrize(
    "option, age, expected",
    [
        ("--older-than", "1h", ["old"]),
        ("--older-than", "90m", ["old"]),
        ("--older-than", "2d", ["old"]),
        ("--newer-than", "1h", ["new"]),
        ("--newer-than", "3600s", ["new"]),
        ("--newer-than", "7d", ["new", "old"]),
    ],
)
def test_list_filters_by_age(cli, dead, store, option, age, expected):
    made = {"old": dead(), "new": dead()}
    store.db.execute(
        "UPDATE dead_letter SET created_at = ? WHERE id = ?",
        [now_iso(-3 * 86400), made["old"]["id"]],
    )

    result = cli("list", option, age)

    assert listed(result) == [made[name]["id"] for name in expected]
    ages = {int(r["ID"]): r["AGE"] for r in parse_table(result.output)}
    if "old" in expected:
        assert ages[made["old"]["id"]] == "3d"


def test_list_older_than_everything_matches_nothing(cli, dead):
    dead()

    result = cli("list", "--older-than", "7d")

    assert result.exit_code == 0
    assert result.output == "no dead letters match\n"


@pytest.mark.parametrize("option", ["--older-than", "--newer-than"])
@pytest.mark.parametrize("age", ["5 parsecs", "7w", "-1h", "h", "1.5h", ""])
def test_list_refuses_an_age_it_cannot_read(cli, dead, option, age):
    dead()

    result = cli("list", option, age)

    assert result.exit_code == 2
    assert "Usage:" in result.output
    assert f"Invalid value for '{option}'" in result.output
    assert "EVENT" not in result.output


@pytest.mark.parametrize(
    "option, expected", [("--older-than", []), ("--newer-than", ["only"])]
)
def test_list_age_beyond_the_calendar_is_refused_or_answered(
    cli, dead, option, expected
):
    made = {"only": dead()}

    result = cli("list", option, "1000000d")

    assert result.exit_code in (0, 2), repr(result.exception)
    if result.exit_code == 0:
        ids = [made[name]["id"] for name in expected]
        assert (listed(result) if ids else []) == ids
        assert ids or result.output == "no dead letters match\n"
    else:
        assert f"Invalid value for '{option}'" in result.output


def test_list_of_an_empty_table_says_none_match(cli):
    result = cli("list")

    assert result.exit_code == 0
    assert result.output == "no dead letters match\n"


def test_list_reason_without_a_match_says_none_match(cli, dead):
    dead(RECIPIENT_UNAVAILABLE)

    result = cli("list", "--reason", "token_invalid")

    assert result.exit_code == 0
    assert result.output == "no dead letters match\n"


# -- show ----------------------------------------------------------------------


def shown(result):
    """Return show's `label: value` lines as a dict and its history table."""
    assert result.exit_code == 0, result.output
    head, rest = result.output.split("\nhistory:\n", 1)
    fields = dict(
        (label.strip(), value.strip())
        for label, value in (line.split(":", 1) for line in head.splitlines())
    )
    history = parse_table(rest.split("\n\n", 1)[0])
    return fields, history


def test_show_prints_reason_attempts_redacted_error_and_history(cli, dead):
    letter = dead(TOKEN_INVALID)

    result = cli("show", letter["id"])

    fields, history = shown(result)
    assert fields["event"] == letter["event_key"]
    assert fields["kind"] == "message"
    assert fields["reason"] == "token_invalid"
    assert fields["status"] == "open"
    assert fields["attempts"] == "1"
    assert fields["job"] == letter["job_id"]
    assert fields["reply sent"] == "no"
    assert "code=190" in fields["error"]
    assert "Atrace123" in fields["error"]
    assert payloads.ACCESS_TOKEN not in result.output
    assert [h["ACTION"] for h in history] == ["received", "queued", "dead_lettered"]


def test_show_hides_the_payload_unless_asked(cli, dead):
    letter = dead()

    hidden = cli("show", letter["id"])
    revealed = cli("show", letter["id"], "--payload")

    assert hidden.exit_code == 0 and revealed.exit_code == 0
    assert letter["text"] not in hidden.output
    assert letter["sender"] not in hidden.output
    assert "--payload" in hidden.output
    assert letter["text"] in revealed.output
    assert letter["sender"] in revealed.output


def test_show_of_an_unreadable_delivery_prints_its_problem(cli, unreadable):
    letter = unreadable()

    fields, history = shown(cli("show", letter["id"]))

    assert (fields["kind"], fields["reason"]) == ("unparseable", "unparseable")
    assert "not JSON" in fields["error"]
    assert [h["ACTION"] for h in history] == ["received", "dead_lettered"]


@pytest.mark.parametrize("command", ["show", "replay", "discard"])
def test_unknown_id_is_one_error_line(cli, dead, command):
    letter = dead()
    missing = letter["id"] + 100

    result = cli(command, missing)

    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith("error:")
    assert str(missing) in line


# -- replay --------------------------------------------------------------------


def test_replay_after_the_fix_sends_one_reply_and_resolves(
    cli, dead, send_api, work, store, queue
):
    letter = dead(TOKEN_INVALID)
    assert failed_job_ids(queue) == [letter["job_id"]]
    send_api.refuse.clear()

    result = cli("replay", letter["id"])

    assert result.exit_code == 0, result.output
    assert f"{letter['id']}: replayed as job {letter['job_id']}" in result.output
    assert "1 replayed, 0 refused" in result.output
    assert letter["job_id"] not in failed_job_ids(queue)
    assert letter["job_id"] in queue.get_job_ids()
    assert dead_letter_row(store, letter["id"])["status"] == "replayed"

    work()

    assert len(send_api.calls_to(letter["sender"])) == 2  # the refused one, then one
    event = event_row(store, letter["event_key"])
    assert event["status"] == "done"
    assert event["reply_message_id"]
    assert dead_letter_row(store, letter["id"])["status"] == "resolved"
    trail = actions(store, letter["event_key"])
    assert trail[trail.index("dead_lettered") :] == [
        "dead_lettered",
        "replayed",
        "replied",
        "resolved",
    ]
    assert failed_job_ids(queue) == []


def test_replay_by_reason_replays_only_that_reason(cli, dead, send_api, work, store):
    expired = [dead(TOKEN_INVALID), dead(TOKEN_INVALID)]
    gone = dead(RECIPIENT_UNAVAILABLE)
    for letter in expired:
        send_api.refuse.pop(letter["sender"])

    result = cli("replay", "--reason", "token_invalid")
    work()

    assert result.exit_code == 0, result.output
    assert "2 replayed, 0 refused" in result.output
    for letter in expired:
        assert len(send_api.calls_to(letter["sender"])) == 2
        assert dead_letter_row(store, letter["id"])["status"] == "resolved"
        assert event_row(store, letter["event_key"])["status"] == "done"
    assert len(send_api.calls_to(gone["sender"])) == 1
    assert dead_letter_row(store, gone["id"])["status"] == "open"
    assert "replayed" not in actions(store, gone["event_key"])


def test_replay_all_replays_every_open_dead_letter(cli, dead, send_api, work, store):
    letters = [dead(TOKEN_INVALID), dead(RECIPIENT_UNAVAILABLE)]
    send_api.refuse.clear()

    result = cli("replay", "--all")
    work()

    assert result.exit_code == 0, result.output
    assert "2 replayed, 0 refused" in result.output
    for letter in letters:
        assert len(send_api.calls_to(letter["sender"])) == 2
        assert dead_letter_row(store, letter["id"])["status"] == "resolved"
    assert cli("list").output == "no dead letters match\n"


def test_replay_that_fails_again_reopens_the_same_dead_letter(
    cli, dead, send_api, work, store, queue
):
    letter = dead(TOKEN_INVALID)

    result = cli("replay", letter["id"])
    work()

    assert result.exit_code == 0, result.output
    assert len(send_api.calls_to(letter["sender"])) == 2
    [row] = rows(store, "dead_letter")
    assert (row["id"], row["status"], row["attempts"]) == (letter["id"], "open", 1)
    assert listed(cli("list")) == [letter["id"]]
    trail = actions(store, letter["event_key"])
    assert trail[-3:] == ["dead_lettered", "replayed", "dead_lettered"]
    assert event_row(store, letter["event_key"])["status"] == "dead"
    assert failed_job_ids(queue) == [letter["job_id"]]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["{id}", "--all"],
        ["{id}", "--reason", "token_invalid"],
        ["--reason", "token_invalid", "--all"],
    ],
    ids=["nothing", "ids-and-all", "ids-and-reason", "reason-and-all"],
)
def test_replay_needs_exactly_one_way_of_choosing(
    cli, dead, send_api, work, store, args
):
    letter = dead()
    send_api.refuse.clear()

    result = cli("replay", *(a.format(id=letter["id"]) for a in args))
    work()

    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith("error:")
    assert "--all" in line and "--reason" in line
    assert len(send_api.calls_to(letter["sender"])) == 1
    assert dead_letter_row(store, letter["id"])["status"] == "open"


def test_replay_with_no_open_dead_letter_of_that_reason_is_an_error(cli, dead):
    dead(RECIPIENT_UNAVAILABLE)

    result = cli("replay", "--reason", "token_invalid")

    assert result.exit_code == 1
    assert result.output.startswith("error:")


def test_replay_refuses_an_event_whose_reply_is_recorded(
    cli, dead, send_api, work, store, queue
):
    letter = dead()
    store.db.execute(
        "UPDATE webhook_events SET reply_message_id = 'm_earlier' WHERE event_key = ?",
        [letter["event_key"]],
    )
    send_api.refuse.clear()

    result = cli("replay", letter["id"])
    work()

    assert result.exit_code == 1
    assert f"{letter['id']}: not replayed" in result.output
    assert "already sent" in result.output
    assert "0 replayed, 1 refused" in result.output
    assert len(send_api.calls_to(letter["sender"])) == 1
    assert dead_letter_row(store, letter["id"])["status"] == "open"
    assert event_row(store, letter["event_key"])["status"] == "dead"
    assert "replayed" not in actions(store, letter["event_key"])
    assert failed_job_ids(queue) == [letter["job_id"]]


def test_replay_refuses_an_unreadable_delivery(
    cli, unreadable, send_api, work, store, queue
):
    letter = unreadable()

    result = cli("replay", letter["id"])
    work()

    assert result.exit_code == 1
    assert f"{letter['id']}: not replayed" in result.output
    assert "could not be read" in result.output
    assert "0 replayed, 1 refused" in result.output
    assert send_api.calls() == []
    assert dead_letter_row(store, letter["id"])["status"] == "open"
    assert queue.get_job_ids() == []


def test_replay_refuses_a_discarded_dead_letter(cli, dead, send_api, work, store):
    letter = dead()
    cli("discard", letter["id"])
    send_api.refuse.clear()

    result = cli("replay", letter["id"])
    work()

    assert result.exit_code == 1
    assert f"{letter['id']}: not replayed: it is discarded" in result.output
    assert len(send_api.calls_to(letter["sender"])) == 1
    assert dead_letter_row(store, letter["id"])["status"] == "discarded"


def test_replay_succeeds_when_only_some_are_refused(
    cli, dead, unreadable, send_api, work, store
):
    letter = dead()
    junk = unreadable()
    send_api.refuse.clear()

    result = cli("replay", letter["id"], junk["id"])
    work()

    assert result.exit_code == 0, result.output
    assert "1 replayed, 1 refused" in result.output
    assert dead_letter_row(store, letter["id"])["status"] == "resolved"
    assert dead_letter_row(store, junk["id"])["status"] == "open"


def drop_job_through_rq(queue, job_id):
    Job.fetch(job_id, connection=queue.connection).delete()


def drop_job_key_only(queue, job_id):
    """Lose the job's hash but not its registry entry, as Redis eviction does."""
    queue.connection.delete(Job.key_for(job_id))


@pytest.mark.parametrize("drop", [drop_job_through_rq, drop_job_key_only])
def test_replay_of_a_dead_letter_whose_job_is_gone_uses_a_new_job(
    cli, dead, send_api, work, store, queue, drop
):
    letter = dead()
    drop(queue, letter["job_id"])
    send_api.refuse.clear()

    result = cli("replay", letter["id"])

    assert result.exit_code == 0, result.output
    event = event_row(store, letter["event_key"])
    assert event["job_id"] != letter["job_id"]
    assert event["job_id"].startswith(letter["event_key"])
    assert f"replayed as job {event['job_id']}" in result.output
    assert queue.get_job_ids() == [event["job_id"]]

    work()

    assert len(send_api.calls_to(letter["sender"])) == 2
    assert event_row(store, letter["event_key"])["status"] == "done"
    assert dead_letter_row(store, letter["id"])["status"] == "resolved"


def test_requeue_from_rq_dashboard_resolves_the_dead_letter(
    dead, send_api, work, store, queue
):
    letter = dead()
    send_api.refuse.clear()

    FailedJobRegistry(queue=queue).requeue(letter["job_id"])
    work()

    assert len(send_api.calls_to(letter["sender"])) == 2
    event = event_row(store, letter["event_key"])
    assert (event["status"], event["job_id"]) == ("done", letter["job_id"])
    assert dead_letter_row(store, letter["id"])["status"] == "resolved"
    trail = actions(store, letter["event_key"])
    assert trail[trail.index("dead_lettered") :] == [
        "dead_lettered",
        "replayed",
        "replied",
        "resolved",
    ]
    assert failed_job_ids(queue) == []


# -- discard -------------------------------------------------------------------


def test_discard_keeps_the_row_and_clears_the_failed_job(cli, dead, store, queue):
    letter = dead()
    kept = dead()

    result = cli("discard", letter["id"])

    assert result.exit_code == 0, result.output
    assert result.output == f"{letter['id']}: discarded\n"
    assert dead_letter_row(store, letter["id"])["status"] == "discarded"
    assert actions(store, letter["event_key"])[-1] == "discarded"
    assert failed_job_ids(queue) == [kept["job_id"]]
    assert not Job.exists(letter["job_id"], connection=queue.connection)
    assert listed(cli("list")) == [kept["id"]]
    assert listed(cli("list", "--status", "discarded")) == [letter["id"]]


def test_discarding_twice_says_it_is_already_discarded(cli, dead, store):
    letter = dead()
    cli("discard", letter["id"])

    result = cli("discard", letter["id"])

    assert f"{letter['id']}: not discarded: it is discarded" in result.output
    assert actions(store, letter["event_key"]).count("discarded") == 1
    assert dead_letter_row(store, letter["id"])["status"] == "discarded"


def test_discard_of_an_unreadable_delivery(cli, unreadable, store):
    letter = unreadable()

    result = cli("discard", letter["id"])

    assert result.exit_code == 0, result.output
    assert dead_letter_row(store, letter["id"])["status"] == "discarded"
