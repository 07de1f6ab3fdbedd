"""Send replies through the Instagram Graph API; map its errors, once, to GraphAPIError.

The access token travels only in the Authorization header, so it never
appears in a URL, an exception message or a log line. Errors from
``requests`` are rewritten here, because their text can carry the URL.
"""

import json
import logging
import time

import requests
from urllib3.exceptions import NewConnectionError

import metrics
from errors import GraphAPIError

log = logging.getLogger(__name__)

# Codes Meta documents as worth retrying; 4, 17, 32 and 613 are rate limits.
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613})
TRANSIENT_CODES = RATE_LIMIT_CODES | {1, 2, 341, 1200}
# Subcodes of code 10 that mean "outside the allowed messaging window".
OUTSIDE_WINDOW_SUBCODES = frozenset({2018278, 2534022})
#: Recorded as the message_id when Meta accepted a send but named no id.
ACCEPTED_WITHOUT_ID = "accepted-without-id"
#: What an error code means, in our words. Meta's own message text can quote
#: user ids and names, so it is never logged or stored.
DESCRIPTIONS = {
    1: "unknown error",
    2: "temporary service problem",
    3: "capability missing",
    4: "app rate limit reached",
    10: "permission denied",
    17: "user rate limit reached",
    32: "page rate limit reached",
    100: "invalid parameter",
    190: "access token invalid or expired",
    341: "application limit reached",
    368: "blocked by policy",
    551: "person not available",
    613: "rate limit reached",
}


def classify(http_status, code, subcode, is_transient):
    """Return (transient, reason) for a Graph error; reason names a permanent one.

    Decides by HTTP status, code, subcode and is_transient, never by message text.
    """
    if code == 190:
        return False, "token_invalid"
    if code == 10 and subcode in OUTSIDE_WINDOW_SUBCODES:
        return False, "outside_window"
    if code == 551:
        return False, "recipient_unavailable"
    if is_transient is True or code in TRANSIENT_CODES:
        return True, None
    if http_status == 429 or (http_status is not None and http_status >= 500):
        return True, None
    if code in (3, 10, 368) or (code is not None and 200 <= code <= 299):
        return False, "permission_denied"
    return False, "bad_request"


def retry_after_seconds(headers):
    """Return how long Meta asked us to wait, in seconds, or None if it did not say."""
    waits = []
    retry_after = headers.get("Retry-After")
    if retry_after and retry_after.strip().isdigit():
        waits.append(int(retry_after.strip()))
    usage = headers.get("X-Business-Use-Case-Usage")
    if usage:
        try:
            for entries in json.loads(usage).values():
                for entry in entries:
                    minutes = entry.get("estimated_time_to_regain_access") or 0
                    waits.append(int(minutes) * 60)
        except (ValueError, TypeError, AttributeError):
            log.debug("X-Business-Use-Case-Usage header is not the documented JSON")
    return max(waits) if waits and max(waits) > 0 else None


def describe(code, subcode):
    """Say what a Graph error code means, without Meta's free text."""
    if code == 10 and subcode in OUTSIDE_WINDOW_SUBCODES:
        return "outside the allowed messaging window"
    if code is not None and 200 <= code <= 299:
        return "permission missing"
    return DESCRIPTIONS.get(code, "no error details" if code is None else "error")


def error_from_response(response):
    """Build the GraphAPIError for an HTTP answer that is not a success."""
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    code = _int_or_none(error.get("code"))
    subcode = _int_or_none(error.get("error_subcode"))
    transient, reason = classify(
        response.status_code, code, subcode, error.get("is_transient")
    )
    # Any wait hint counts, not only on rate limits: a 503 may carry one too.
    retry_after = retry_after_seconds(response.headers) if transient else None

    return GraphAPIError(
        f"Graph API answered HTTP {response.status_code}: {describe(code, subcode)}",
        http_status=response.status_code,
        code=code,
        subcode=subcode,
        error_type=error.get("type") if isinstance(error.get("type"), str) else None,
        trace_id=error.get("fbtrace_id")
        if isinstance(error.get("fbtrace_id"), str)
        else None,
        transient=transient,
        reason=reason,
        retry_after=retry_after,
    )


class InstagramClient:
    """A small client for the Send API of one Instagram business account."""

    def __init__(self, settings, session=None):
        self.base_url = f"{settings.graph_api_base}/{settings.graph_api_version}"
        self.account_id = settings.account_id
        self.timeout = settings.graph_timeout_seconds
        self._token = settings.access_token
        self.session = session or requests.Session()
        # Proxy and certificate settings of the environment (HTTPS_PROXY,
        # NO_PROXY, REQUESTS_CA_BUNDLE...) are read once, here: requests
        # looks them up again on every call otherwise, which cost a reply
        # about a twentieth of the worker's CPU time.
        found = self.session.merge_environment_settings(
            self.base_url, {}, None, None, None
        )
        self.session.trust_env = False
        self._transport = {key: found[key] for key in ("proxies", "verify", "cert")}
        #: Graph error code of the last failed call, or None after a success.
        self.last_error_code = None

    def send_text(self, recipient_id, text):
        """Send a text message to a user; return the Graph API's message_id."""
        return self._send(
            {"recipient": {"id": recipient_id}, "message": {"text": text}}
        )

    def send_private_reply(self, comment_id, text):
        """Answer a comment with a private message; return the message_id."""
        return self._send(
            {"recipient": {"comment_id": comment_id}, "message": {"text": text}}
        )

    def _send(self, payload):
        url = f"{self.base_url}/{self.account_id}/messages"
        try:
            message_id = self._send_once(url, payload)
        except GraphAPIError as exc:
            outcome = (
                "uncertain"
                if exc.maybe_sent
                else ("transient" if exc.transient else "permanent")
            )
            metrics.GRAPH_CALLS.labels(outcome).inc()
            raise
        metrics.GRAPH_CALLS.labels("ok").inc()
        return message_id

    def _send_once(self, url, payload):
        response = self._post(url, payload)
        if response.status_code >= 400:
            error = error_from_response(response)
            self.last_error_code = error.code
            raise error

        self.last_error_code = None
        try:
            message_id = response.json().get("message_id")
        except (ValueError, AttributeError):
            message_id = None
        if not isinstance(message_id, str) or not message_id:
            # Meta accepted the message; sending it again would send it twice.
            log.warning(
                "Graph API accepted a send (HTTP %s) without naming its message_id",
                response.status_code,
            )
            return ACCEPTED_WITHOUT_ID
        return message_id

    def _post(self, url, payload):
        """POST with the token in the header; rewrite requests' errors without URLs."""
        started = time.monotonic()
        try:
            response = self.session.post(
                url,
                json=payload,
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=self.timeout,
                **self._transport,
            )
        except requests.RequestException as exc:
            # Not chained: requests' own text carries the URL into tracebacks.
            sent = _may_have_been_sent(exc)
            raise GraphAPIError(
                f"Graph API call failed: {type(exc).__name__}"
                + (" (the request may have reached Meta)" if sent else ""),
                transient=True,
                maybe_sent=sent,
            ) from None
        metrics.GRAPH_LATENCY.observe(time.monotonic() - started)
        log.debug(
            "Graph API answered HTTP %s in %.0f ms",
            response.status_code,
            (time.monotonic() - started) * 1000,
        )
        return response


def _may_have_been_sent(exc):
    """Tell whether a failed request may have reached Meta before it failed."""
    if isinstance(exc, requests.ConnectTimeout):
        return False
    if isinstance(exc, requests.ConnectionError):
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        return not isinstance(reason, NewConnectionError)
    return True


def _int_or_none(value):
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
