"""Fault injection on real processes: Redis stopped, workers killed, Graph misbehaving.

Every test ends by counting: each delivered event is done, ignored or in
dead_letter, and the stand-in Graph API answered at most one send per event
with a message_id.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import payloads
import pytest
from conftest import free_port, throwaway_redis_argv, wait_for
from graph_stub import GraphStub
from redis import Redis
from rq.worker import Worker

import storage

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL = ("done", "ignored", "dead")


class Stack:
    """Redis, gunicorn and workers as processes, each under the test's control."""

    def __init__(self, tmp_path, graph_url, **settings):
        self.tmp = tmp_path
        self.redis_port = free_port()
        self.web_port = free_port()
        self.db_path = str(tmp_path / "data" / "webhooks.db")
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                ("IG_", "GRAPH_", "REDIS_", "DATABASE_", "REPLY_", "RETRY_")
            )
        }
        self.env.update(
            {
                "ENV_FILE": str(tmp_path / "no.env"),
                "IG_APP_SECRET": payloads.APP_SECRET,
                "IG_VERIFY_TOKEN": payloads.VERIFY_TOKEN,
                "IG_ACCESS_TOKEN": payloads.ACCESS_TOKEN,
                "IG_ACCOUNT_ID": payloads.ACCOUNT_ID,
                "GRAPH_API_BASE": graph_url,
                "GRAPH_TIMEOUT_SECONDS": "1",
                "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "DATABASE_PATH": self.db_path,
                "REPLY_COOLDOWN_SECONDS": "0",
                "RETRY_DELAYS": "1,1,1",
                "QUEUED_STALE_SECONDS": "5",
                "PYTHONUNBUFFERED": "1",
                **settings,
            }
        )
        self.procs = {}
        self.workers = []

    def _spawn(self, name, argv):
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, cwd=PROJECT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[name] = proc
        return proc

    def start_redis(self):
        self._spawn(
            "redis",
            throwaway_redis_argv(self.redis_port),
        )
        assert wait_for(lambda: _port_open(self.redis_port))

    def stop_redis(self):
        proc = self.procs.pop("redis")
        proc.terminate()
        proc.wait(10)

    def start_web(self):
        self._spawn(
            "web",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-w",
                "2",
                "-b",
                f"127.0.0.1:{self.web_port}",
                "webhook_app:create_app()",
            ],
        )
        assert wait_for(lambda: _port_open(self.web_port), seconds=30)

    def start_worker(self, wait=True):
        name = f"worker{len(self.workers)}"
        proc = self._spawn(name, [sys.executable, "worker.py"])
        self.workers.append(proc)
        if wait:
            log = self.tmp / f"{name}.log"
            assert wait_for(lambda: "Listening on" in log.read_text(), seconds=30)
        return proc

    def post(self, delivery):
        url = f"http://127.0.0.1:{self.web_port}"
        return payloads.post_signed(url, payloads.body(delivery))

    def query(self, sql, params=()):
        with sqlite3.connect(self.db_path, timeout=10) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(sql, params)]

    def statuses(self):
        return [
            row["status"] for row in self.query("SELECT status FROM webhook_events")
        ]

    def all_final(self, count):
        statuses = self.statuses()
        return len(statuses) == count and all(s in FINAL for s in statuses)

    def logs(self):
        return "".join(p.read_text(errors="replace") for p in self.tmp.glob("*.log"))

    def close(self):
        # Redis last, as launcher.py does: a worker waits for Redis to stop.
        procs = sorted(self.procs.items(), key=lambda item: item[0] == "redis")
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _port_open(port):
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def graph():
    with GraphStub() as stub:
        yield stub


@pytest.fixture
def stack(tmp_path, graph):
    stack = Stack(tmp_path, graph.url)
    stack.start_redis()
    stack.start_web()
    yield stack
    stack.close()


def assert_each_event_ended_once(stack, graph, senders):
    assert stack.all_final(len(senders)), stack.statuses()
    for sender in senders:
        assert len(graph.successes_to(sender)) <= 1, sender
    dead = stack.query(
        "SELECT event_key, COUNT(*) AS n FROM dead_letter GROUP BY event_key"
    )
    assert all(row["n"] == 1 for row in dead)


