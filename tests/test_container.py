"""The container's start-up path: launcher.py run with the Dockerfile's settings.

No Docker engine runs here, so the tests run what the image runs (``python
launcher.py``) with the image's environment, its /data folder swapped for a
temporary one, and check the Dockerfile, compose file and README for what
they promise.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode

import payloads
import pytest
from conftest import free_port, throwaway_redis_argv, wait_for
from graph_stub import GraphStub
from test_end_to_end import PROJECT, Service, _alive, service_env

import launcher

DOCKERFILE = os.path.join(PROJECT, "Dockerfile")
COMPOSE_FILE = os.path.join(PROJECT, "docker-compose.yml")
README = os.path.join(PROJECT, "README.md")


def dockerfile():
    """Return the Dockerfile's instructions as (NAME, arguments), lines joined."""
    with open(DOCKERFILE) as f:
        text = re.sub(r"\\\n", " ", f.read())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, args = line.partition(" ")
            instructions.append((name.upper(), " ".join(args.split())))
    return instructions


def image_env():
    """Return the variables the Dockerfile's ENV instructions set."""
    env = {}
    for name, args in dockerfile():
        if name == "ENV":
            env.update(part.split("=", 1) for part in args.split())
    return env


def container_env(tmp_path, graph_url, **extra):
    """The image's environment, with /data in tmp_path and every port on loopback."""
    env = {
        k: v
        for k, v in service_env(tmp_path, graph_url).items()
        if not k.startswith(("DASHBOARD_", "RQ_DASHBOARD_"))
    }
    data = str(tmp_path / "data")
    env.update({k: v.replace("/data", data, 1) for k, v in image_env().items()})
    env.update(HOST="127.0.0.1", DASHBOARD_HOST="127.0.0.1")
    env.update(extra)
    return env


def deliver(url, sender):
    """Post one signed direct message from sender; return the status, or None."""
    raw = payloads.body(payloads.delivery(payloads.text_message(sender)))
    try:
        return payloads.post_signed(url, raw)
    except OSError:  # refused or cut off: the service is stopping
        return None


def http_status(url, auth=None):
    request = urllib.request.Request(url)
    if auth:
        token = b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def group_members(pgid):
    """Return the live (not zombie) processes of process group pgid."""
    members = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        if entry.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


@pytest.fixture
def graph():
    with GraphStub() as stub:
        yield stub


# -- the launcher as the container runs it -----------------------------------


def test_container_command_replies_and_keeps_redis_data_in_the_data_folder(
    tmp_path, graph
):
    dashboard_port = free_port()
    service = Service(
        tmp_path,
        container_env(tmp_path, graph.url, DASHBOARD_PORT=str(dashboard_port)),
    )
    try:
        sender = payloads.new_id()

        assert deliver(service.url, sender) == 200
        assert wait_for(lambda: service.statuses() == ["done"], seconds=30)

        assert len(graph.successes_to(sender)) == 1
        assert service.db_path == str(tmp_path / "data" / "webhooks.db")
        assert [p for p in (tmp_path / "data").iterdir() if "appendonly" in p.name]
        # No DASHBOARD_PASSWORD, no dashboard.
        assert "started dashboard" not in service.output()
        assert http_status(f"http://127.0.0.1:{dashboard_port}/") is None
    finally:
        service.stop()


def test_sigterm_in_a_burst_exits_0_and_a_restart_handles_every_event(tmp_path, graph):
    # The default stale time is far longer than this test: events queued at
    # the stop can only be done in time if Redis's append-only file kept them.
    env = container_env(tmp_path, graph.url, QUEUED_STALE_SECONDS="300")
    senders = [payloads.new_id() for _ in range(60)]
    for sender in senders:
        # Twelve sends at a time (3 processes x 4 threads) at a second each:
        # fewer than arrive, so the queue grows during the burst.
        graph.script[sender] = [{"sleep": 1.0}]
    first = Service(tmp_path, env)
    answers = {}
    thread = threading.Thread(target=lambda: burst(first.url, senders, answers))
    try:
        workers = first.worker_names()
        assert workers == ["worker-1", "worker-2", "worker-3"]
        pids = [first.pid_of(name) for name in ("redis", "web", *workers)]
        thread.start()
        assert wait_for(lambda: len(answers) >= 20, seconds=30)
        asked = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)

        assert first.proc.wait(30) == 0
        assert time.monotonic() - asked < 30
    finally:
        if thread.ident:
            thread.join(30)
        first.stop()
    assert not [pid for pid in pids if _alive(pid) or group_members(pid)]
    assert "redis stopped" in first.output()
    assert "did not stop in time" not in first.output()
    assert set(answers.values()) <= {200, None}
    delivered = [sender for sender in senders if answers[sender] == 200]
    assert len(delivered) >= 20
    assert "queued" in first.statuses()

    graph.script.clear()
    (tmp_path / "second").mkdir()
    second = Service(tmp_path / "second", env)
    try:
        assert wait_for(
            lambda: (
                set(second.statuses()) == {"done"}
                and len(second.statuses()) >= len(delivered)
            ),
            seconds=60,
        ), second.statuses()
    finally:
        second.stop()
    assert [len(graph.successes_to(s)) for s in delivered] == [1] * len(delivered)
    assert all(len(graph.successes_to(s)) <= 1 for s in senders)
    with sqlite3.connect(first.db_path) as db:
        uncertain = db.execute("SELECT SUM(send_uncertain) FROM webhook_events")
        assert not uncertain.fetchone()[0]  # the job in hand was finished


