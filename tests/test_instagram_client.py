"""The Send API client: what it sends, and how Graph errors become GraphAPIError."""

import json
import traceback

import pytest
import requests
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.exceptions import MaxRetryError, NewConnectionError

import instagram_client
import settings
from errors import GraphAPIError
from instagram_client import InstagramClient
from tests import payloads
from tests.payloads import ACCESS_TOKEN, ACCOUNT_ID, APP_SECRET, VERIFY_TOKEN

BASE = "https://graph.test"
MESSAGES_URL = f"{BASE}/v24.0/{ACCOUNT_ID}/messages"
USER = "9100000000077"


def make_settings(**overrides):
    env = {
        "IG_APP_SECRET": APP_SECRET,
        "IG_VERIFY_TOKEN": VERIFY_TOKEN,
        "IG_ACCESS_TOKEN": ACCESS_TOKEN,
        "IG_ACCOUNT_ID": ACCOUNT_ID,
        "GRAPH_API_BASE": BASE,
        **overrides,
    }
    return settings.from_env(env)


@pytest.fixture
def client():
    return InstagramClient(make_settings())


def send_failing(client, requests_mock, **response):
    """Answer the next send with the given response; return the GraphAPIError."""
    requests_mock.post(MESSAGES_URL, **response)
    with pytest.raises(GraphAPIError) as caught:
        client.send_text(USER, "hello")
    return caught.value


# What is sent


def test_send_text_posts_the_message_and_returns_its_id(client, requests_mock):
    requests_mock.post(
        MESSAGES_URL, json={"recipient_id": USER, "message_id": "mid.sent.1"}
    )

    message_id = client.send_text(USER, "Caf\u00e9 \U0001f600")

    assert message_id == "mid.sent.1"
    assert requests_mock.call_count == 1
    sent = requests_mock.last_request
    assert sent.method == "POST"
    assert sent.url == MESSAGES_URL
    assert sent.json() == {
        "recipient": {"id": USER},
        "message": {"text": "Caf\u00e9 \U0001f600"},
    }


def test_send_text_authenticates_with_a_bearer_header_only(client, requests_mock):
    requests_mock.post(MESSAGES_URL, json={"message_id": "mid.sent.2"})

    client.send_text(USER, "hello")

    sent = requests_mock.last_request
    assert sent.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert ACCESS_TOKEN not in sent.url
    assert "access_token" not in sent.url
    assert ACCESS_TOKEN not in sent.text


def test_send_text_uses_the_configured_version(requests_mock):
    client = InstagramClient(make_settings(GRAPH_API_VERSION="v30.0"))
    url = f"{BASE}/v30.0/{ACCOUNT_ID}/messages"
    requests_mock.post(url, json={"message_id": "mid.sent.3"})

    assert client.send_text(USER, "hello") == "mid.sent.3"
    assert requests_mock.last_request.url == url


def test_send_text_passes_the_configured_timeout(requests_mock):
    client = InstagramClient(make_settings(GRAPH_TIMEOUT_SECONDS="3.5"))
    requests_mock.post(MESSAGES_URL, json={"message_id": "mid.sent.4"})

    client.send_text(USER, "hello")

    assert requests_mock.last_request.timeout == 3.5


def test_send_private_reply_addresses_the_comment(client, requests_mock):
    requests_mock.post(MESSAGES_URL, json={"message_id": "mid.sent.5"})

    assert client.send_private_reply("17900000000000001", "hi") == "mid.sent.5"
    assert requests_mock.last_request.json() == {
        "recipient": {"comment_id": "17900000000000001"},
        "message": {"text": "hi"},
    }


# Error mapping


def case(status, body, transient, reason, name):
    return pytest.param(status, body, transient, reason, id=name)


ERROR_TABLE = [
    case(400, payloads.graph_error(190), False, "token_invalid", "190"),
    case(401, payloads.graph_error(190, 463), False, "token_invalid", "190-expired"),
    case(400, payloads.graph_error(10, 2018278), False, "outside_window", "10-2018278"),
    case(400, payloads.graph_error(10, 2534022), False, "outside_window", "10-2534022"),
    case(400, payloads.graph_error(551), False, "recipient_unavailable", "551"),
    case(400, payloads.graph_error(100), False, "bad_request", "100"),
    case(400, payloads.graph_error(100, 2018001), False, "bad_request", "100-sub"),
    case(403, payloads.graph_error(200), False, "permission_denied", "200"),
    case(400, payloads.graph_error(3), False, "permission_denied", "3"),
    case(400, payloads.graph_error(10), False, "permission_denied", "10"),
    case(400, payloads.graph_error(10, 2018065), False, "permission_denied", "10-sub"),
    case(500, payloads.graph_error(1), True, None, "1"),
    case(500, payloads.graph_error(2), True, None, "2"),
    case(400, payloads.graph_error(4), True, None, "4"),
    case(400, payloads.graph_error(17), True, None, "17"),
    case(400, payloads.graph_error(32), True, None, "32"),
    case(400, payloads.graph_error(341), True, None, "341"),
    case(400, payloads.graph_error(613), True, None, "613"),
    case(
        400, payloads.graph_error(99999, is_transient=True), True, None, "is_transient"
    ),
    case(500, "<html><body>Server Error</body></html>", True, None, "500-html"),
    case(502, "", True, None, "502-empty"),
    case(429, "", True, None, "429-empty"),
    case(429, payloads.graph_error(99999), True, None, "429-unknown-code"),
    case(400, payloads.graph_error(99999), False, "bad_request", "400-unknown-code"),
    case(404, "<html>not found</html>", False, "bad_request", "404-html"),
]


