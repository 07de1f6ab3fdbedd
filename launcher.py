"""Start the service's processes (web, worker, Redis, dashboard) and watch them.

``python launcher.py`` is what ``./run.sh`` and the container run. It checks
the settings, creates the database, uses the Redis at REDIS_URL or starts a
private ``redis-server`` when nothing answers there on this machine, then
runs gunicorn, the worker and, when DASHBOARD_PASSWORD is set, rq-dashboard.
``python launcher.py web`` (gunicorn and the dashboard) and ``python
launcher.py worker`` run one part each, for docker-compose; they never start
a Redis. ``python launcher.py healthcheck`` exits 0 when the web server
answers GET /readyz.

On SIGTERM or SIGINT it stops the web first (no new deliveries, requests in
flight finish), lets the worker finish its current job, then stops Redis,
which saves its data, and exits 0, all within STOP_TIMEOUT_SECONDS. If a
process dies on its own, it stops the others (and whatever the dead one left
behind) and exits 1 with a line saying which one: never a half-alive service.
"""

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse

from redis import Redis
from redis.exceptions import RedisError

import logs
import settings as settings_module
from errors import ConfigError, StorageError
from storage import Store

log = logging.getLogger("launcher")

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "")
ROLES = ("all", "web", "worker", "healthcheck")
#: Stopping order: deliveries first, Redis last so nothing queued is lost.
STOP_ORDER = ("web", "dashboard", "worker", "redis")
#: Every process is stopped within this, inside the 30 s a container gets.
STOP_TIMEOUT_SECONDS = 26
#: Time kept for each process still to stop after the current one.
STOP_RESERVE_SECONDS = 2
#: What the container's health check asks for.
HEALTH_PATH = "/readyz"
HEALTHCHECK_TIMEOUT_SECONDS = 4


@dataclass(frozen=True)
class DashboardSettings:
    """Where rq-dashboard listens and the credentials it asks for."""

    username: str
    password: str
    host: str = "127.0.0.1"
    port: int = 9181


def dashboard_settings(env):
    """Return the dashboard's settings, or None when DASHBOARD_PASSWORD is unset.

    Raise ConfigError naming DASHBOARD_PORT when it is not a port number.
    """
    raw_port = (env.get("DASHBOARD_PORT") or "").strip()
    port = DashboardSettings.port
    if raw_port:
        if not (raw_port.isascii() and raw_port.isdigit()) or not (
            1 <= int(raw_port) <= 65535
        ):
            raise ConfigError(
                "DASHBOARD_PORT", f"expected a port from 1 to 65535, got {raw_port!r}"
            )
        port = int(raw_port)
    password = env.get("DASHBOARD_PASSWORD") or ""
    if not password.strip():
        return None
    return DashboardSettings(
        username=(env.get("DASHBOARD_USERNAME") or "").strip() or "admin",
        password=password,
        host=(env.get("DASHBOARD_HOST") or "").strip() or DashboardSettings.host,
        port=port,
    )


def redis_argv(server, port, data_dir):
    """Return the command of the private Redis: loopback only, append-only file."""
    return [
        server, "--port", str(port), "--bind", "127.0.0.1", "--dir", data_dir,
        "--appendonly", "yes", "--save", "", "--protected-mode", "yes",
    ]  # fmt: skip


def redis_answers(url):
    """Return True when a Redis server answers PING at url."""
    try:
        return bool(
            Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
        )
    except RedisError:
        return False


def port_is_free(host, port):
    """Return True when a server could listen on host:port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def describe_exit(code):
    """Say how a process ended, from its Popen return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"


