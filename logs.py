"""Configure logging for the service's entry points (web, worker, command line)."""

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level=None):
    """Send log lines to stderr at ``level`` (default: LOG_LEVEL or INFO), once."""
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    # urllib3 logs full request lines at DEBUG; they never belong in our logs.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
