"""The service's exceptions, in one place, so callers can act on each condition."""


class ServiceError(Exception):
    """Base class of every error this service raises on purpose."""


class ConfigError(ServiceError):
    """A setting is missing or malformed; start-up must stop."""

    def __init__(self, setting, problem):
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting} {problem}")


class SignatureError(ServiceError):
    """A delivery's signature is missing, malformed or does not match."""


class SignatureMismatch(SignatureError):
    """A well-formed signature that no configured app secret produces."""


class StorageError(ServiceError):
    """SQLite could not store or read what it was asked to."""


class EventFailed(ServiceError):
    """An event cannot be handled and belongs in the dead-letter table.

    ``reason`` is one of the dead-letter reasons (``outside_window``,
    ``retries_exhausted``...); the message never holds personal data.
    """

    def __init__(self, reason, message):
        self.reason = reason
        super().__init__(message)


class GraphAPIError(ServiceError):
    """The Graph API refused a call, or the call's outcome is unknown.

    Carries what Meta said in machine-readable form so callers decide by
    ``code`` and ``subcode``, never by the message text.
    """

    def __init__(
        self,
        message,
        *,
        http_status=None,
        code=None,
        subcode=None,
        error_type=None,
        trace_id=None,
        transient=False,
        reason=None,
        retry_after=None,
        maybe_sent=False,
    ):
        self.http_status = http_status
        self.code = code
        self.subcode = subcode
        self.error_type = error_type
        self.trace_id = trace_id
        #: True when the same call may succeed later.
        self.transient = transient
        #: Dead-letter reason when the error is permanent.
        self.reason = reason
        #: Seconds Meta asked us to wait before the next call, if it said.
        self.retry_after = retry_after
        #: True when the request may have reached Meta before it failed.
        self.maybe_sent = maybe_sent
        super().__init__(message)

    def __str__(self):
        parts = [super().__str__()]
        for name in ("http_status", "code", "subcode", "trace_id"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value}")
        return " ".join(parts)
