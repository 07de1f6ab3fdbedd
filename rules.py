"""Reply rules from REPLY_RULES_FILE: which keywords get which reply.

The file is a JSON list of rules, each ``{"on": "message" | "comment",
"keywords": [...], "reply": "..."}``. Keywords match whole words, ignoring
case and accents; the first matching rule wins.
"""

import json
import re
import unicodedata
from dataclasses import dataclass

from errors import ConfigError

SETTING = "REPLY_RULES_FILE"
KINDS = ("message", "comment")
FIELDS = ("on", "keywords", "reply")
#: Meta refuses text messages longer than this.
MAX_REPLY_LENGTH = 1000


@dataclass(frozen=True)
class Rule:
    """One rule: where it applies, what it looks for, what it answers."""

    position: int
    on: str
    keywords: tuple[str, ...]
    reply: str
    pattern: re.Pattern

    def matches(self, text):
        """Tell whether text holds one of the keywords as whole words."""
        return self.matches_folded(fold(text))

    def matches_folded(self, folded_text):
        """Like matches(), for a text already passed through fold()."""
        return bool(self.pattern.search(folded_text))


def fold(text):
    """Lower-case text and strip its accents, so "Café" and "cafe" compare equal."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def load_rules(path):
    """Read and check the rules file; raise ConfigError naming the rule and field."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except OSError as exc:
        raise ConfigError(SETTING, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(SETTING, f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(SETTING, f"{path} is nested too deeply to be rules") from None
    if not isinstance(data, list):
        raise ConfigError(SETTING, f"expected a JSON list of rules, got {_name(data)}")
    return tuple(_rule(position, item) for position, item in enumerate(data, start=1))


def _rule(position, item):
    def bad(field, problem):
        return ConfigError(SETTING, f"rule {position}: field '{field}' {problem}")

    if not isinstance(item, dict):
        raise ConfigError(
            SETTING, f"rule {position}: expected an object, got {_name(item)}"
        )
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise bad(unknown[0], f"is unknown; expected only {', '.join(FIELDS)}")
    if item.get("on") not in KINDS:
        raise bad("on", f"must be 'message' or 'comment', got {item.get('on')!r}")
    keywords = item.get("keywords")
    if not isinstance(keywords, list) or not keywords:
        raise bad("keywords", "must be a non-empty list of words")
    if not all(isinstance(k, str) and k.strip() for k in keywords):
        raise bad("keywords", "must hold only non-empty strings")
    folded = tuple(fold(k).strip() for k in keywords)
    if not all(folded):
        raise bad("keywords", "must hold words, not only accents or marks")
    reply = item.get("reply")
    if not isinstance(reply, str) or not reply.strip():
        raise bad("reply", "must be a non-empty string")
    if len(reply.strip()) > MAX_REPLY_LENGTH:
        raise bad("reply", f"is longer than Meta's {MAX_REPLY_LENGTH} characters")

    alternatives = "|".join(r"\s+".join(map(re.escape, k.split())) for k in folded)
    return Rule(
        position=position,
        on=item["on"],
        keywords=folded,
        reply=reply.strip(),
        pattern=re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)"),
    )


def first_match(rules, on, text):
    """Return the first rule for ``on`` whose keywords appear in text, or None."""
    if not isinstance(text, str) or not text or not rules:
        return None
    folded = fold(text)
    for rule in rules:
        if rule.on == on and rule.matches_folded(folded):
            return rule
    return None


def _name(value):
    return "null" if value is None else type(value).__name__
