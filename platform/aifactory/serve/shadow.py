"""Shadow traffic decisions: which requests are mirrored, what the mirror may spend, and how the two sides compare.

Why this exists: a candidate version should see real traffic before any caller sees its answers, and Ray Serve
has no request mirroring (KServe's request for it has been open since 2023; Istio, Seldon and SageMaker mirror).
The app that mirrors (issue 18.1) keeps the caller on the stable answer and combines three pure pieces:

- :func:`in_shadow_sample`: a deterministic sample by request id (a hash, never ``random``), so a retried
  request is mirrored or not alike on every replica, and the 5% sample lies inside the 10% one;
- :class:`ShadowBudget`: meters the shadow's spend with a price the caller passes in (per request or per
  token) against ``max_usd_per_day``, and stops the shadow for good at the cap: each mirrored request reserves
  its estimated price before it is sent, so the one that would cross the cap is not sent, concurrent ones
  included. Why and when it stopped are kept in its JSON state;
- :class:`ShadowReport`: from paired records, latency and error rate per side, agreement of outputs (exact
  and whitespace-token F1) and, where the app scores answers, quality per side.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.exceptions import ConfigError
from aifactory.serve.canary_gate import SideFigures

_HASH_SPAN = float(2**64)
_USD_EPS = 1e-9  # float sums of prices (10 x $0.01) must not refuse the request that fits the cap exactly


def in_shadow_sample(request_id: str, fraction: float) -> bool:
    """Whether ``request_id`` is in the shadow sample of ``fraction`` (0-1): the first 8 bytes of its sha256,
    read as a number in [0, 1), are under ``fraction``. Deterministic across processes and replicas, and
    nested: an id in the sample of f is in every sample of f' > f."""
    if not 0 <= fraction <= 1 or math.isnan(fraction):
        raise ConfigError("shadow sample", [f"fraction: must be in [0, 1] (got {fraction!r})"])
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_SPAN < fraction


class ShadowUsage(StrictModel):
    """What one mirrored request uses: before it is sent, an upper bound (prompt tokens + max_tokens)."""

    requests: int = Field(1, ge=0, description="Requests (1 for one mirrored request).")
    prompt_tokens: int = Field(0, ge=0, description="Input tokens.")
    completion_tokens: int = Field(0, ge=0, description="Output tokens (before sending: the request's max_tokens).")


Price = Callable[[ShadowUsage], float]


class ShadowSpend(StrictModel):
    """The budget's state: persist it with ``model_dump()`` so a restarted app keeps its day's spend and stop."""

    max_usd_per_day: float = Field(gt=0, description="Spend cap of the shadow per UTC day, USD.")
    day: str | None = Field(None, description="The UTC day spent_usd counts (YYYY-MM-DD).")
    spent_usd: float = Field(0.0, ge=0, description="Spent on settled shadow requests this day, USD.")
    reserved_usd: float = Field(0.0, ge=0, description="Reserved by shadow requests in flight, USD.")
    total_usd: float = Field(0.0, ge=0, description="Spent since the shadow started, USD.")
    num_sent: int = Field(0, ge=0, description="Shadow requests admitted since the shadow started.")
    stopped_at: float | None = Field(None, description="When the shadow stopped itself, epoch seconds.")
    stop_reason: str | None = Field(None, description="Why it stopped.")


@dataclass(frozen=True)
class ShadowCharge:
    """The reservation of one admitted shadow request; hand it back to :meth:`ShadowBudget.settle`."""

    request_id: str
    estimate_usd: float


def _utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).date().isoformat()


class ShadowBudget:
    """Meters a shadow's spend against its daily cap and stops the shadow, once and for good, at the cap.

    ``admit(estimate)`` before sending a mirrored request: it prices the estimate, and reserves it unless this
    day's spend plus what is in flight plus it would pass the cap, in which case the shadow stops (nothing is
    sent from then on; a person starts a new shadow). ``settle(charge, actual)`` when the mirrored call ends
    replaces the reservation with the actual price. A price that is not a finite number >= 0 raises: money is
    never guessed."""

    def __init__(self, *, price: Price, max_usd_per_day: float | None = None, state: ShadowSpend | None = None):
        if (state is None) == (max_usd_per_day is None):
            raise ValueError("give max_usd_per_day for a new budget, or the state of an existing one")
        self.price = price
        self.state = state or ShadowSpend(max_usd_per_day=max_usd_per_day)

    @property
    def stopped(self) -> bool:
        return self.state.stopped_at is not None

    def _priced(self, usage: ShadowUsage) -> float:
        usd = self.price(usage)
        if not isinstance(usd, (int, float)) or isinstance(usd, bool) or not math.isfinite(usd) or usd < 0:
            raise ConfigError("shadow price", [(f"price({usage.model_dump()}) returned {usd!r}: a price must be a "
                                                "finite number of USD >= 0; fix the price function")])
        return float(usd)

    def _roll(self, now: float) -> None:
        day = _utc_day(now)
        if self.state.day != day:
            self.state.day, self.state.spent_usd = day, 0.0

    def _stop(self, now: float, reason: str) -> None:
        if not self.stopped:
            self.state.stopped_at, self.state.stop_reason = now, reason

    def admit(self, estimate: ShadowUsage, *, now: float, request_id: str = "") -> ShadowCharge | None:
        """A reservation for one mirrored request, or None: it is not to be sent (the shadow has stopped)."""
        if self.stopped:
            return None
        usd = self._priced(estimate)
        self._roll(now)
        s = self.state
        committed = s.spent_usd + s.reserved_usd
        if committed + usd > s.max_usd_per_day + _USD_EPS:
            self._stop(now, f"spend cap: ${s.spent_usd:.6f} spent today (UTC {s.day}) + ${s.reserved_usd:.6f} in "
                            f"flight + ${usd:.6f} for request {request_id or '?'} would pass max_usd_per_day "
                            f"${s.max_usd_per_day:g}")
            return None
        s.reserved_usd += usd
        s.num_sent += 1
        return ShadowCharge(request_id=request_id, estimate_usd=usd)

    def settle(self, charge: ShadowCharge, actual: ShadowUsage, *, now: float) -> float:
        """Replace ``charge``'s reservation with the price of what the call used; returns that price, USD."""
        usd = self._priced(actual)
        self._roll(now)
        s = self.state
        s.reserved_usd = max(0.0, s.reserved_usd - charge.estimate_usd)
        s.spent_usd += usd
        s.total_usd += usd
        if s.spent_usd > s.max_usd_per_day + _USD_EPS:  # the estimate was not an upper bound: stop rather than go on
            self._stop(now, f"spend cap: ${s.spent_usd:.6f} spent today (UTC {s.day}) passed max_usd_per_day "
                            f"${s.max_usd_per_day:g} (request {charge.request_id or '?'} cost ${usd:.6f}, "
                            f"estimated ${charge.estimate_usd:.6f})")
        return usd