def kill_leftovers(pgid):
    """SIGKILL what is left of a process group, such as RQ's scheduler."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Launcher:
    """The service's processes, started in order and stopped in order."""

    def __init__(self, settings, dashboard=None):
        self.settings = settings
        self.dashboard = dashboard
        self.procs = {}
        self.stopping = False

    def start_redis_if_needed(self):
        """Use the Redis at REDIS_URL, or start one if that is local and silent."""
        url = self.settings.redis_url
        if redis_answers(url):
            log.info("using the Redis server that answers at REDIS_URL")
            return
        parsed = urlparse(url)
        if parsed.scheme != "redis" or (parsed.hostname or "") not in LOCAL_HOSTS:
            raise SystemExit(
                f"error: no Redis answers at REDIS_URL ({parsed.hostname})"
            )
        server = shutil.which("redis-server")
        if not server:
            raise SystemExit(
                "error: no Redis answers at REDIS_URL and redis-server is not"
                " installed; install Redis or point REDIS_URL at one"
            )

        # Append-only file next to the database, so queued jobs survive a restart.
        data_dir = os.path.dirname(os.path.abspath(self.settings.database_path))
        os.makedirs(data_dir, exist_ok=True)
        port = str(parsed.port or 6379)
        log.info("no Redis at REDIS_URL; starting redis-server on port %s", port)
        self._spawn("redis", redis_argv(server, port, data_dir))
        deadline = time.monotonic() + 15
        while not redis_answers(url):
            if time.monotonic() > deadline or self.procs["redis"].poll() is not None:
                raise SystemExit("error: the private redis-server did not start")
            time.sleep(0.1)

    def start_web(self):
        """Start gunicorn."""
        self._spawn(
            "web", [sys.executable, "-m", "gunicorn", "webhook_app:create_app()"]
        )

    def start_worker(self):
        """Start WORKER_PROCESSES worker processes."""
        count = self.settings.worker_processes
        for number in range(1, count + 1):
            name = "worker" if count == 1 else f"worker-{number}"
            self._spawn(name, [sys.executable, os.path.join(HERE, "worker.py")])

    def start_dashboard(self):
        """Start rq-dashboard behind basic auth, if DASHBOARD_PASSWORD is set."""
        if self.dashboard is None:
            return
        # Credentials and the Redis URL (which may hold a password) go through
        # the environment, where ps does not show them.
        env = {
            **os.environ,
            "RQ_DASHBOARD_USERNAME": self.dashboard.username,
            "RQ_DASHBOARD_PASSWORD": self.dashboard.password,
            "RQ_DASHBOARD_REDIS_URL": self.settings.redis_url,
            "RQ_DASHBOARD_BIND": self.dashboard.host,
            "RQ_DASHBOARD_PORT": str(self.dashboard.port),
        }
        self._spawn("dashboard", [sys.executable, "-m", "rq_dashboard"], env=env)
        log.info(
            "rq-dashboard on %s:%d, user %s",
            self.dashboard.host,
            self.dashboard.port,
            self.dashboard.username,
        )

    def _spawn(self, name, argv, env=None):
        # A process group of its own: Ctrl-C reaches only this launcher, which
        # then stops the processes in order instead of all at once. Not a
        # session of its own: where the kernel groups processes by session
        # for the CPU (autogroup), nice only ranks processes of one session,
        # and the workers' niceness must rank them below the web.
        self.procs[name] = subprocess.Popen(argv, cwd=HERE, env=env, process_group=0)
        log.info("started %s (pid %d)", name, self.procs[name].pid)

    def watch(self):
        """Wait until asked to stop or a process dies; return the exit status."""
        while not self.stopping:
            for name, proc in self.procs.items():
                code = proc.poll()
                if code is not None:
                    log.error(
                        "%s exited on its own (%s); stopping the service",
                        name,
                        describe_exit(code),
                    )
                    kill_leftovers(proc.pid)
                    self.stop()
                    return 1
            time.sleep(0.2)
        self.stop()
        return 0

    def stop(self):
        """Stop web, dashboard, worker, then Redis, within STOP_TIMEOUT_SECONDS."""
        self.stopping = True
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        groups = [
            [name for name in self.procs if name.split("-")[0] == role]
            for role in STOP_ORDER
        ]
        groups = [group for group in groups if group]
        for i, group in enumerate(groups):
            # The processes of one part (the workers) stop side by side.
            procs = {name: self.procs.pop(name) for name in group}
            running = {name: p for name, p in procs.items() if p.poll() is None}
            for proc in running.values():
                proc.terminate()
            # Keep a little time for each part after this one.
            reserve = STOP_RESERVE_SECONDS * (len(groups) - i - 1)
            for name, proc in running.items():
                try:
                    proc.wait(max(1.0, deadline - time.monotonic() - reserve))
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop in time; killing it", name)
                    proc.kill()
                    proc.wait()
                log.info("%s stopped", name)
            for proc in procs.values():
                # Each process leads a group of its own (process_group=0).
                kill_leftovers(proc.pid)


def healthcheck(settings):
    """Return 0 when the web server answers GET HEALTH_PATH with 200, else 1."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{settings.port}{HEALTH_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=HEALTHCHECK_TIMEOUT_SECONDS) as r:
            if r.status == 200:
                return 0
            problem = f"status {r.status}"
    except OSError as exc:
        problem = type(exc).__name__
    print(f"unhealthy: GET {url} failed ({problem})", file=sys.stderr)
    return 1


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Run the Instagram webhook service and stop it cleanly."
    )
    parser.add_argument(
        "role",
        nargs="?",
        default="all",
        choices=ROLES,
        help="all (default): web, worker, dashboard, and Redis if none answers;"
        " web (with the dashboard) or worker: that part alone, for"
        " docker-compose; healthcheck: exit 0 when GET /readyz answers 200",
    )
    return parser.parse_args(argv)


def main(argv=None):
    role = parse_args(argv).role
    os.chdir(HERE)
    try:
        settings = settings_module.load()
        if role == "healthcheck":
            return healthcheck(settings)
        if role != "web":
            settings.require_worker_settings()
        dashboard = dashboard_settings(os.environ) if role != "worker" else None
        logs.configure(settings.log_level)
        Store(settings.database_path).init_schema()
    except ConfigError as exc:
        print(f"configuration error: {exc} (see .env.example)", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 2

    if role != "worker" and not port_is_free(settings.host, settings.port):
        print(
            f"error: port {settings.port} is in use; is the service already running?"
            " (set PORT to use another)",
            file=sys.stderr,
        )
        return 1
    if dashboard and not port_is_free(dashboard.host, dashboard.port):
        print(
            f"error: DASHBOARD_PORT {dashboard.port} is in use"
            " (set DASHBOARD_PORT to use another)",
            file=sys.stderr,
        )
        return 1

    launcher = Launcher(settings, dashboard)
    signal.signal(signal.SIGTERM, lambda *_: setattr(launcher, "stopping", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(launcher, "stopping", True))
    try:
        if role == "all":
            launcher.start_redis_if_needed()
        if role in ("all", "web"):
            launcher.start_web()
            launcher.start_dashboard()
        if role in ("all", "worker"):
            launcher.start_worker()
        return launcher.watch()
    except SystemExit as exc:
        launcher.stop()
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
