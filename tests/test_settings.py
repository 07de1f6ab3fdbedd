"""Settings come from one mapping, with defaults, and stop start-up when wrong."""

import pytest

import settings
from errors import ConfigError
from tests.payloads import ACCESS_TOKEN, ACCOUNT_ID, APP_SECRET, VERIFY_TOKEN

REQUIRED = {"IG_APP_SECRET": APP_SECRET, "IG_VERIFY_TOKEN": VERIFY_TOKEN}


def env(**overrides):
    """The smallest valid environment, with keyword overrides; None drops one."""
    values = {**REQUIRED, **overrides}
    return {name: value for name, value in values.items() if value is not None}


def test_only_the_required_settings_give_the_documented_defaults():
    loaded = settings.from_env(env())

    assert loaded.app_secrets == (APP_SECRET,)
    assert loaded.verify_token == VERIFY_TOKEN
    assert loaded.access_token == ""
    assert loaded.account_id == ""
    assert loaded.graph_api_base == "https://graph.instagram.com"
    assert loaded.graph_api_version == "v24.0"
    assert loaded.graph_timeout_seconds == 10.0
    assert loaded.redis_url == "redis://localhost:6379/0"
    assert loaded.database_path == "data/webhooks.db"
    assert loaded.auto_reply_text == settings.DEFAULT_REPLY
    assert loaded.reply_cooldown_seconds == 3600
    assert loaded.retry_delays == (10, 30, 60, 300, 900, 1800, 3600)
    assert loaded.queue_name == "instagram-events"
    assert loaded.worker_processes == 3
    assert loaded.worker_threads == 4
    assert loaded.worker_nice == 19


def test_every_setting_given_is_read():
    loaded = settings.from_env(
        env(
            IG_ACCESS_TOKEN=ACCESS_TOKEN,
            IG_ACCOUNT_ID=ACCOUNT_ID,
            GRAPH_API_BASE="https://graph.test/",
            GRAPH_API_VERSION="v99.0",
            GRAPH_TIMEOUT_SECONDS="2.5",
            REDIS_URL="rediss://cache.internal:6380/1",
            DATABASE_PATH="/var/lib/ig/events.db",
            REPLY_COOLDOWN_SECONDS="60",
            RETRY_DELAYS="1, 2,3",
            RQ_QUEUE="other-queue",
            WORKER_PROCESSES="1",
            WORKER_THREADS="64",
            WORKER_NICE="0",
            FLOOD_EVENTS_PER_SECOND="0",
        )
    )

    assert loaded.access_token == ACCESS_TOKEN
    assert loaded.account_id == ACCOUNT_ID
    assert loaded.graph_api_base == "https://graph.test"
    assert loaded.graph_api_version == "v99.0"
    assert loaded.graph_timeout_seconds == 2.5
    assert loaded.redis_url == "rediss://cache.internal:6380/1"
    assert loaded.database_path == "/var/lib/ig/events.db"
    assert loaded.reply_cooldown_seconds == 60
    assert loaded.retry_delays == (1, 2, 3)
    assert loaded.queue_name == "other-queue"
    assert loaded.worker_processes == 1
    assert loaded.worker_threads == 64
    assert loaded.worker_nice == 0
    assert loaded.flood_events_per_second == 0


def test_comma_separated_app_secrets_are_all_kept_for_rotation():
    loaded = settings.from_env(env(IG_APP_SECRET=" new-secret , old-secret "))

    assert loaded.app_secrets == ("new-secret", "old-secret")


@pytest.mark.parametrize("name", ["IG_APP_SECRET", "IG_VERIFY_TOKEN"])
@pytest.mark.parametrize("value", [None, "", "   "])
def test_a_missing_required_setting_is_named(name, value):
    with pytest.raises(ConfigError, match=f"^{name} is required") as caught:
        settings.from_env(env(**{name: value}))

    assert caught.value.setting == name


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("GRAPH_TIMEOUT_SECONDS", "ten", "expected a number, got 'ten'"),
        ("GRAPH_TIMEOUT_SECONDS", "0", "expected at least 0.1"),
        ("REPLY_COOLDOWN_SECONDS", "1.5", "expected a number, got '1.5'"),
        ("REPLY_COOLDOWN_SECONDS", "an hour", "expected a number"),
        ("REPLY_COOLDOWN_SECONDS", "-1", "expected at least 0"),
        ("RETRY_DELAYS", "10,thirty", "expected whole seconds separated by commas"),
        ("RETRY_DELAYS", "10,,30", "expected whole seconds separated by commas"),
        ("RETRY_DELAYS", "10,-30", "expected no negative delays"),
        ("IG_ACCOUNT_ID", "my_business", "expected the account's numeric id"),
        ("IG_ACCOUNT_ID", "-17841400000000042", "expected the account's numeric id"),
        ("REDIS_URL", "http://localhost:6379/0", "expected a URL starting with"),
        ("REDIS_URL", "localhost:6379", "expected a URL starting with"),
        ("GRAPH_API_BASE", "ftp://graph.test", "expected a URL starting with"),
        ("GRAPH_API_BASE", "graph.instagram.com", "expected a URL starting with"),
        ("IG_APP_SECRET", "one,,two", "got an empty one"),
        ("WORKER_THREADS", "0", "expected at least 1"),
        ("WORKER_THREADS", "65", "expected at most 64"),
        ("WORKER_THREADS", "four", "expected a number, got 'four'"),
        ("WORKER_PROCESSES", "0", "expected at least 1"),
        ("WORKER_PROCESSES", "2.5", "expected a number"),
        ("WORKER_NICE", "20", "expected 0 to 19"),
        ("WORKER_NICE", "-5", "expected at least 0"),
        ("FLOOD_EVENTS_PER_SECOND", "-1", "expected at least 0"),
        ("FLOOD_EVENTS_PER_SECOND", "lots", "expected a number"),
    ],
)
def test_a_malformed_setting_is_named_with_what_was_expected(name, value, expected):
    with pytest.raises(ConfigError, match=f"^{name} ") as caught:
        settings.from_env(env(**{name: value}))

    assert caught.value.setting == name
    assert expected in str(caught.value)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_timeout_that_is_not_a_finite_number_is_refused(value):
    with pytest.raises(ConfigError, match="^GRAPH_TIMEOUT_SECONDS "):
        settings.from_env(env(GRAPH_TIMEOUT_SECONDS=value))


