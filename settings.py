"""Read the service's settings from the environment (or a .env file) once."""

import math
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

import rules
from errors import ConfigError

DEFAULT_REPLY = "Thanks for your message! We'll get back to you soon."
DEFAULT_RETRY_DELAYS = (10, 30, 60, 300, 900, 1800, 3600)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: More threads than this in one process only wait on each other for the GIL.
MAX_WORKER_THREADS = 64


@dataclass(frozen=True)
class Settings:
    """Every setting the web app and the worker share, already checked."""

    #: App secrets; a delivery signed with any of them passes (rotation).
    app_secrets: tuple[str, ...]
    #: Token Meta's dashboard sends back in the verification handshake.
    verify_token: str
    #: Instagram access token; only the worker needs it.
    access_token: str = ""
    #: The business account's id: Send API path and echo detection.
    account_id: str = ""
    graph_api_base: str = "https://graph.instagram.com"
    graph_api_version: str = "v24.0"
    graph_timeout_seconds: float = 10.0
    redis_url: str = "redis://localhost:6379/0"
    database_path: str = "data/webhooks.db"
    #: Default reply to a direct message; empty switches default replies off.
    auto_reply_text: str = DEFAULT_REPLY
    #: At most one default reply per sender within this many seconds.
    reply_cooldown_seconds: int = 3600
    #: Seconds to wait before each retry; one retry per value.
    retry_delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS
    #: Largest delivery body accepted, in bytes.
    max_body_bytes: int = 8 * 1024 * 1024
    #: JSON file of keyword rules, and the rules read from it at start-up.
    reply_rules_file: str = ""
    reply_rules: tuple = ()
    #: At most this many Send API calls per second, whole service; 0: no limit.
    send_rate_per_second: int = 100
    #: Worker processes launcher.py starts, and the jobs each runs at once,
    #: one per thread (see worker.py for why these numbers).
    worker_processes: int = 3
    worker_threads: int = 4
    #: Niceness the worker processes run at: the web answers Meta first.
    worker_nice: int = 19
    #: While events arrive faster than this (per second), workers take no
    #: new jobs and leave the CPU to the web; 0: never pause.
    flood_events_per_second: int = 1000
    #: Retry a send whose outcome is unknown (it may have gone out).
    retry_uncertain_sends: bool = True
    #: A queued event untouched this long past its due time is queued again.
    queued_stale_seconds: int = 300
    #: Name of the RQ queue that carries event keys.
    queue_name: str = "instagram-events"
    #: Address and port the web server listens on.
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "INFO"
    #: "text" or "json" log lines.
    log_format: str = "text"
    #: When set, /metrics asks for "Authorization: Bearer METRICS_TOKEN".
    metrics_token: str = ""

    def require_worker_settings(self):
        """Raise ConfigError unless the settings the worker needs are set."""
        if not self.access_token:
            raise ConfigError(
                "IG_ACCESS_TOKEN", "is required by the worker and is not set"
            )
        if not self.account_id:
            raise ConfigError(
                "IG_ACCOUNT_ID", "is required by the worker and is not set"
            )


def _required(env, name):
    value = (env.get(name) or "").strip()
    if not value:
        raise ConfigError(name, "is required and is not set")
    return value


def _number(env, name, default, kind=int, minimum=0):
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(name, f"expected at least {minimum}, got {raw!r}")
    return value


def _delays(env, name, default):
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        delays = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(
            name, f"expected whole seconds separated by commas, got {raw!r}"
        ) from None
    if any(d < 0 for d in delays):
        raise ConfigError(name, f"expected no negative delays, got {raw!r}")
    return delays


def _url(env, name, default, schemes):
    value = (env.get(name) or "").strip() or default
    if not value.startswith(schemes):
        raise ConfigError(name, f"expected a URL starting with {' or '.join(schemes)}")
    try:
        urlsplit(value).port  # noqa: B018 - reading it checks the port's range
    except ValueError:
        raise ConfigError(name, "expected a port from 1 to 65535 in the URL") from None
    return value.rstrip("/")