def test_redis_stopped_during_a_burst_loses_nothing(stack, graph):
    stack.start_worker()
    senders = [payloads.new_id() for _ in range(30)]
    statuses = []
    for i, sender in enumerate(senders):
        if i == 10:
            stack.stop_redis()
        if i == 11:
            # An idle relay asks nothing of Redis; one with an event to queue does.
            assert wait_for(lambda: "relay: Redis unavailable" in stack.logs())
        if i == 20:
            # Stored while Redis was away, waiting for it: none marked queued.
            store = storage.Store(stack.db_path)
            newest = store.events(limit=10)
            store.close()
            assert [event["status"] for event in newest] == ["received"] * 10
            stack.start_redis()  # empty: whatever was queued before is gone
        statuses.append(stack.post(payloads.delivery(payloads.text_message(sender))))

    # Every delivery was stored, so every one was answered 200.
    assert statuses == [200] * 30
    assert wait_for(lambda: stack.all_final(30), seconds=60), stack.statuses()
    assert_each_event_ended_once(stack, graph, senders)
    assert [len(graph.successes_to(s)) for s in senders] == [1] * 30
    assert "relay: Redis is back" in stack.logs()


def test_worker_started_before_redis_waits_for_it(tmp_path, graph):
    stack = Stack(tmp_path, graph.url)
    try:
        worker = stack.start_worker(wait=False)
        assert wait_for(lambda: "waiting for it" in stack.logs(), seconds=30)
        assert worker.poll() is None
        stack.start_redis()
        stack.start_web()
        sender = payloads.new_id()

        assert stack.post(payloads.delivery(payloads.text_message(sender))) == 200

        assert wait_for(lambda: stack.statuses() == ["done"], seconds=30)
        assert len(graph.successes_to(sender)) == 1
    finally:
        stack.close()


def test_worker_killed_mid_send_is_taken_over_by_another(stack, graph):
    sender = payloads.new_id()
    # The first call hangs past the kill, then fails: the reply never went out.
    graph.script[sender] = [{"sleep": 3, "status": 500, "json": {}}]
    first = stack.start_worker()
    assert stack.post(payloads.delivery(payloads.text_message(sender))) == 200
    assert wait_for(lambda: graph.calls_to(sender))

    first.send_signal(signal.SIGKILL)
    first.wait(10)
    started = time.monotonic()
    stack.start_worker()

    assert wait_for(lambda: stack.all_final(1), seconds=120), stack.statuses()
    assert time.monotonic() - started < 120
    assert stack.statuses() == ["done"]
    assert len(graph.successes_to(sender)) == 1
    actions = [r["action"] for r in stack.query("SELECT action FROM audit_log")]
    assert "abandoned" in actions


def test_sigterm_lets_the_current_job_finish(stack, graph):
    sender = payloads.new_id()
    graph.script[sender] = [{"sleep": 0.8}]
    worker = stack.start_worker()
    assert stack.post(payloads.delivery(payloads.text_message(sender))) == 200
    assert wait_for(lambda: graph.calls_to(sender))

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(30) == 0
    assert stack.statuses() == ["done"]
    assert len(graph.successes_to(sender)) == 1


def test_every_graph_failure_ends_done_or_dead_with_one_send_at_most(stack, graph):
    def error(code, subcode=None, status=400, **extra):
        body = {
            "error": {
                "code": code,
                "error_subcode": subcode,
                "fbtrace_id": "Tr4ce",
                "message": "no",
            }
        }
        return {"status": status, "json": body, **extra}

    cases = {
        "server_error_then_ok": ([{"status": 500, "json": {}}], "done", None),
        "rate_limited_then_ok": (
            [
                error(
                    613,
                    headers={
                        "Retry-After": "2",
                        "X-Business-Use-Case-Usage": '{"1":[{"type":"messenger",'
                        '"estimated_time_to_regain_access":0}]}',
                    },
                )
            ],
            "done",
            None,
        ),
        "token_expired": ([error(190)] * 5, "dead", "token_invalid"),
        "person_unavailable": ([error(551)] * 5, "dead", "recipient_unavailable"),
        "outside_window": ([error(10, 2018278)] * 5, "dead", "outside_window"),
        "timeout_then_ok": ([{"sleep": 2, "status": 500, "json": {}}], "done", None),
        "dropped_then_ok": ([{"drop": True}], "done", None),
        "always_failing": (
            [{"status": 503, "json": {}}] * 10,
            "dead",
            "retries_exhausted",
        ),
    }
    senders = {name: payloads.new_id() for name in cases}
    for name, (script, _, _) in cases.items():
        graph.script[senders[name]] = list(script)
    stack.start_worker()

    for sender in senders.values():
        assert stack.post(payloads.delivery(payloads.text_message(sender))) == 200

    assert wait_for(lambda: stack.all_final(len(cases)), seconds=90), stack.statuses()
    assert_each_event_ended_once(stack, graph, list(senders.values()))
    rows = {
        row["event_key"]: row
        for row in stack.query(
            "SELECT e.event_key, e.status, e.payload, e.send_uncertain, d.reason"
            " FROM webhook_events e LEFT JOIN dead_letter d USING (event_key)"
        )
    }
    by_sender = {
        next(r for r in rows.values() if s in r["payload"])["event_key"]: name
        for name, s in senders.items()
    }
    for key, name in by_sender.items():
        _, status, reason = cases[name]
        assert (rows[key]["status"], rows[key]["reason"]) == (status, reason), name
    uncertain = {name for key, name in by_sender.items() if rows[key]["send_uncertain"]}
    assert {"timeout_then_ok", "dropped_then_ok"} <= uncertain
    assert "server_error_then_ok" not in uncertain

    limited = graph.calls_to(senders["rate_limited_then_ok"])
    assert limited[1]["t"] - limited[0]["t"] >= 2
    assert [
        len(graph.calls_to(senders[n]))
        for n in ("token_expired", "person_unavailable", "outside_window")
    ] == [1, 1, 1]
    assert len(graph.calls_to(senders["always_failing"])) == 4


