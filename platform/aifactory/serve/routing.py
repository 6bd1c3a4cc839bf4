"""Canary traffic split and rollout state.

The router deployment's ``user_config`` holds a :class:`RolloutState`; a declarative update changes it
without restarting replicas. :func:`pick_target` decides per request, deterministically from a request
number so that the observed split over N requests is within one request of ``percent``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from aifactory.config import StrictModel


class RolloutState(StrictModel):
    stable_version: str = Field(description="Version that serves all traffic not sent to the canary.")
    canary_version: str | None = Field(None, description="Version under trial, if any.")
    canary_percent: float = Field(0.0, ge=0, le=100, description="Share of requests sent to the canary.")

    @model_validator(mode="after")
    def _check(self) -> RolloutState:
        if self.canary_percent > 0 and not self.canary_version:
            raise ValueError(f"canary_percent ({self.canary_percent}) > 0 needs a canary_version")
        return self

    def canary(self, version: str, percent: float) -> RolloutState:
        return RolloutState(stable_version=self.stable_version, canary_version=version, canary_percent=percent)

    def promote(self) -> RolloutState:
        if not self.canary_version:
            raise ValueError("no canary to promote; start one with `factory serve canary VERSION --percent P`")
        return RolloutState(stable_version=self.canary_version, canary_version=None, canary_percent=0.0)

    def rollback(self) -> RolloutState:
        return RolloutState(stable_version=self.stable_version, canary_version=None, canary_percent=0.0)


def pick_target(request_number: int, percent: float) -> str:
    """``"canary"`` for ``percent``% of request numbers (evenly spread), else ``"stable"``.

    Request ``i`` goes to the canary when ``floor((i+1)p) > floor(ip)`` with ``p = percent/100``: over any
    ``N`` consecutive requests the canary gets ``floor(N p)`` or ``ceil(N p)`` of them.
    """
    if percent <= 0:
        return "stable"
    if percent >= 100:
        return "canary"
    p = percent / 100.0
    return "canary" if int((request_number + 1) * p) > int(request_number * p) else "stable"
