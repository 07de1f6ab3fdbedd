"""Gunicorn settings: check the configuration once, before any worker starts."""

import sys

import logs
import settings
from errors import ConfigError

try:
    _settings = settings.load()
except ConfigError as exc:
    # One line naming the setting, instead of a traceback from every worker.
    print(f"configuration error: {exc}", file=sys.stderr)
    sys.exit(2)
logs.configure(_settings.log_level, _settings.log_format)

bind = f"{_settings.host}:{_settings.port}"
workers = 2
# Deliveries are answered in milliseconds; a request that takes longer than
# this is stuck, and Meta has long given up on it.
timeout = 30
graceful_timeout = 20
accesslog = None
# No control socket: several instances may share a home folder, or have none.
control_socket_disable = True


def post_worker_init(worker):
    """Checkpoint SQLite's write-ahead log in the background of each worker."""
    store = getattr(worker.wsgi, "extensions", {}).get("store")
    if store is not None:  # bench/ceiling_app.py, served with this file, has none
        store.start_checkpoints(web=True)
