"""A trial's cost from what the meter reads its actors holding (``aifactory.cost.metered``), priced with the
price book, and the benchmark outcomes built on it. Pure: state-API rows are plain objects here; the live
read of a real cluster is in tests/integration/test_bench.py (every trial's ``cost_basis`` is "metered")."""

from dataclasses import dataclass

import pytest
from aifactory.bench.outcomes import price_outcomes
from aifactory.cost.metered import Held, Span, pg_resources, spans_of
from aifactory.cost.pricebook import parse_price_book
from aifactory.cost.sampler import resource_keys

PG = "1a6356d643fc9dd3f7d87eaf2ba101000000"
BOOK = parse_price_book({"version": "t", "rates": [
    {"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": 3.6},  # 0.001 USD per CPU-second
    {"resource": "gpu", "sku": "H100", "on_demand_usd_per_hour": 36.0},  # 0.01 USD per GPU-second
    {"resource": "gpu", "sku": "L4", "on_demand_usd_per_hour": 7.2},
    {"resource": "memory", "sku": "gib", "on_demand_usd_per_hour": 0.0},
]})


@dataclass
class Actor:
    actor_id: str
    required_resources: dict
    node_id: str = "n1"
    state: str = "ALIVE"


def keys(res, nk):
    return resource_keys(res, accelerator=nk.get("accelerator", "unknown-gpu"), asic_sku="unknown-asic")


def test_a_placement_group_actor_counts_its_plain_resources_once():
    # as Ray 2.60's state API shows a Train worker in bundle 0 of its group
    required = {f"bundle_group_0_{PG}": 0.001, f"CPU_group_{PG}": 1.0, f"CPU_group_0_{PG}": 1.0,
                f"bundle_group_{PG}": 0.001, f"GPU_group_{PG}": 1.0, f"GPU_group_0_{PG}": 1.0}
    assert pg_resources(required) == {"CPU": 1.0, "GPU": 1.0}
    assert pg_resources({"CPU": 0.5, "memory": 1024.0}) == {"CPU": 0.5, "memory": 1024.0}


def test_spans_are_clipped_to_the_interval_and_gpus_keyed_by_their_node():
    times = {"a": (90.0, None), "b": (105.0, 110.0), "c": (50.0, 60.0)}
    actors = [Actor("a", {"CPU": 0.5}), Actor("b", {f"CPU_group_{PG}": 1.0, f"GPU_group_{PG}": 1.0}, node_id="g"),
              Actor("c", {"CPU": 4.0})]
    spans, estimated = spans_of(actors, times, since=100.0, until=120.0,
                                node_keys={"n1": {}, "g": {"accelerator": "H100"}}, keys=keys)
    held = Held(since=100.0, until=120.0, spans=tuple(spans), estimated=estimated)
    assert not estimated and [s.holder for s in spans] == ["actor:a", "actor:b"]  # c ended before the interval
    assert held.seconds("cpu") == pytest.approx(0.5 * 20 + 1.0 * 5)
    assert held.seconds("gpu") == pytest.approx(5.0) and held.skus("gpu") == ["H100"]
    # a GPU-second at its node's SKU: 15 CPU-s x 0.001 + 5 H100-s x 0.01
    assert held.usd(BOOK, tenant="t", region="local") == pytest.approx(0.015 + 0.05)


def test_without_gcs_times_live_actors_hold_the_interval_and_the_result_says_estimated():
    actors = [Actor("a", {"CPU": 1.0}), Actor("dead", {"CPU": 1.0}, state="DEAD")]
    spans, estimated = spans_of(actors, None, since=0.0, until=10.0, node_keys={}, keys=keys)
    assert estimated and [(s.holder, s.start, s.end) for s in spans] == [("actor:a", 0.0, 10.0)]


def _held(cpu_s: float, gpu_s: float = 0.0, sku: str = "L4") -> Held:
    res = {("cpu", "cpu"): 1.0}
    spans = [Span("actor:x", res, 0.0, cpu_s)]
    if gpu_s:
        spans.append(Span("actor:g", {("gpu", sku): 1.0}, 0.0, gpu_s))
    return Held(since=0.0, until=max(cpu_s, gpu_s), spans=tuple(spans))


def test_serving_cost_is_the_metered_one_not_declared_times_wall():
    m = {"num_ok": 1000, "replica_cpu_s": 40.0, "tokens": 2000}  # declared: 2 CPUs x 20 s
    out = price_outcomes(m, family="serving", book=BOOK, region="local", tenant="t", metered=_held(10.0, gpu_s=10.0))
    assert out["cost_basis"] == "metered" and out["metered_cpu_s"] == 10.0 and out["metered_gpu_skus"] == ["L4"]
    assert out["cost_usd"] == pytest.approx(10 * 0.001 + 10 * 0.002)  # L4 at 7.2 USD/h
    assert out["cost_per_1k_requests_usd"] == pytest.approx(out["cost_usd"])
    assert out["cost_per_1m_tokens_usd"] == pytest.approx(out["cost_usd"] / 2000 * 1e6)


def test_without_metered_usage_the_declared_basis_is_used_and_says_why():
    m = {"num_ok": 1000, "replica_cpu_s": 40.0}
    out = price_outcomes(m, family="serving", book=BOOK, region="local", tenant="t",
                         metered=None, metered_reason="the state API could not be read: timeout")
    assert out["cost_basis"] == "declared" and out["cost_usd"] == pytest.approx(0.04)
    assert out["unavailable"]["metered"] == "the state API could not be read: timeout"


def test_training_cost_to_quality_prorates_the_metered_run():
    m = {"samples": 100, "train_cpu_s": 80.0, "time_to_quality_s": 10.0, "train_wall_s": 40.0}
    out = price_outcomes(m, family="training", book=BOOK, region="local", tenant="t", metered=_held(20.0))
    assert out["cost_basis"] == "metered" and out["cost_usd"] == pytest.approx(0.02)
    assert out["cost_per_validated_checkpoint_usd"] == pytest.approx(0.02 * 10 / 40)
