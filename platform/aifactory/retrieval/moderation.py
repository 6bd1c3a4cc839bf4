"""Moderation of a copilot's input and output: a blocklist plus a secret and PII detector.

A question or answer that breaks the policy is *answered* with a refusal (a :class:`Decision`), not raised as
an error: the client asked a well-formed question and gets a well-formed "no", with the reasons. Reasons
name the kind of finding and never quote it, so a refusal does not echo the secret it refused.

- **Blocklist**: terms and phrases matched on word boundaries, case-insensitively ("class" does not match
  "classic"; a phrase matches across any run of whitespace).
- **Secrets**: the factory's API keys (``aifk_...``, and ``aif_...`` tokens), OpenAI-style ``sk-...`` keys, AWS
  access key ids (``AKIA...``/``ASIA...``), and PEM private key blocks.
- **PII**: email addresses, phone numbers, payment card numbers (13-19 digits that pass the Luhn check, so an
  order number is not one) and US social security numbers (the SSA's never-issued ranges excluded).

:func:`redact` replaces every secret and PII span with a placeholder (``[REDACTED:email]``); the request log
stores text only after it, whatever the policy allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, field_validator

from aifactory.config import StrictModel

SECRET_KINDS = ("private_key", "factory_key", "openai_key", "aws_access_key")
PII_KINDS = ("credit_card", "ssn", "email", "phone")

# Order is priority: a span claimed by an earlier detector is not reported again by a later one (a card number
# is not also a phone number; a key inside a PEM block is one private_key finding).
_DETECTORS: list[tuple[str, re.Pattern[str]]] = [
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
                               r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[\s\S]*\Z)")),
    # a digit somewhere: real keys carry a hex id, an identifier like aif_config_loader_name does not
    ("factory_key", re.compile(r"(?<![A-Za-z0-9_])aifk?_(?=[A-Za-z_-]*\d)[A-Za-z0-9_-]{16,}")),
    ("openai_key", re.compile(r"(?<![A-Za-z0-9_-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}")),
    ("aws_access_key", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")),
    ("credit_card", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")),
    ("ssn", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")),
    ("email", re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")),
    ("phone", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)")),
]


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Finding:
    kind: str  # one of SECRET_KINDS or PII_KINDS, or "blocklist"
    start: int
    end: int

    @property
    def category(self) -> Literal["secret", "pii", "blocklist"]:
        return "secret" if self.kind in SECRET_KINDS else "pii" if self.kind in PII_KINDS else "blocklist"


def find_sensitive(text: str) -> list[Finding]:
    """Every secret and PII span in ``text``, in order, non-overlapping."""
    taken: list[Finding] = []
    for kind, pattern in _DETECTORS:
        for m in pattern.finditer(text):
            if kind == "credit_card":
                digits = re.sub(r"\D", "", m.group())
                if not (13 <= len(digits) <= 19 and luhn_ok(digits)):
                    continue
            if any(m.start() < f.end and f.start < m.end() for f in taken):
                continue
            taken.append(Finding(kind, m.start(), m.end()))
    return sorted(taken, key=lambda f: f.start)


def _replace(text: str, findings: list[Finding]) -> str:
    out, pos = [], 0
    for f in sorted(findings, key=lambda f: f.start):
        out.append(text[pos:f.start])
        out.append(f"[REDACTED:{f.kind}]")
        pos = f.end
    out.append(text[pos:])
    return "".join(out)


def redact(text: str) -> str:
    """``text`` with every secret and PII span replaced by ``[REDACTED:<kind>]``."""
    if not isinstance(text, str):
        raise ValueError(f"text: redact() takes text (got {type(text).__name__})")  # noqa: TRY004 (a 400, as all bad input)
    return _replace(text, find_sensitive(text))


class ModerationPolicy(StrictModel):
    """What a copilot refuses or redacts, on the way in and on the way out."""

    blocklist: list[str] = Field(
        default_factory=list, description="Terms or phrases refused wherever they occur as whole words "
        "(case-insensitive; a phrase matches across any whitespace).")
    on_secret: Literal["refuse", "redact"] = Field(
        "refuse", description="A secret (API key, private key) in the text: refuse it, or pass it on redacted.")
    on_pii: Literal["refuse", "redact", "allow"] = Field(
        "redact", description="PII (email, phone, card, SSN) in the text: refuse, redact, or let it through.")
    max_chars: int = Field(32_000, ge=1, description="Longest text moderated; longer input is a request error.")

    @field_validator("blocklist")
    @classmethod
    def _terms(cls, terms: list[str]) -> list[str]:
        bad = [t for t in terms if not t.strip()]
        if bad:
            raise ValueError(f"{len(bad)} empty term(s); every blocklist term has a letter or digit")
        return [t.strip() for t in terms]

    def blocklist_pattern(self) -> re.Pattern[str] | None:
        if not self.blocklist:
            return None
        alts = sorted((r"\s+".join(map(re.escape, t.split())) for t in self.blocklist), key=len, reverse=True)
        return re.compile(rf"(?<!\w)(?:{'|'.join(alts)})(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class Decision:
    """What moderation decided: ``allow`` the text as it is, ``redact`` it (use :attr:`text`), or ``refuse``."""

    action: Literal["allow", "redact", "refuse"]
    text: str | None  # what to pass on: the original, the redacted text, or None (refused)
    reasons: tuple[str, ...] = ()  # e.g. "secret: aws_access_key", "blocklist: 1 term"; never the finding itself
    findings: tuple[Finding, ...] = field(default=(), repr=False)

    @property
    def refused(self) -> bool:
        return self.action == "refuse"


def moderate(text: str, policy: ModerationPolicy, *, stage: Literal["input", "output"] = "input") -> Decision:
    """Apply ``policy`` to a question (``stage='input'``) or an answer (``'output'``)."""
    if not isinstance(text, str):
        raise ValueError(f"text: moderation takes text (got {type(text).__name__})")  # noqa: TRY004 (a 400, as all bad input)
    if len(text) > policy.max_chars:
        raise ValueError(f"text: {len(text)} characters, over the moderation limit max_chars={policy.max_chars}")
    blocked = []
    pattern = policy.blocklist_pattern()
    if pattern is not None:
        blocked = [Finding("blocklist", m.start(), m.end()) for m in pattern.finditer(text)]
    sensitive = find_sensitive(text)
    secrets = [f for f in sensitive if f.category == "secret"]
    pii = [f for f in sensitive if f.category == "pii"]

    def kinds(fs: list[Finding]) -> str:
        return ", ".join(sorted({f.kind for f in fs}))

    refuse, reasons = [], []
    if blocked:
        refuse.append(f"blocklist: {len(blocked)} blocked term(s) in the {stage}")
    if secrets and policy.on_secret == "refuse":
        refuse.append(f"secret: {kinds(secrets)} in the {stage}")
    if pii and policy.on_pii == "refuse":
        refuse.append(f"pii: {kinds(pii)} in the {stage}")
    if refuse:
        return Decision("refuse", None, tuple(refuse), tuple(blocked + sensitive))
    to_redact = secrets + (pii if policy.on_pii == "redact" else [])
    if secrets:
        reasons.append(f"secret redacted: {kinds(secrets)}")
    if pii and policy.on_pii == "redact":
        reasons.append(f"pii redacted: {kinds(pii)}")
    if to_redact:
        return Decision("redact", _replace(text, to_redact), tuple(reasons), tuple(to_redact))
    return Decision("allow", text, (), tuple(pii))
