"""An SLO-aware autoscaling policy for Ray Serve 2.60's custom policy hook.

Ray's default policy scales on ongoing requests only. This one combines three signals:

- ongoing requests per replica against ``target_ongoing_requests`` (Ray's own rule),
- requests queued at the handles (waiting for any replica) as extra load,
- the replicas' observed p95 latency (reported by each replica's ``record_autoscaling_stats`` as
  ``p95_latency_s``) against the class's SLO: over the SLO adds a replica even when the queue looks fine
  (e.g. slow requests), and scale-down is allowed only while p95 is well under it (< 0.5 x SLO).

:func:`desired_replicas` is the pure maths (unit-tested); :class:`SLOAwarePolicy` adapts Ray's
``AutoscalingContext``. Ray applies ``upscale_delay_s``/``downscale_delay_s`` and min/max around a custom
policy; we clamp too, so the maths stands alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

P95_METRIC = "p95_latency_s"


def desired_replicas(*, current: int, ongoing: float, queued: float, p95_s: float | None, p95_slo_s: float,
                     target_ongoing_requests: float, min_replicas: int, max_replicas: int) -> int:
    if current <= 0:
        return max(min_replicas, 1 if ongoing + queued > 0 else 0)
    load = ongoing + queued  # queued requests at handles wait for *any* replica: count them as load
    by_load = math.ceil(load / target_ongoing_requests) if load > 0 else 0
    desired = by_load
    if p95_s is not None and p95_s > p95_slo_s:
        # Latency over the SLO: add at least one replica; more if far over (bounded by 2x per step).
        over = min(2.0, p95_s / p95_slo_s)
        desired = max(desired, math.ceil(current * over), current + 1)
    elif desired < current and p95_s is not None and p95_s > 0.5 * p95_slo_s:
        desired = current  # close to the SLO: do not give capacity back yet
    return int(max(min_replicas, min(max_replicas, desired)))


def mean_metric(per_replica: Mapping[Any, float] | None) -> float | None:
    if not per_replica:
        return None
    values = [float(v) for v in per_replica.values() if v is not None]
    return max(values) if values else None  # the worst replica decides: p95 is a tail objective


class SLOAwarePolicy:
    """Ray Serve custom autoscaling policy (``autoscaling_config.policy.policy_function``, with kwargs)."""

    def __init__(self, *, p95_slo_s: float, target_ongoing_requests: float, min_replicas: int, max_replicas: int):
        self.p95_slo_s = p95_slo_s
        self.target_ongoing_requests = target_ongoing_requests
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        p95 = mean_metric(metrics.get(P95_METRIC))
        queued = float(ctx.total_queued_requests or 0.0)
        total = float(ctx.total_num_requests or 0.0)
        desired = desired_replicas(
            current=ctx.current_num_replicas,
            ongoing=max(0.0, total - queued),
            queued=queued,
            p95_s=p95,
            p95_slo_s=self.p95_slo_s,
            target_ongoing_requests=self.target_ongoing_requests,
            min_replicas=max(self.min_replicas, ctx.capacity_adjusted_min_replicas),
            max_replicas=min(self.max_replicas, ctx.capacity_adjusted_max_replicas),
        )
        state = dict(ctx.policy_state or {})
        state["last_p95_s"] = p95
        return desired, state