def burst(url, senders, answers):
    """Deliver one message per sender, about 2 s in all; note each answer."""
    for sender in senders:
        answers[sender] = deliver(url, sender)
        time.sleep(0.02)


def test_a_killed_worker_stops_the_container_with_a_line_naming_it(tmp_path, graph):
    service = Service(tmp_path, container_env(tmp_path, graph.url))
    try:
        workers = {name: service.pid_of(name) for name in service.worker_names()}
        others = [service.pid_of(name) for name in ("redis", "web")]
        # Kill the one whose RQ scheduler runs in a child process of its own.
        assert wait_for(
            lambda: [n for n, pid in workers.items() if len(group_members(pid)) > 1],
            seconds=30,
        )
        [name] = [n for n, pid in workers.items() if len(group_members(pid)) > 1]

        os.kill(workers[name], signal.SIGKILL)

        assert service.proc.wait(30) == 1
    finally:
        service.stop()
    assert not [pid for pid in workers.values() if group_members(pid)]
    lines = [
        line for line in service.output().splitlines() if "exited on its own" in line
    ]
    assert len(lines) == 1
    assert f"{name} exited on its own" in lines[0] and "SIGKILL" in lines[0]
    assert not [pid for pid in others if _alive(pid)]


def test_dashboard_needs_the_password_which_stays_out_of_ps_and_logs(tmp_path, graph):
    port = free_port()
    password = "dash-Pw-5e1f9c"
    service = Service(
        tmp_path,
        container_env(
            tmp_path,
            graph.url,
            DASHBOARD_PASSWORD=password,
            DASHBOARD_PORT=str(port),
        ),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: http_status(url + "/") == 401, seconds=30)

        assert http_status(url + "/", ("admin", password)) == 200
        assert http_status(url + "/0/data/queues.json", ("admin", password)) == 200
        assert http_status(url + "/0/data/queues.json") == 401
        assert http_status(url + "/", ("admin", "wrong")) == 401
        assert http_status(url + "/", ("root", password)) == 401
        with open(f"/proc/{service.pid_of('dashboard')}/cmdline", "rb") as f:
            assert password.encode() not in f.read()
    finally:
        service.stop()
    assert password not in service.output()
    assert "dashboard stopped" in service.output()


def test_stop_keeps_to_its_budget_and_leaves_redis_time_to_save(monkeypatch, caplog):
    monkeypatch.setattr(launcher, "STOP_TIMEOUT_SECONDS", 4)
    monkeypatch.setattr(launcher, "STOP_RESERVE_SECONDS", 1.5)
    stuck = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    service = launcher.Launcher(settings=None)
    service._spawn("worker", [sys.executable, "-c", stuck + "; time.sleep(60)"])
    service._spawn("redis", [sys.executable, "-c", "import time; time.sleep(60)"])
    procs = dict(service.procs)
    time.sleep(0.5)  # the stuck one has set its handler
    started = time.monotonic()

    service.stop()

    assert time.monotonic() - started < 4
    assert procs["worker"].returncode == -signal.SIGKILL
    assert procs["redis"].returncode == -signal.SIGTERM
    assert "worker did not stop in time" in caplog.text