@pytest.mark.parametrize("status, body, transient, reason", ERROR_TABLE)
def test_a_graph_error_is_mapped_by_status_code_and_subcode(
    client, requests_mock, status, body, transient, reason
):
    if isinstance(body, dict):
        response = {"status_code": status, "json": body}
    else:
        response = {"status_code": status, "text": body}

    error = send_failing(client, requests_mock, **response)

    assert (error.transient, error.reason) == (transient, reason)
    assert error.http_status == status
    assert error.maybe_sent is False


def test_the_error_carries_code_subcode_and_trace_id(client, requests_mock):
    body = payloads.graph_error(10, 2018278, fbtrace_id="AbCdEfTrace123")

    error = send_failing(client, requests_mock, status_code=400, json=body)

    assert (error.code, error.subcode, error.trace_id) == (
        10,
        2018278,
        "AbCdEfTrace123",
    )
    assert error.error_type == "OAuthException"
    assert "code=10" in str(error)
    assert "subcode=2018278" in str(error)
    assert "trace_id=AbCdEfTrace123" in str(error)


def test_the_failed_code_is_remembered_until_the_next_success(client, requests_mock):
    send_failing(client, requests_mock, status_code=400, json=payloads.graph_error(551))
    assert client.last_error_code == 551

    requests_mock.post(MESSAGES_URL, json={"message_id": "mid.sent.6"})
    client.send_text(USER, "hello")
    assert client.last_error_code is None


@pytest.mark.parametrize(
    "code, subcode",
    [(190, None), (10, 2018278), (551, None), (100, None), (200, None), (4, None)],
)
def test_the_decision_does_not_depend_on_the_message_text(
    client, requests_mock, code, subcode
):
    messages = [
        "Please try again later, this is temporary",
        "This message is sent outside of allowed window.",
        "Invalid OAuth access token - Cannot parse access token",
        "",
    ]

    outcomes = set()
    for message in messages:
        body = payloads.graph_error(code, subcode, message=message)
        error = send_failing(client, requests_mock, status_code=400, json=body)
        outcomes.add((error.transient, error.reason))

    assert len(outcomes) == 1


# Rate limits


def usage_header(minutes):
    return json.dumps(
        {
            ACCOUNT_ID: [
                {
                    "type": "instagram",
                    "call_count": 100,
                    "total_cputime": 12,
                    "total_time": 30,
                    "estimated_time_to_regain_access": minutes,
                }
            ]
        }
    )


@pytest.mark.parametrize(
    "headers, retry_after",
    [
        ({"Retry-After": "120"}, 120),
        ({"X-Business-Use-Case-Usage": usage_header(5)}, 300),
        ({"Retry-After": "60", "X-Business-Use-Case-Usage": usage_header(5)}, 300),
        ({"Retry-After": "900", "X-Business-Use-Case-Usage": usage_header(5)}, 900),
        ({"X-Business-Use-Case-Usage": usage_header(0)}, None),
        ({"X-Business-Use-Case-Usage": "not json"}, None),
        ({}, None),
    ],
    ids=[
        "retry-after",
        "usage-minutes",
        "usage-larger",
        "retry-after-larger",
        "usage-zero",
        "usage-malformed",
        "no-hint",
    ],
)
@pytest.mark.parametrize("status, code", [(400, 4), (400, 32), (400, 613), (429, 17)])
def test_a_rate_limit_wait_hint_becomes_retry_after_seconds(
    client, requests_mock, status, code, headers, retry_after
):
    error = send_failing(
        client,
        requests_mock,
        status_code=status,
        json=payloads.graph_error(code),
        headers=headers,
    )

    assert error.transient is True
    assert error.retry_after == retry_after


def test_a_plain_http_429_reads_the_retry_after_header(client, requests_mock):
    error = send_failing(
        client,
        requests_mock,
        status_code=429,
        text="Too Many Requests",
        headers={"Retry-After": "30"},
    )

    assert (error.transient, error.retry_after) == (True, 30)


# Failures before an answer


