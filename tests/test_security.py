"""Signature and token checks over raw bytes, and redaction of what we log."""

import hashlib
import hmac
import json

import pytest

import security
from errors import SignatureError
from tests import payloads
from tests.payloads import ACCESS_TOKEN, APP_SECRET, VERIFY_TOKEN

SECRETS = (APP_SECRET,)
RAW = payloads.body(payloads.delivery(payloads.text_message("9100000000001")))


def signature(raw=RAW, secret=APP_SECRET):
    """The X-Hub-Signature-256 value Meta sends, computed here independently."""
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


def test_a_correctly_signed_body_passes():
    assert security.verify_signature(RAW, signature(), SECRETS) is None


def test_sign_gives_the_value_meta_would_send():
    assert security.sign(RAW, APP_SECRET) == signature()


def _hex():
    return signature()[len("sha256=") :]


@pytest.mark.parametrize(
    "header, message",
    [
        (None, "missing X-Hub-Signature-256 header"),
        ("", "must start with 'sha256='"),
        (_hex(), "must start with 'sha256='"),
        ("SHA256=" + _hex(), "must start with 'sha256='"),
        ("sha256=" + "g" + _hex()[1:], "must be 64 lower-case hex digits"),
        ("sha256=" + _hex()[:-1], "must be 64 lower-case hex digits"),
        ("sha256=" + _hex() + "0", "must be 64 lower-case hex digits"),
        ("sha256=" + _hex().upper(), "must be 64 lower-case hex digits"),
        ("sha256= " + _hex()[1:], "must be 64 lower-case hex digits"),
        (signature(secret="another-app-secret"), "does not match the body"),
        (signature(raw=RAW[:-2] + b" }"), "does not match the body"),
        (signature(raw=RAW.replace(b"hello", b"hellO")), "does not match the body"),
        (
            "sha1=" + hmac.new(APP_SECRET.encode(), RAW, hashlib.sha1).hexdigest(),
            "must start with 'sha256='",
        ),
    ],
    ids=[
        "missing-header",
        "empty-value",
        "no-prefix",
        "upper-case-prefix",
        "non-hex",
        "too-short",
        "too-long",
        "upper-case-hex",
        "space-after-prefix",
        "other-secret",
        "body-one-byte-changed-at-end",
        "body-one-byte-changed-in-text",
        "sha1-legacy",
    ],
)
def test_a_bad_signature_is_refused_saying_why(header, message):
    with pytest.raises(SignatureError, match=message):
        security.verify_signature(RAW, header, SECRETS)


def test_a_body_changed_by_one_byte_is_refused():
    changed = bytes([RAW[0] ^ 1]) + RAW[1:]

    with pytest.raises(SignatureError, match="does not match the body"):
        security.verify_signature(changed, signature(), SECRETS)


@pytest.mark.parametrize("secret", ["old-secret-a1", "new-secret-b2", "third-c3"])
def test_a_body_signed_with_any_rotated_secret_passes(secret):
    secrets = ("old-secret-a1", "new-secret-b2", "third-c3")

    assert security.verify_signature(RAW, signature(secret=secret), secrets) is None


def test_a_body_signed_with_a_retired_secret_is_refused():
    with pytest.raises(SignatureError, match="does not match the body"):
        security.verify_signature(
            RAW, signature(secret="retired-secret"), ("new-secret-b2",)
        )


def test_no_configured_secret_refuses_every_body():
    with pytest.raises(SignatureError, match="does not match the body"):
        security.verify_signature(RAW, signature(), ())


def _meta_escaped_body():
    event = payloads.text_message(
        "9100000000002", text="Caf\u00e9 \U0001f600 see https://shop.example/a/b"
    )
    raw = payloads.meta_escaped(payloads.delivery(event))
    # The wire form carries escapes, not the characters themselves.
    assert b"\\u00e9" in raw and b"\\/" in raw
    return raw


