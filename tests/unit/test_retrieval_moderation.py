"""Moderation: a word-boundary blocklist and a secret/PII detector whose refusals are answers, never errors, and
whose reasons never repeat what they found (no Ray)."""

from __future__ import annotations

import pytest
from aifactory.config import parse_config
from aifactory.exceptions import ConfigError
from aifactory.retrieval.moderation import (
    ModerationPolicy,
    find_sensitive,
    moderate,
    redact,
)

FACTORY_KEY = "aifk_0123456789abcdef_" + "A" * 21 + "-" + "b" * 21
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\nq2Lw==\n-----END RSA PRIVATE KEY-----"


def test_the_blocklist_matches_whole_words_and_phrases_case_insensitively():
    policy = ModerationPolicy(blocklist=["class", "project nightingale", "c++"])
    assert moderate("Where is PROJECT\n  Nightingale documented?", policy).refused
    assert moderate("a Class hierarchy", policy).refused
    assert moderate("is c++ faster?", policy).refused
    for fine in ("a classic example", "subclass it", "the projects nightingale", "cpp"):
        assert moderate(fine, policy).action == "allow", fine
    refusal = moderate("class", policy)
    assert refusal.text is None and refusal.reasons == ("blocklist: 1 blocked term(s) in the input",)


@pytest.mark.parametrize("kind,text", [
    ("factory_key", FACTORY_KEY),
    ("openai_key", "sk-proj-abcdefghijklmnopqrstuvwx1234"),
    ("aws_access_key", "AKIAIOSFODNN7EXAMPLE"),
    ("private_key", PEM),
    ("email", "jane.doe+ops@example.co.uk"),
    ("phone", "(415) 555-0132"),
    ("phone", "+44 207 946 0958"),
    ("credit_card", "4111 1111 1111 1111"),
    ("credit_card", "5555-5555-5555-4444"),
    ("ssn", "123-45-6789"),
])
def test_each_secret_and_pii_kind_is_found_and_redacted(kind, text):
    found = find_sensitive(f"see {text} here.")
    assert [(f.kind, f.start, f.end) for f in found] == [(kind, 4, 4 + len(text))]
    assert redact(f"see {text} here.") == f"see [REDACTED:{kind}] here."


def test_a_span_is_reported_once_by_the_first_detector_that_claims_it():
    text = PEM.replace("q2Lw==", "AKIAIOSFODNN7EXAMPLE") + " from ops@example.com"
    assert [f.kind for f in find_sensitive(text)] == ["private_key", "email"]
    assert redact(text) == "[REDACTED:private_key] from [REDACTED:email]"


@pytest.mark.parametrize("text", [
    "order 4111 1111 1111 1112 shipped",  # fails the Luhn check: not a card
    "ssn 000-12-3456 and 666-12-3456 are never issued",
    "call aif_config_loader_name() in the code",  # an identifier, not a key
    "version 1.2.3 on 2026-12-03, port 8080",
    "user@localhost is no address",
])
def test_lookalikes_are_not_flagged(text):
    assert find_sensitive(text) == [] and redact(text) == text


def test_decisions_refuse_secrets_and_redact_pii_without_echoing_them():
    policy = ModerationPolicy()
    q = f"my key is {FACTORY_KEY}, mail me at ops@example.com"
    refusal = moderate(q, policy)
    assert refusal.action == "refuse" and refusal.text is None
    assert refusal.reasons == ("secret: factory_key in the input",)
    assert FACTORY_KEY not in repr(refusal) and "ops@example.com" not in repr(refusal)
    redacted = moderate("mail me at ops@example.com", policy, stage="output")
    assert redacted.action == "redact" and redacted.text == "mail me at [REDACTED:email]"
    assert redacted.reasons == ("pii redacted: email",)
    lenient = ModerationPolicy(on_secret="redact", on_pii="allow")
    out = moderate(q, lenient, stage="output")
    assert out.action == "redact" and out.text == "my key is [REDACTED:factory_key], mail me at ops@example.com"
    assert moderate("mail me at ops@example.com", lenient).action == "allow"
    assert moderate(q, ModerationPolicy(on_pii="refuse", on_secret="redact")).reasons == ("pii: email in the input",)


def test_bad_input_and_config_name_the_field():
    with pytest.raises(ValueError, match="text: moderation takes text"):
        moderate(b"bytes", ModerationPolicy())
    with pytest.raises(ValueError, match="text: 11 characters, over the moderation limit max_chars=10"):
        moderate("x" * 11, ModerationPolicy(max_chars=10))
    with pytest.raises(ConfigError, match="blocklist: .*empty term"):
        parse_config(ModerationPolicy, {"blocklist": ["ok", "  "]}, source="moderation")