def test_a_refused_connection_is_transient_and_was_not_sent(client, requests_mock):
    pool = HTTPSConnectionPool("graph.test", 443)
    refused = NewConnectionError(pool, "Failed to establish a new connection")
    url = f"/v24.0/{ACCOUNT_ID}/messages"
    cause = requests.exceptions.ConnectionError(MaxRetryError(pool, url, refused))

    error = send_failing(client, requests_mock, exc=cause)

    assert error.transient is True
    assert error.maybe_sent is False


@pytest.mark.parametrize(
    "exc, maybe_sent",
    [
        (requests.exceptions.ConnectionError, True),
        (requests.exceptions.ConnectTimeout, False),
        (requests.exceptions.ReadTimeout, True),
    ],
    ids=["connection-error", "connect-timeout", "read-timeout"],
)
def test_a_failed_call_is_transient_and_says_whether_it_may_have_been_sent(
    client, requests_mock, exc, maybe_sent
):
    error = send_failing(client, requests_mock, exc=exc)

    assert error.transient is True
    assert error.maybe_sent is maybe_sent
    assert error.reason is None


@pytest.mark.parametrize(
    "exc_type",
    [
        requests.exceptions.ConnectionError,
        requests.exceptions.ConnectTimeout,
        requests.exceptions.ReadTimeout,
    ],
)
def test_a_failed_call_shows_neither_the_url_nor_the_token(
    client, requests_mock, exc_type
):
    leaky = exc_type(
        f"HTTPSConnectionPool(host='graph.test', port=443): Max retries exceeded "
        f"with url: {MESSAGES_URL}?access_token={ACCESS_TOKEN}"
    )

    error = send_failing(client, requests_mock, exc=leaky)

    logged = "".join(traceback.format_exception(error))
    for text in (str(error), logged):
        assert "graph.test" not in text
        assert ACCESS_TOKEN not in text


@pytest.mark.parametrize(
    "response",
    [
        {"json": {"recipient_id": USER}},
        {"json": {"message_id": ""}},
        {"json": {"message_id": 12345}},
        {"json": ["mid.in.a.list"]},
        {"text": "<html>ok</html>"},
    ],
    ids=["no-message-id", "empty", "not-a-string", "json-array", "not-json"],
)
def test_a_success_without_a_message_id_counts_as_sent(client, requests_mock, response):
    requests_mock.post(MESSAGES_URL, status_code=200, **response)

    # Meta accepted it: retrying would send the reply twice.
    assert client.send_text(USER, "hi") == instagram_client.ACCEPTED_WITHOUT_ID


def test_meta_error_text_never_reaches_the_exception(client, requests_mock):
    body = payloads.graph_error(
        100, message="Invalid recipient 9730000001 (user marker.name.77)"
    )

    error = send_failing(client, requests_mock, status_code=400, json=body)

    assert "9730000001" not in str(error) and "marker.name.77" not in str(error)
    assert "invalid parameter" in str(error)


# Redaction


def test_a_graph_message_holding_the_token_is_redacted(client, requests_mock):
    body = payloads.graph_error(
        190, message=f"Invalid OAuth access token: {ACCESS_TOKEN} (bad)"
    )

    error = send_failing(client, requests_mock, status_code=400, json=body)

    assert ACCESS_TOKEN not in str(error)
    assert "access token invalid or expired" in str(error)


@pytest.mark.parametrize(
    "secret",
    [
        "short-tok",
        "EAAGm0PX4ZCpsBAKZCqZA0example",
        ACCESS_TOKEN[:12],
    ],
)
def test_a_graph_message_holding_any_configured_token_is_redacted(
    requests_mock, secret
):
    client = InstagramClient(make_settings(IG_ACCESS_TOKEN=secret))
    body = payloads.graph_error(190, message=f"token {secret} is not valid")

    error = send_failing(client, requests_mock, status_code=400, json=body)

    assert secret not in str(error)


def test_a_graph_message_holding_the_app_secret_is_redacted(client, requests_mock):
    body = payloads.graph_error(100, message=f"bad appsecret {APP_SECRET} given")

    error = send_failing(client, requests_mock, status_code=400, json=body)

    assert APP_SECRET not in str(error)


def test_proxy_and_certificate_settings_of_the_environment_are_used(
    requests_mock, monkeypatch, tmp_path
):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    client = InstagramClient(make_settings())
    requests_mock.post(MESSAGES_URL, json={"message_id": "mid.proxied"})

    assert client.send_text(USER, "hello") == "mid.proxied"

    sent = requests_mock.last_request
    assert sent.proxies["https"] == "http://proxy.test:3128"
    assert sent.verify == str(bundle)


def test_no_proxy_excludes_the_graph_api_host(requests_mock, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "graph.test")
    client = InstagramClient(make_settings())
    requests_mock.post(MESSAGES_URL, json={"message_id": "mid.direct"})

    client.send_text(USER, "hello")

    assert not requests_mock.last_request.proxies.get("https")
