"""Start the whole service (web, worker and, when needed, Redis) and watch it.

``python launcher.py`` is what ``./run.sh`` and the container run. It checks
the settings, creates the database, uses the Redis at REDIS_URL or starts a
private ``redis-server`` when nothing answers there on this machine, then
runs gunicorn and the worker.

On SIGTERM or SIGINT it stops the web first (no new deliveries), lets the
worker finish its current job, then stops Redis, which saves its data, and
exits 0. If a process dies on its own, it stops the others and exits 1 with a
line saying which one: never a half-alive service.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

from redis import Redis
from redis.exceptions import RedisError

import logs
import settings as settings_module
from errors import ConfigError, StorageError
from storage import Store

log = logging.getLogger("launcher")

HERE = os.path.dirname(os.path.abspath(__file__))
STOP_TIMEOUT_SECONDS = 25
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "")


def redis_answers(url):
    """Return True when a Redis server answers PING at url."""
    try:
        return bool(
            Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
        )
    except RedisError:
        return False


def port_is_free(host, port):
    """Return True when the web server could listen on host:port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Launcher:
    """The service's processes, started in order and stopped in reverse."""

    def __init__(self, settings):
        self.settings = settings
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
        self._spawn(
            "redis",
            [
                server,
                "--port",
                port,
                "--bind",
                "127.0.0.1",
                "--dir",
                data_dir,
                "--appendonly",
                "yes",
                "--save",
                "",
                "--protected-mode",
                "yes",
            ],
        )
        deadline = time.monotonic() + 15
        while not redis_answers(url):
            if time.monotonic() > deadline or self.procs["redis"].poll() is not None:
                raise SystemExit("error: the private redis-server did not start")
            time.sleep(0.1)

    def start_app(self):
        """Start gunicorn and the worker."""
        self._spawn(
            "web", [sys.executable, "-m", "gunicorn", "webhook_app:create_app()"]
        )
        self._spawn("worker", [sys.executable, os.path.join(HERE, "worker.py")])

    def _spawn(self, name, argv):
        # A session of its own: Ctrl-C reaches only this launcher, which then
        # stops the processes in order instead of all at once.
        self.procs[name] = subprocess.Popen(argv, cwd=HERE, start_new_session=True)
        log.info("started %s (pid %d)", name, self.procs[name].pid)

    def watch(self):
        """Wait until asked to stop or a process dies; return the exit status."""
        while not self.stopping:
            for name, proc in self.procs.items():
                code = proc.poll()
                if code is not None:
                    log.error(
                        "%s exited on its own with status %s; stopping the service",
                        name,
                        code,
                    )
                    self.stop()
                    return 1
            time.sleep(0.2)
        self.stop()
        return 0

    def stop(self, *_):
        """Stop web, then worker, then Redis, each given time to finish."""
        self.stopping = True
        for name in ("web", "worker", "redis"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                log.error(
                    "%s did not stop in %ds; killing it", name, STOP_TIMEOUT_SECONDS
                )
                proc.kill()
                proc.wait()
            log.info("%s stopped", name)


def main():
    os.chdir(HERE)
    try:
        settings = settings_module.load()
        settings.require_worker_settings()
        logs.configure(settings.log_level)
        Store(settings.database_path).init_schema()
    except ConfigError as exc:
        print(f"configuration error: {exc} (see .env.example)", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 2

    if not port_is_free(settings.host, settings.port):
        print(
            f"error: port {settings.port} is in use; is the service already running?"
            " (set PORT to use another)",
            file=sys.stderr,
        )
        return 1

    launcher = Launcher(settings)
    signal.signal(signal.SIGTERM, lambda *_: setattr(launcher, "stopping", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(launcher, "stopping", True))
    try:
        launcher.start_redis_if_needed()
        launcher.start_app()
        return launcher.watch()
    except SystemExit as exc:
        launcher.stop()
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
