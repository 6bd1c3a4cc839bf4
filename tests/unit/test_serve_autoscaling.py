"""The SLO-aware policy against Ray's default, on the one scenario where they must disagree.

Ray 2.60's default (``replica_queue_length_autoscaling_policy``) scales on ongoing requests per replica
only. Requests that are slow but few (latency over the objective, ongoing requests under the target)
leave it at one replica; ours must add replicas up to ``max_replicas``. Both policies get the same real
``AutoscalingContext``, and both go through Ray's own wrapper (scaling factors, delays, bounds), as the
controller runs them.
"""

from __future__ import annotations

import pytest

from aifactory.serve.autoscaling import P95_METRIC, SLOAwarePolicy, desired_replicas
from aifactory.serve.config import AutoscalingSpec

SLO_S = 0.5
SPEC = AutoscalingSpec(min_replicas=1, max_replicas=3, target_ongoing_requests=4, upscale_delay_s=0,
                       downscale_delay_s=0, metrics_interval_s=0.5, look_back_period_s=1)


def _context(*, current: int, ongoing: float, p95_s: float, policy_state: dict):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    dep = DeploymentID(name="Sleeper", app_name="autoscale")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(current)]
    cfg = AutoscalingConfig(**{k: v for k, v in SPEC.to_serve(p95_slo_s=SLO_S).items() if k != "policy"})
    return AutoscalingContext(
        deployment_id=dep, deployment_name=dep.name, app_name=dep.app_name, current_num_replicas=current,
        target_num_replicas=current, running_replicas=replicas, total_num_requests=ongoing,
        total_queued_requests=0.0, aggregated_metrics={P95_METRIC: {r: p95_s for r in replicas}},
        raw_metrics={}, capacity_adjusted_min_replicas=SPEC.min_replicas,
        capacity_adjusted_max_replicas=SPEC.max_replicas, policy_state=policy_state,
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=cfg,
    )


def _run(policy, *, steps: int = 5, ongoing: float = 2.0, p95_s: float = 0.8) -> list[int]:
    """Apply each decision as the controller would (the next step sees the replicas it asked for)."""
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    wrapped = _apply_autoscaling_config(policy)
    current, state, seen = 1, {}, []
    for _ in range(steps):
        current, state = wrapped(_context(current=current, ongoing=ongoing, p95_s=p95_s, policy_state=state))
        seen.append(current)
    return seen


def _ours():
    return SLOAwarePolicy(**SPEC.to_serve(p95_slo_s=SLO_S)["policy"]["policy_kwargs"])


def test_slow_requests_under_the_ongoing_target_scale_ours_to_max_and_not_rays():
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    # 2 ongoing requests against a target of 4 per replica; p95 0.8 s against an objective of 0.5 s.
    assert _run(replica_queue_length_autoscaling_policy) == [1, 1, 1, 1, 1]
    ours = _run(_ours())
    assert ours[:2] == [2, 3] and ours[-1] == SPEC.max_replicas  # 1.6x over: x1.6 per step, clamped at 3


def test_under_the_objective_ours_agrees_with_ray():
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    for ongoing in (2.0, 10.0):
        assert _run(_ours(), ongoing=ongoing, p95_s=0.1) == _run(replica_queue_length_autoscaling_policy,
                                                                 ongoing=ongoing, p95_s=0.1)


@pytest.mark.parametrize(("current", "p95_s", "want"), [(1, 0.8, 2), (2, 0.8, 4), (2, 2.0, 4), (3, 0.55, 4)])
def test_decision_over_the_objective_with_few_ongoing(current, p95_s, want):
    got = desired_replicas(current=current, ongoing=1.0, queued=0.0, p95_s=p95_s, p95_slo_s=SLO_S,
                           target_ongoing_requests=4, min_replicas=1, max_replicas=8)
    assert got == want
