"""Reply rules: the file's checks and how keywords match."""

import json

import pytest
from payloads import APP_SECRET, VERIFY_TOKEN

import rules
import settings
from errors import ConfigError


def write(tmp_path, data):
    path = tmp_path / "rules.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def rule(**fields):
    return {
        "on": "message",
        "keywords": ["price"],
        "reply": "See our prices.",
        **fields,
    }


def test_the_example_file_shipped_with_the_project_is_valid():
    loaded = rules.load_rules("rules.example.json")
    assert {r.on for r in loaded} == {"message", "comment"}


@pytest.mark.parametrize(
    "text, matches",
    [
        ("What is the PRICE?", True),
        ("prices please", False),  # whole words only
        ("priceless", False),
        ("Are you OPEN   today?", True),
        ("Café ouvert ? Les HORAIRES", True),
        ("", False),
    ],
)
def test_keywords_match_whole_words_ignoring_case_and_accents(tmp_path, text, matches):
    path = write(tmp_path, [rule(keywords=["price", "open today", "horaires"])])
    [only] = rules.load_rules(path)
    assert only.matches(text) is matches


def test_accented_keywords_match_plain_text(tmp_path):
    [only] = rules.load_rules(write(tmp_path, [rule(keywords=["crème brûlée"])]))
    assert only.matches("one creme brulee please")


def test_first_matching_rule_of_the_right_kind_wins(tmp_path):
    path = write(
        tmp_path,
        [
            rule(on="comment", keywords=["price"], reply="comment reply"),
            rule(keywords=["price"], reply="first"),
            rule(keywords=["price", "hours"], reply="second"),
        ],
    )
    loaded = rules.load_rules(path)

    assert rules.first_match(loaded, "message", "price and hours").reply == "first"
    assert rules.first_match(loaded, "message", "hours").reply == "second"
    assert rules.first_match(loaded, "comment", "price?").reply == "comment reply"
    assert rules.first_match(loaded, "message", "nothing here") is None
    assert rules.first_match(loaded, "message", None) is None


@pytest.mark.parametrize(
    "data, message",
    [
        ("{not json", "is not valid JSON"),
        ({"rules": []}, "expected a JSON list of rules, got dict"),
        (["text"], "rule 1: expected an object, got str"),
        ([rule(), rule(on="dm")], "rule 2: field 'on' must be 'message' or 'comment'"),
        ([rule(keywords=[])], "rule 1: field 'keywords' must be a non-empty list"),
        ([rule(keywords="price")], "rule 1: field 'keywords' must be a non-empty list"),
        ([rule(keywords=["ok", " "])], "rule 1: field 'keywords' must hold only"),
        ([rule(reply="")], "rule 1: field 'reply' must be a non-empty string"),
        ([rule(reply="x" * 1001)], "rule 1: field 'reply' is longer than Meta's 1000"),
        ([rule(), rule(), rule(replies="x")], "rule 3: field 'replies' is unknown"),
    ],
)
def test_a_bad_rules_file_names_the_rule_and_field(tmp_path, data, message):
    with pytest.raises(ConfigError, match="^REPLY_RULES_FILE ") as caught:
        rules.load_rules(write(tmp_path, data))
    assert message in str(caught.value)


def test_a_missing_rules_file_stops_start_up_naming_the_setting(tmp_path):
    env = {
        "IG_APP_SECRET": APP_SECRET,
        "IG_VERIFY_TOKEN": VERIFY_TOKEN,
        "REPLY_RULES_FILE": str(tmp_path / "nope.json"),
    }
    with pytest.raises(ConfigError, match="^REPLY_RULES_FILE cannot read"):
        settings.from_env(env)


def test_settings_carry_the_rules_read_at_start_up(tmp_path):
    env = {
        "IG_APP_SECRET": APP_SECRET,
        "IG_VERIFY_TOKEN": VERIFY_TOKEN,
        "REPLY_RULES_FILE": write(tmp_path, [rule(), rule(on="comment")]),
    }
    assert [r.on for r in settings.from_env(env).reply_rules] == ["message", "comment"]


@pytest.mark.parametrize("keyword", ["\u00b4", "\u0301", " \u00a8 "])
def test_a_keyword_of_only_accents_is_refused(tmp_path, keyword):
    # Folded, it would be empty and match nearly every text.
    with pytest.raises(ConfigError, match="rule 1: field 'keywords' must hold words"):
        rules.load_rules(write(tmp_path, [rule(keywords=["hours", keyword])]))


def test_a_deeply_nested_rules_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nested too deeply"):
        rules.load_rules(write(tmp_path, "[" * 100_000 + "]" * 100_000))


def test_a_rules_file_saved_with_a_bom_is_read(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([rule()]).encode())
    assert len(rules.load_rules(str(path))) == 1


def test_reply_length_is_counted_without_surrounding_spaces(tmp_path):
    [only] = rules.load_rules(write(tmp_path, [rule(reply="  " + "x" * 1000 + " ")]))
    assert len(only.reply) == 1000