@pytest.mark.parametrize("port", ["abc", "0", "65536", "-1", "9181.5"])
def test_a_bad_dashboard_port_stops_start_up_with_one_line(tmp_path, port):
    env = container_env(
        tmp_path, "http://127.0.0.1:9", DASHBOARD_PASSWORD="x", DASHBOARD_PORT=port
    )

    result = subprocess.run(
        [sys.executable, "launcher.py"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "DASHBOARD_PORT" in result.stderr and repr(port) in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"DASHBOARD_PASSWORD": "  "}, None),
        (
            {"DASHBOARD_PASSWORD": "pw"},
            launcher.DashboardSettings("admin", "pw", "127.0.0.1", 9181),
        ),
        (
            {
                "DASHBOARD_PASSWORD": "pw",
                "DASHBOARD_USERNAME": "ops",
                "DASHBOARD_HOST": "0.0.0.0",
                "DASHBOARD_PORT": "9000",
            },
            launcher.DashboardSettings("ops", "pw", "0.0.0.0", 9000),
        ),
    ],
)
def test_dashboard_settings(env, expected):
    assert launcher.dashboard_settings(env) == expected


# -- the parts one at a time, as docker-compose runs them --------------------


def test_web_and_worker_roles_share_one_redis_as_in_compose(tmp_path, graph):
    redis_port = free_port()
    env = container_env(
        tmp_path, graph.url, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0"
    )
    redis = subprocess.Popen(
        throwaway_redis_argv(redis_port),
        stdout=subprocess.DEVNULL,
    )
    procs, logs = {}, {}
    for name in ("web", "worker", "worker2"):
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "launcher.py", name.rstrip("2")],
                cwd=PROJECT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    url = f"http://127.0.0.1:{env['PORT']}"

    def statuses():
        with sqlite3.connect(env["DATABASE_PATH"]) as db:
            return [row[0] for row in db.execute("SELECT status FROM webhook_events")]

    try:
        assert wait_for(lambda: http_status(url + "/healthz") == 200, seconds=30)
        health = [sys.executable, "launcher.py", "healthcheck"]
        assert subprocess.run(health, cwd=PROJECT, env=env, timeout=30).returncode == 0
        senders = [payloads.new_id() for _ in range(4)]

        assert [deliver(url, sender) for sender in senders] == [200] * 4
        assert wait_for(lambda: statuses() == ["done"] * 4, seconds=30)

        assert [len(graph.successes_to(s)) for s in senders] == [1] * 4
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(30) for proc in procs.values()] == [0, 0, 0]
        unhealthy = subprocess.run(
            health, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=30
        )
        assert unhealthy.returncode == 1 and "unhealthy" in unhealthy.stderr
    finally:
        for proc in [*procs.values(), redis]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    web_log, worker_log = logs["web"].read_text(), logs["worker"].read_text()
    assert "started web" in web_log and "started worker" not in web_log
    assert "started worker" in worker_log and "started web" not in worker_log
    assert "started redis" not in web_log + worker_log


# -- what the image and the README promise ------------------------------------


def test_dockerfile_runs_the_launcher_as_a_user_with_data_on_a_volume():
    instructions = dockerfile()
    last = {name: args for name, args in instructions}

    assert re.fullmatch(r"python:3\.1\d-slim", last["FROM"])
    assert last["USER"].split(":")[0] not in ("root", "0")
    assert "8000" in last["EXPOSE"].split()
    assert "/healthz" in last["HEALTHCHECK"] or "launcher.py healthcheck" in " ".join(
        json.loads(last["HEALTHCHECK"].partition("CMD")[2])
    )
    assert json.loads(last["ENTRYPOINT"]) == ["tini", "--"]
    assert json.loads(last["CMD"]) == ["python", "launcher.py"]
    assert json.loads(last["VOLUME"]) == ["/data"]
    assert image_env()["DATABASE_PATH"] == "/data/webhooks.db"
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert "redis-server" in runs and "-r requirements.txt" in runs


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image():
    with open(os.path.join(PROJECT, ".dockerignore")) as f:
        ignored = {line.strip() for line in f if not line.startswith("#")}

    assert {".env", ".venv", ".git", "data"} <= ignored


def test_compose_runs_each_part_of_the_same_image_with_a_known_role():
    with open(COMPOSE_FILE) as f:
        compose = f.read()

    roles = re.findall(r'"launcher\.py", "(\w+)"', compose)
    assert sorted(roles) == ["web", "worker"]
    assert "--appendonly" in compose and "redis-server" in compose


def test_readme_shows_the_one_docker_run_before_the_limitations():
    with open(README) as f:
        readme = f.read()
    section = readme.split("## Deployment with Docker", 1)[1].split("\n## ", 1)[0]

    assert readme.index("## Deployment with Docker") < readme.index("## Limitations")
    assert "docker run -p 8000:8000 --env-file .env -v ig-data:/data" in section
    assert "docker build -t" in section and "docker-compose.yml" in section
    assert "DASHBOARD_PASSWORD" in section and "SIGTERM" in section
    assert "no Docker image" not in readme