# -- the worker's threads ------------------------------------------------------


def thread_nice_values(pid):
    """The nice value of each thread of a process."""
    values = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            values.append(int(f.read().rpartition(")")[2].split()[16]))
    return values


def most_at_once(calls, seconds):
    """The most calls in flight together, each taken to last `seconds`."""
    starts = sorted(call["t"] for call in calls)
    return max(sum(1 for s in starts if s <= t < s + seconds) for t in starts)


def test_a_worker_with_three_threads_sends_three_at_once_and_stops_on_sigterm(
    tmp_path, graph
):
    stack = Stack(tmp_path, graph.url, WORKER_THREADS="3", WORKER_NICE="5")
    try:
        stack.start_redis()
        stack.start_web()
        worker = stack.start_worker()
        log = tmp_path / "worker0.log"
        assert wait_for(lambda: log.read_text().count("Listening on") == 3)
        # Every thread runs below the web, which answers Meta first.
        nice = min(os.getpriority(os.PRIO_PROCESS, 0) + 5, 19)
        assert set(thread_nice_values(worker.pid)) == {nice}
        senders = [payloads.new_id() for _ in range(6)]
        for sender in senders:
            graph.script[sender] = [{"sleep": 0.5}]

        batch = payloads.delivery(*(payloads.text_message(s) for s in senders))
        assert stack.post(batch) == 200

        assert wait_for(lambda: stack.all_final(6), seconds=30), stack.statuses()
        assert stack.statuses() == ["done"] * 6
        assert [len(graph.calls_to(s)) for s in senders] == [1] * 6
        assert most_at_once(graph.calls, 0.5) == 3
        # rq-dashboard shows one worker per thread.
        redis = Redis(port=stack.redis_port)
        assert len(Worker.all(connection=redis)) == 3

        asked = time.monotonic()
        worker.send_signal(signal.SIGTERM)

        assert worker.wait(10) == 0
        assert time.monotonic() - asked < 4  # idle threads look every second
        assert Worker.all(connection=redis) == []
        assert "worker stopped" in log.read_text()
    finally:
        stack.close()


def test_a_second_sigterm_stops_the_worker_without_waiting_for_its_jobs(
    tmp_path, graph
):
    stack = Stack(tmp_path, graph.url, GRAPH_TIMEOUT_SECONDS="30")
    try:
        stack.start_redis()
        stack.start_web()
        sender = payloads.new_id()
        graph.script[sender] = [{"sleep": 20}]  # a send that hangs
        worker = stack.start_worker()
        assert stack.post(payloads.delivery(payloads.text_message(sender))) == 200
        assert wait_for(lambda: graph.calls_to(sender))

        worker.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(1)  # the first one waits for the job in hand
        asked = time.monotonic()
        worker.send_signal(signal.SIGTERM)

        assert worker.wait(10) == 1
        assert time.monotonic() - asked < 3
        assert "stopping now" in stack.logs()
        assert stack.statuses() == ["queued"]  # the reconciler takes it up later
    finally:
        stack.close()


def test_sigterm_stops_a_worker_whose_redis_is_away(tmp_path, graph):
    stack = Stack(tmp_path, graph.url)
    try:
        stack.start_redis()
        worker = stack.start_worker()
        stack.stop_redis()
        assert wait_for(lambda: "could not connect to Redis" in stack.logs())

        asked = time.monotonic()
        worker.send_signal(signal.SIGTERM)

        assert worker.wait(8) == 0
        # No job in hand: the idle threads get worker.SIGN_OFF_SECONDS.
        assert time.monotonic() - asked < 6
        assert "worker stopped" in stack.logs()
    finally:
        stack.close()
