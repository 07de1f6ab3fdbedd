"""The service as a user runs it: launcher.py starts Redis, gunicorn and the worker."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request

import payloads
import pytest
from conftest import free_port, wait_for
from graph_stub import GraphStub

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def service_env(tmp_path, graph_url, **extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("IG_", "GRAPH_", "REDIS_", "DATABASE_", "REPLY_", "RETRY_")
        )
    }
    env.update(
        {
            "ENV_FILE": str(tmp_path / "no.env"),
            "IG_APP_SECRET": payloads.APP_SECRET,
            "IG_VERIFY_TOKEN": payloads.VERIFY_TOKEN,
            "IG_ACCESS_TOKEN": payloads.ACCESS_TOKEN,
            "IG_ACCOUNT_ID": payloads.ACCOUNT_ID,
            "GRAPH_API_BASE": graph_url,
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "DATABASE_PATH": str(tmp_path / "data" / "webhooks.db"),
            "HOST": "127.0.0.1",
            "PORT": str(free_port()),
            "REPLY_COOLDOWN_SECONDS": "0",
            "RETRY_DELAYS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class Service:
    """launcher.py as a process, with its log and database at hand."""

    def __init__(self, tmp_path, env):
        self.env = env
        self.url = f"http://127.0.0.1:{env['PORT']}"
        self.db_path = env["DATABASE_PATH"]
        self.log_path = tmp_path / "service.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(PROJECT, "launcher.py")],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if not wait_for(self._up, seconds=30):
            self.stop()
            pytest.fail("service did not start:\n" + self.output())

    def _up(self):
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def post(self, raw):
        return payloads.post_signed(self.url, raw)

    def statuses(self):
        with sqlite3.connect(self.db_path) as db:
            return [row[0] for row in db.execute("SELECT status FROM webhook_events")]

    def pid_of(self, name):
        return int(re.search(rf"started {name} \(pid (\d+)\)", self.output()).group(1))

    def worker_names(self):
        """Names of the worker processes the launcher started, in order."""
        return re.findall(r"started (worker(?:-\d+)?) \(pid", self.output())

    def output(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(40)
        self.log.close()


@pytest.fixture
def graph():
    with GraphStub() as stub:
        yield stub


@pytest.fixture
def service(tmp_path, graph):
    svc = Service(tmp_path, service_env(tmp_path, graph.url))
    yield svc
    svc.stop()


def test_direct_message_gets_exactly_one_reply(service, graph):
    sender = payloads.new_id()
    raw = payloads.meta_escaped(
        payloads.delivery(payloads.text_message(sender, "Café? https://x.example/y"))
    )

    assert service.post(raw) == 200
    assert service.post(raw) == 200
    calls = wait_for(lambda: graph.calls_to(sender))
    wait_for(lambda: service.statuses() == ["done"])

    assert len(calls) == 1
    assert calls[0]["path"] == f"/v24.0/{payloads.ACCOUNT_ID}/messages"
    assert calls[0]["authorization"] == f"Bearer {payloads.ACCESS_TOKEN}"
    assert service.statuses() == ["done"]
    assert "Café" not in service.output() and sender not in service.output()


def test_batch_with_a_failing_recipient_ends_replied_ignored_and_dead(service, graph):
    happy, gone = payloads.new_id(), payloads.new_id()
    graph.script[gone] = [
        {"status": 400, "json": {"error": {"code": 551, "message": "not available"}}}
    ]
    batch = payloads.delivery(
        payloads.text_message(happy),
        payloads.text_message(gone),
        payloads.echo(happy),
    )

    assert service.post(payloads.body(batch)) == 200
    wait_for(lambda: sorted(service.statuses()) == ["dead", "done", "ignored"])

    assert sorted(service.statuses()) == ["dead", "done", "ignored"]
    assert len(graph.calls_to(happy)) == 1 and len(graph.calls_to(gone)) == 1
    with sqlite3.connect(service.db_path) as db:
        assert db.execute("SELECT reason FROM dead_letter").fetchall() == [
            ("recipient_unavailable",)
        ]


def test_sigterm_stops_every_process_and_exits_0(service):
    workers = service.worker_names()
    assert workers == ["worker-1", "worker-2", "worker-3"]  # WORKER_PROCESSES=3
    pids = [service.pid_of(name) for name in ("redis", "web", *workers)]

    service.proc.send_signal(signal.SIGTERM)

    assert service.proc.wait(30) == 0
    assert not [pid for pid in pids if _alive(pid)]
    for name in ("redis", *workers):
        assert f"{name} stopped" in service.output()


def test_a_dying_worker_takes_the_service_down_with_a_reason(service):
    others = [
        service.pid_of(name)
        for name in ("redis", "web", *service.worker_names())
        if name != "worker-2"
    ]

    os.kill(service.pid_of("worker-2"), signal.SIGKILL)

    assert service.proc.wait(30) == 1
    [line] = [
        line for line in service.output().splitlines() if "exited on its own" in line
    ]
    assert "worker-2 exited on its own" in line and "SIGKILL" in line
    assert not service._up()
    assert not [pid for pid in others if _alive(pid)]


def test_a_single_worker_process_is_called_worker(tmp_path, graph):
    env = service_env(tmp_path, graph.url, WORKER_PROCESSES="1")
    service = Service(tmp_path, env)
    try:
        assert service.worker_names() == ["worker"]
        sender = payloads.new_id()
        raw = payloads.body(payloads.delivery(payloads.text_message(sender)))

        assert service.post(raw) == 200
        assert wait_for(lambda: service.statuses() == ["done"])
        assert len(graph.successes_to(sender)) == 1

        os.kill(service.pid_of("worker"), signal.SIGKILL)
        assert service.proc.wait(30) == 1
    finally:
        service.stop()
    assert "worker exited on its own" in service.output()


def test_worker_burst_works_the_queue_empty_and_exits(env, post, graph):
    senders = [payloads.new_id() for _ in range(3)]
    for sender in senders:
        assert post(payloads.delivery(payloads.text_message(sender))).status_code == 200

    burst = subprocess.run(
        [sys.executable, "worker.py", "--burst"],
        cwd=PROJECT,
        env={**os.environ, "GRAPH_API_BASE": graph.url},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert burst.returncode == 0, burst.stderr
    assert [len(graph.calls_to(sender)) for sender in senders] == [1, 1, 1]
    with sqlite3.connect(env["DATABASE_PATH"]) as db:
        statuses = [row[0] for row in db.execute("SELECT status FROM webhook_events")]
    assert statuses == ["done"] * 3


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "launcher.py"],
        [sys.executable, "worker.py"],
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-b",
            "127.0.0.1:0",
            "webhook_app:create_app()",
        ],
    ],
    ids=["launcher", "worker", "gunicorn"],
)
def test_missing_setting_stops_start_up_with_one_line(tmp_path, argv):
    env = service_env(tmp_path, "http://127.0.0.1:9")
    del env["IG_VERIFY_TOKEN"]

    result = subprocess.run(
        argv, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 2
    assert "IG_VERIFY_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "argv, name, value",
    [
        ([sys.executable, "worker.py"], "WORKER_THREADS", "65"),
        ([sys.executable, "worker.py"], "WORKER_NICE", "20"),
        ([sys.executable, "launcher.py"], "WORKER_PROCESSES", "0"),
    ],
    ids=["worker-threads", "worker-nice", "launcher-processes"],
)
def test_a_bad_worker_setting_stops_start_up_with_one_line(tmp_path, argv, name, value):
    env = service_env(tmp_path, "http://127.0.0.1:9", **{name: value})

    result = subprocess.run(
        argv, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert name in result.stderr and value in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_second_launcher_on_a_busy_port_says_so(service, tmp_path):
    result = subprocess.run(
        [sys.executable, "launcher.py"],
        cwd=PROJECT,
        env=service.env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert f"port {service.env['PORT']} is in use" in result.stderr
    assert service._up()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for its parent counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