class ShadowPair(StrictModel):
    """One mirrored request: what the stable version answered (and the caller got) and what the shadow did."""

    request_id: str
    stable_output: str | None = Field(None, description="The stable answer's text (None if it failed).")
    shadow_output: str | None = Field(None, description="The shadow answer's text (None if it failed).")
    stable_ok: bool
    shadow_ok: bool
    stable_latency_s: float = Field(ge=0, allow_inf_nan=False)
    shadow_latency_s: float = Field(ge=0, allow_inf_nan=False)
    stable_quality: float | None = Field(None, allow_inf_nan=False, description="The app's score, if any.")
    shadow_quality: float | None = Field(None, allow_inf_nan=False, description="The app's score, if any.")


def token_f1(reference: str, candidate: str) -> float:
    """F1 of the whitespace tokens two texts share (as a multiset: SQuAD's token F1); two empty texts agree."""
    ref, cand = reference.split(), candidate.split()
    if not ref and not cand:
        return 1.0
    common = sum((Counter(ref) & Counter(cand)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class ShadowReport(StrictModel):
    """The paired comparison of a shadow: both sides' figures and how often their outputs agree."""

    app: str | None = None
    stable_version: str | None = None
    shadow_version: str | None = None
    num_pairs: int = Field(description="Mirrored requests.")
    stable: SideFigures
    shadow: SideFigures
    num_compared: int = Field(description="Pairs where both sides answered: the agreement is over these.")
    exact_match: float | None = Field(None, description="Share of compared pairs with identical outputs.")
    token_f1: float | None = Field(None, description="Mean whitespace-token F1 of the compared pairs.")
    cost_usd: float | None = Field(None, description="The shadow's spend, USD (None: not given).")

    @classmethod
    def from_pairs(cls, pairs: Iterable[ShadowPair], *, app: str | None = None, stable_version: str | None = None,
                   shadow_version: str | None = None, cost_usd: float | None = None) -> ShadowReport:
        pairs = list(pairs)
        dup = sorted(k for k, n in Counter(p.request_id for p in pairs).items() if n > 1)
        if dup:
            raise ConfigError("shadow pairs", [f"request_id: {dup[:5]} appear more than once; pair each request once"])
        both = [p for p in pairs if p.stable_ok and p.shadow_ok
                and p.stable_output is not None and p.shadow_output is not None]
        return cls(
            app=app, stable_version=stable_version, shadow_version=shadow_version, num_pairs=len(pairs),
            stable=SideFigures.of((p.stable_ok for p in pairs), (p.stable_latency_s for p in pairs),
                                  (p.stable_quality for p in pairs)),
            shadow=SideFigures.of((p.shadow_ok for p in pairs), (p.shadow_latency_s for p in pairs),
                                  (p.shadow_quality for p in pairs)),
            num_compared=len(both),
            exact_match=sum(p.stable_output == p.shadow_output for p in both) / len(both) if both else None,
            token_f1=sum(token_f1(p.stable_output, p.shadow_output) for p in both) / len(both) if both else None,
            cost_usd=cost_usd,
        )

    def to_text(self) -> str:
        def num(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        what = f"shadow {self.shadow_version or '?'} vs stable {self.stable_version or '?'}"
        head = (f"{self.app}: " if self.app else "") + f"{what}, {self.num_pairs} mirrored requests"
        if self.cost_usd is not None:
            head += f", shadow cost ${self.cost_usd:.4f}"
        lines = [head, f"{'side':<8}{'n':>7}{'errors':>9}{'p50 s':>9}{'p99 s':>9}  quality"]
        for name, f in (("stable", self.stable), ("shadow", self.shadow)):
            quality = "-" if f.quality is None else f"{f.quality:.3f} (n={f.quality_n})"
            lines.append(f"{name:<8}{f.n:>7}{num(f.error_rate, '.1%'):>9}{num(f.p50_s, '.3f'):>9}"
                         f"{num(f.p99_s, '.3f'):>9}  {quality}")
        lines.append(f"agreement over {self.num_compared} pairs both answered: exact "
                     f"{num(self.exact_match, '.1%')}, token F1 {num(self.token_f1, '.3f')}")
        return "\n".join(lines)