def from_env(env=None):
    """Build Settings from a mapping of environment variables.

    Raise ConfigError naming the first setting that is missing or malformed.
    """
    env = os.environ if env is None else env
    secrets = tuple(s.strip() for s in _required(env, "IG_APP_SECRET").split(","))
    if not all(secrets):
        raise ConfigError(
            "IG_APP_SECRET", "expected comma-separated secrets, got an empty one"
        )
    account_id = (env.get("IG_ACCOUNT_ID") or "").strip()
    if account_id and not (account_id.isascii() and account_id.isdigit()):
        raise ConfigError("IG_ACCOUNT_ID", "expected the account's numeric id")
    reply = env.get("AUTO_REPLY_TEXT")
    rules_file = (env.get("REPLY_RULES_FILE") or "").strip()

    return Settings(
        app_secrets=secrets,
        verify_token=_required(env, "IG_VERIFY_TOKEN"),
        access_token=(env.get("IG_ACCESS_TOKEN") or "").strip(),
        account_id=account_id,
        graph_api_base=_url(
            env, "GRAPH_API_BASE", Settings.graph_api_base, ("https://", "http://")
        ),
        graph_api_version=(env.get("GRAPH_API_VERSION") or "").strip()
        or Settings.graph_api_version,
        graph_timeout_seconds=_number(
            env, "GRAPH_TIMEOUT_SECONDS", Settings.graph_timeout_seconds, float, 0.1
        ),
        redis_url=_url(
            env, "REDIS_URL", Settings.redis_url, ("redis://", "rediss://", "unix://")
        ),
        database_path=(env.get("DATABASE_PATH") or "").strip()
        or Settings.database_path,
        auto_reply_text=DEFAULT_REPLY if reply is None else reply.strip(),
        reply_cooldown_seconds=_number(
            env, "REPLY_COOLDOWN_SECONDS", Settings.reply_cooldown_seconds
        ),
        retry_delays=_delays(env, "RETRY_DELAYS", DEFAULT_RETRY_DELAYS),
        max_body_bytes=_number(
            env, "MAX_BODY_BYTES", Settings.max_body_bytes, minimum=1024
        ),
        reply_rules_file=rules_file,
        reply_rules=rules.load_rules(rules_file) if rules_file else (),
        send_rate_per_second=_number(
            env, "SEND_RATE_PER_SECOND", Settings.send_rate_per_second
        ),
        worker_processes=_number(
            env, "WORKER_PROCESSES", Settings.worker_processes, minimum=1
        ),
        worker_threads=_worker_threads(env),
        worker_nice=_worker_nice(env),
        flood_events_per_second=_number(
            env, "FLOOD_EVENTS_PER_SECOND", Settings.flood_events_per_second
        ),
        retry_uncertain_sends=_flag(
            env, "RETRY_UNCERTAIN_SENDS", Settings.retry_uncertain_sends
        ),
        queued_stale_seconds=_number(
            env, "QUEUED_STALE_SECONDS", Settings.queued_stale_seconds, minimum=5
        ),
        queue_name=(env.get("RQ_QUEUE") or "").strip() or Settings.queue_name,
        host=(env.get("HOST") or "").strip() or Settings.host,
        port=_port(env),
        log_level=_log_level(env),
        log_format=_choice(env, "LOG_FORMAT", ("text", "json"), Settings.log_format),
        metrics_token=(env.get("METRICS_TOKEN") or "").strip(),
    )


def _choice(env, name, choices, default):
    value = (env.get(name) or "").strip().lower() or default
    if value not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _flag(env, name, default):
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"expected true or false, got {raw!r}")


def _worker_threads(env):
    threads = _number(env, "WORKER_THREADS", Settings.worker_threads, minimum=1)
    if threads > MAX_WORKER_THREADS:
        raise ConfigError(
            "WORKER_THREADS",
            f"expected at most {MAX_WORKER_THREADS}, got {threads}; run more"
            " worker processes instead",
        )
    return threads


def _worker_nice(env):
    nice = _number(env, "WORKER_NICE", Settings.worker_nice)
    if nice > 19:
        raise ConfigError("WORKER_NICE", f"expected 0 to 19, got {nice}")
    return nice


def _port(env):
    port = _number(env, "PORT", Settings.port, minimum=1)
    if port > 65535:
        raise ConfigError("PORT", f"expected a port from 1 to 65535, got {port}")
    return port


def _log_level(env):
    level = (env.get("LOG_LEVEL") or "").strip().upper() or Settings.log_level
    if level not in LOG_LEVELS:
        raise ConfigError("LOG_LEVEL", f"expected one of {', '.join(LOG_LEVELS)}")
    return level


def load():
    """Read a .env file if there is one, then the environment."""
    from dotenv import load_dotenv

    load_dotenv(os.environ.get("ENV_FILE", ".env"), override=False)
    return from_env(os.environ)
