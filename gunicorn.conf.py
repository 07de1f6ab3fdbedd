"""Gunicorn settings: check the configuration once, before any worker starts."""

import os
import sys

import logs
import settings
from errors import ConfigError

bind = "0.0.0.0:" + os.environ.get("PORT", "8000")
workers = 2
# Deliveries are answered in milliseconds; a request that takes longer than
# this is stuck, and Meta has long given up on it.
timeout = 30
graceful_timeout = 20
accesslog = None
# No control socket: several instances may share a home folder, or have none.
control_socket_disable = True


def on_starting(server):
    """Stop start-up with one line naming a bad setting, not a traceback."""
    logs.configure()
    try:
        settings.load()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