def test_meta_escaped_body_signed_as_raw_bytes_passes():
    raw = _meta_escaped_body()

    assert security.verify_signature(raw, signature(raw=raw), SECRETS) is None


def test_meta_escaped_body_re_serialised_no_longer_matches():
    raw = _meta_escaped_body()
    reserialised = json.dumps(
        json.loads(raw), ensure_ascii=False, separators=(",", ":")
    ).encode()

    assert json.loads(reserialised) == json.loads(raw)
    with pytest.raises(SignatureError, match="does not match the body"):
        security.verify_signature(reserialised, signature(raw=raw), SECRETS)


@pytest.mark.parametrize(
    "given, expected, matches",
    [
        (VERIFY_TOKEN, VERIFY_TOKEN, True),
        (VERIFY_TOKEN + "x", VERIFY_TOKEN, False),
        (VERIFY_TOKEN[:-1], VERIFY_TOKEN, False),
        ("wrong-token", VERIFY_TOKEN, False),
        ("", VERIFY_TOKEN, False),
        (None, VERIFY_TOKEN, False),
        ("", "", False),
        ("anything", "", False),
        (None, None, False),
    ],
)
def test_token_matches_only_the_configured_non_empty_token(given, expected, matches):
    assert security.token_matches(given, expected) is matches


def test_pseudonym_is_stable_for_the_same_key_and_value():
    first = security.pseudonym("9100123456789", "key-one")

    assert security.pseudonym("9100123456789", "key-one") == first
    assert security.pseudonym(9100123456789, "key-one") == first


def test_pseudonym_differs_between_keys_and_between_values():
    one = security.pseudonym("9100123456789", "key-one")

    assert security.pseudonym("9100123456789", "key-two") != one
    assert security.pseudonym("9100123456780", "key-one") != one


def test_pseudonym_does_not_contain_the_id():
    user_id = "9100123456789"

    alias = security.pseudonym(user_id, "key-one")

    assert user_id not in alias
    assert alias.startswith("p_")


def test_redact_removes_configured_secrets():
    text = f"app secret {APP_SECRET} and short one s3cr3t leaked"

    cleaned = security.redact(text, secrets=(APP_SECRET, "s3cr3t", ""))

    assert APP_SECRET not in cleaned
    assert "s3cr3t" not in cleaned
    assert cleaned == "app secret [redacted] and short one [redacted] leaked"


@pytest.mark.parametrize(
    "text, hidden",
    [
        ("Authorization: Bearer xyz", "xyz"),
        ("authorization: bearer abc.DEF-123", "abc.DEF-123"),
        ("GET /v24.0/me?access_token=shortTok&fields=id", "shortTok"),
        (f"token {ACCESS_TOKEN} expired", ACCESS_TOKEN),
        ("token IGQVJabcdefghijklmnop expired", "IGQVJabcdefghijklmnop"),
        ("page token EAABwzLixnjYBAKZCqZA0 expired", "EAABwzLixnjYBAKZCqZA0"),
        ("hash " + "a1" * 25 + " seen", "a1" * 25),
    ],
)
def test_redact_removes_token_like_strings(text, hidden):
    cleaned = security.redact(text)

    assert hidden not in cleaned
    assert "[redacted]" in cleaned


def test_redact_keeps_the_words_around_a_bearer_token():
    assert security.redact("Authorization: Bearer xyz") == (
        "Authorization: Bearer [redacted]"
    )
    assert security.redact("url?access_token=abc&fields=id") == (
        "url?access_token=[redacted]&fields=id"
    )


@pytest.mark.parametrize(
    "text",
    [
        "Invalid OAuth access token - Cannot parse access token",
        "(#10) This message is sent outside of allowed window.",
        "user 9100123456789 sent mid aWdfZAG1faXRlbToxOklH at 1700000000123",
        "EAAs and IGAA alone are just words",
    ],
)
def test_redact_keeps_ordinary_text(text):
    assert security.redact(text) == text