@pytest.mark.parametrize("value", ["17841400000000042\u00b2", "\u0661\u0662\u0663"])
def test_an_account_id_with_non_ascii_digits_is_refused(value):
    with pytest.raises(ConfigError, match="^IG_ACCOUNT_ID "):
        settings.from_env(env(IG_ACCOUNT_ID=value))


def test_an_empty_auto_reply_text_switches_default_replies_off():
    assert settings.from_env(env(AUTO_REPLY_TEXT="")).auto_reply_text == ""
    assert settings.from_env(env(AUTO_REPLY_TEXT="  ")).auto_reply_text == ""


def test_an_unset_auto_reply_text_gives_the_default_reply():
    loaded = settings.from_env(env(AUTO_REPLY_TEXT=None))

    assert loaded.auto_reply_text == settings.DEFAULT_REPLY
    assert loaded.auto_reply_text


def test_a_given_auto_reply_text_is_used():
    loaded = settings.from_env(env(AUTO_REPLY_TEXT=" We answer within a day. "))

    assert loaded.auto_reply_text == "We answer within a day."


@pytest.mark.parametrize(
    "overrides",
    [
        {"IG_APP_SECRET": f"{APP_SECRET},"},
        {"IG_APP_SECRET": f"{APP_SECRET},,second-secret-9f"},
        {"IG_VERIFY_TOKEN": "", "IG_ACCESS_TOKEN": ACCESS_TOKEN},
        {"IG_ACCOUNT_ID": ACCESS_TOKEN, "IG_ACCESS_TOKEN": ACCESS_TOKEN},
        {"REDIS_URL": f"http://:{APP_SECRET}@cache:6379/0"},
        {"GRAPH_API_BASE": f"graph.test/?access_token={ACCESS_TOKEN}"},
    ],
    ids=[
        "trailing-comma",
        "empty-secret-between",
        "missing-verify-token",
        "token-as-account-id",
        "password-in-redis-url",
        "token-in-graph-url",
    ],
)
def test_a_config_error_never_shows_a_secret_value(overrides):
    with pytest.raises(ConfigError) as caught:
        settings.from_env(env(**overrides))

    message = str(caught.value)
    assert APP_SECRET not in message
    assert ACCESS_TOKEN not in message
    assert "second-secret-9f" not in message


def test_the_worker_settings_pass_when_token_and_account_are_set():
    loaded = settings.from_env(
        env(IG_ACCESS_TOKEN=ACCESS_TOKEN, IG_ACCOUNT_ID=ACCOUNT_ID)
    )

    assert loaded.require_worker_settings() is None


@pytest.mark.parametrize(
    "overrides, missing",
    [
        ({"IG_ACCOUNT_ID": ACCOUNT_ID}, "IG_ACCESS_TOKEN"),
        ({"IG_ACCESS_TOKEN": ACCESS_TOKEN}, "IG_ACCOUNT_ID"),
        ({"IG_ACCESS_TOKEN": "  ", "IG_ACCOUNT_ID": ACCOUNT_ID}, "IG_ACCESS_TOKEN"),
    ],
)
def test_the_worker_settings_name_what_the_worker_is_missing(overrides, missing):
    loaded = settings.from_env(env(**overrides))

    with pytest.raises(ConfigError, match=f"^{missing} is required by the worker"):
        loaded.require_worker_settings()


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("PORT", "abc", "expected a number"),
        ("PORT", "0", "expected at least 1"),
        ("PORT", "70000", "from 1 to 65535"),
        ("LOG_LEVEL", "verbose", "expected one of DEBUG, INFO, WARNING, ERROR"),
    ],
)
def test_web_port_and_log_level_are_checked_at_start_up(name, value, expected):
    with pytest.raises(ConfigError, match=f"^{name} .*{expected}"):
        settings.from_env(env(**{name: value}))


def test_log_level_is_read_in_any_case():
    assert settings.from_env(env(LOG_LEVEL="debug")).log_level == "DEBUG"
    assert settings.from_env(env()).log_level == "INFO"


def test_a_redis_url_with_an_impossible_port_is_named():
    with pytest.raises(ConfigError, match="^REDIS_URL expected a port from 1 to 65535"):
        settings.from_env(env(REDIS_URL="redis://127.0.0.1:99999/0"))
