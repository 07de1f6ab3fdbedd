"""Configure logging for the service's entry points (web, worker, command line)."""

import json
import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and traceback)."""

    def format(self, record):
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def our_handler():
    """Return the handler configure() installed on the root logger, or None."""
    handlers = logging.getLogger().handlers
    return next((h for h in handlers if getattr(h, "ig_webhooks", False)), None)


def configure(level=None, fmt=None):
    """Send log lines to stderr at ``level`` in ``fmt`` ("text" or "json"), once.

    Both default to LOG_LEVEL and LOG_FORMAT, then INFO and text.
    """
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    fmt = (fmt or os.environ.get("LOG_FORMAT") or "text").lower()
    root = logging.getLogger()
    handler = our_handler()
    if handler is None:
        handler = logging.StreamHandler()
        handler.ig_webhooks = True
        root.addHandler(handler)
    handler.setFormatter(
        JSONFormatter() if fmt == "json" else logging.Formatter(FORMAT)
    )
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    # urllib3 logs full request lines at DEBUG; they never belong in our logs.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
