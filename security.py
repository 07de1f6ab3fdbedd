"""Signature and token checks on what Meta sends, and redaction of what we log."""

import hashlib
import hmac
import re

from errors import SignatureError, SignatureMismatch

SIGNATURE_HEADER = "X-Hub-Signature-256"
_PREFIX = "sha256="
_HEX_DIGITS = frozenset("0123456789abcdef")

# Long runs of token-like characters: Graph access tokens ("IGAA...", "EAA...")
# and anything else that looks like a credential in free text.
_TOKEN_LIKE = re.compile(r"\b(?:IGAA|IGQV|EAA)[A-Za-z0-9_\-]{10,}|\b[A-Za-z0-9]{40,}\b")
_BEARER = re.compile(r"(?i)(bearer\s+|access_token=)[^\s&\"']+")


def verify_signature(raw_body, header_value, secrets):
    """Check an X-Hub-Signature-256 value against the raw body.

    ``raw_body`` must be the bytes exactly as received: Meta signs its own
    escaped form, so a parse-and-reserialise step would break the check.
    Every secret is tried so a secret can be rotated without downtime.
    Raise SignatureError saying what was wrong; return None when it matches.
    """
    if header_value is None:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    if not header_value.startswith(_PREFIX):
        raise SignatureError(f"{SIGNATURE_HEADER} must start with '{_PREFIX}'")
    given = header_value[len(_PREFIX) :]
    if len(given) != 64 or not set(given) <= _HEX_DIGITS:
        raise SignatureError(f"{SIGNATURE_HEADER} must be 64 lower-case hex digits")

    matched = False
    for secret in secrets:
        expected = hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
        # Compare against every secret, so timing says nothing about which one.
        matched |= hmac.compare_digest(expected, given)
    if not matched:
        raise SignatureMismatch("signature does not match the body")


def sign(raw_body, secret):
    """Return the X-Hub-Signature-256 value Meta would send for this body."""
    return _PREFIX + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()


def token_matches(given, expected):
    """Compare a verify token in constant time; None never matches."""
    if given is None or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def pseudonym(value, key):
    """Return a stable, keyed stand-in for an id, safe to log and store."""
    raw = str(value).encode("utf-8", "surrogatepass")
    digest = hmac.new(key.encode(), raw, hashlib.sha256)
    return "p_" + digest.hexdigest()[:16]


def redact(text, secrets=()):
    """Remove secrets and token-like strings from text meant for logs or storage."""
    text = str(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _BEARER.sub(r"\1[redacted]", text)
    return _TOKEN_LIKE.sub("[redacted]", text)
