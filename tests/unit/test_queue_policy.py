"""The queue's plan (:mod:`aifactory.queue.policy`): order, fair share, backfill and reservation, preemption,
refusals naming the field, and the time one admission decision takes with 1,000 queued entries."""

from __future__ import annotations

import statistics
import time

import pytest
from aifactory.config import parse_config
from aifactory.exceptions import ConfigError, QueueRefused
from aifactory.queue.lanes import Lane, LanesConfig, PreemptionPolicy
from aifactory.queue.policy import Ask, check_request, decayed_usage, plan

CAP = {"CPU": 4.0}


def lanes(**kw) -> LanesConfig:
    """The default lanes without the guaranteed share and lane cap (tested on their own below)."""
    return LanesConfig(lanes={
        "factory": Lane(priority=100, preemption=PreemptionPolicy(preemptible=False)),
        "learning": Lane(priority=10, preemption=PreemptionPolicy(preemptible=True, grace_s=0)),
    }, **kw)


def ask(i, tenant="a", lane="learning", cpu=1.0, prio=50, t=0.0, **kw) -> Ask:
    return Ask(id=str(i), tenant=tenant, lane=lane, priority=prio, resources={"CPU": cpu}, enqueued_at=t, **kw)


def run(i, tenant="a", lane="learning", cpu=1.0, started=0.0, state="running") -> Ask:
    return Ask(id=str(i), tenant=tenant, lane=lane, priority=50, resources={"CPU": cpu}, enqueued_at=started,
               state=state, started_at=started)


def test_order_is_lane_then_priority_then_share_then_age():
    queued = [ask("old-learning", t=0), ask("young-factory", tenant="prod", lane="factory", t=9), ask("high-prio", tenant="vip", prio=90, t=5),
              ask("heavy-tenant", tenant="heavy", t=1), ask("light-tenant", tenant="light", t=2)]
    p = plan(queued=queued, running=[], capacity={"CPU": 0.5}, used={}, lanes=lanes(),
             past_usage={"heavy": 0.9, "light": 0.1, "a": 0.5}, now=10)
    assert p.order == ["young-factory", "high-prio", "light-tenant", "old-learning", "heavy-tenant"]
    assert [p.waiting[i].position for i in p.order] == [1, 2, 3, 4, 5]


def test_what_fits_starts_and_the_rest_says_why_it_waits_with_an_eta():
    p = plan(queued=[ask(1, cpu=2), ask(2, cpu=2, t=1), ask(3, cpu=2, t=2)], running=[], capacity=CAP,
             used={"CPU": 0.0}, lanes=lanes(), now=10, runtime_s=lambda a: 30)
    assert p.start == ["1", "2"]
    w = p.waiting["3"]
    assert w.position == 1 and "waiting for CPU: needs 2, 0 free" in w.reason and w.eta_s == pytest.approx(30)


def test_live_usage_of_work_the_queue_did_not_start_counts():
    # a plain `ray job submit` job holds 3 of the 4 CPUs: a 2-CPU entry waits, a 1-CPU one starts
    p = plan(queued=[ask(1, cpu=2), ask(2, cpu=1, t=1)], running=[], capacity=CAP, used={"CPU": 3.0},
             lanes=lanes(), now=1)
    assert p.start == ["2"] and "1 free" in p.waiting["1"].reason


def test_fair_share_with_weights_2_1_1_gives_half_a_quarter_a_quarter():
    """Three tenants keep the cluster saturated with 1-CPU, 1-second entries: each tenant's CPU-seconds over
    the run are within 10% of its weight's share (2:1:1 -> 50/25/25)."""
    cfg = lanes(tenant_weights={"big": 2.0}, usage_half_life_s=30)
    tenants = ["big", "small", "tiny"]
    queued = [ask(f"{t}-{i}", tenant=t, t=i * 0.001) for t in tenants for i in range(350)]
    running: list[Ask] = []
    history: list[tuple] = []
    cpu_s = dict.fromkeys(tenants, 0.0)
    for step in range(150):
        now = float(step)
        done = [r for r in running if r.started_at + 1.0 <= now]
        running = [r for r in running if r not in done]
        past = decayed_usage(history, capacity=CAP, now=now, half_life_s=cfg.usage_half_life_s)
        p = plan(queued=queued, running=running, capacity=CAP, used=None, lanes=cfg, past_usage=past, now=now)
        started = set(p.start)
        for a in queued:
            if a.id in started:
                running.append(run(a.id, tenant=a.tenant, started=now))
                history.append((a.tenant, a.resources, now, now + 1.0))
                cpu_s[a.tenant] += 1.0
        queued = [a for a in queued if a.id not in started]
    total = sum(cpu_s.values())
    assert total == pytest.approx(4 * 150, rel=0.01)  # the cluster stayed saturated
    shares = {t: cpu_s[t] / total for t in tenants}
    assert shares["big"] == pytest.approx(0.5, rel=0.1) and shares["small"] == pytest.approx(0.25, rel=0.1)
    assert shares["tiny"] == pytest.approx(0.25, rel=0.1), shares


def test_backfill_starts_smaller_work_until_the_head_is_old_enough_to_reserve():
    cfg = lanes(reservation_age_s=60)
    running = [run("r", cpu=2)]
    head, small = ask("head", cpu=4, t=100), ask("small", cpu=1, t=101)
    young = plan(queued=[head, small], running=running, capacity=CAP, used={"CPU": 2}, lanes=cfg, now=130)
    assert young.start == ["small"]  # backfill: the head cannot start anyway
    old = plan(queued=[head, small], running=running, capacity=CAP, used={"CPU": 2}, lanes=cfg, now=161)
    assert old.start == []  # the head waited > 60 s: the 2 free CPUs are held for it
    assert "holding its resources" in old.waiting["head"].reason
    assert "reserved for older work" in old.waiting["small"].reason


def test_factory_work_preempts_the_fewest_newest_learning_entries():
    running = [run("old", cpu=2, started=1), run("mid", cpu=1, started=2), run("new", cpu=1, started=3)]
    p = plan(queued=[ask("prod", lane="factory", cpu=3, t=5)], running=running, capacity=CAP, used={"CPU": 4},
             lanes=lanes(), now=6)
    assert [x.id for x in p.preempt] == ["new", "old"] and p.start == []  # two is the fewest; mid not needed
    assert p.waiting["prod"].reason.startswith("preempting new, old")
    # one that frees enough alone: the newest such single entry, not two smaller newer ones
    p = plan(queued=[ask("prod", lane="factory", cpu=2, t=5)], running=running, capacity=CAP, used={"CPU": 4},
             lanes=lanes(), now=6)
    assert [x.id for x in p.preempt] == ["old"]
    p = plan(queued=[ask("prod", lane="factory", cpu=2, t=5)],
             running=[run("old", cpu=2, started=1), run("new", cpu=2, started=3)], capacity=CAP,
             used={"CPU": 4}, lanes=lanes(), now=6)
    assert [x.id for x in p.preempt] == ["new"]
    # while they yield, nothing more is preempted and what they free is the factory entry's
    yielding = [run("old", cpu=2, started=1), run("new", cpu=2, started=3, state="preempting")]
    p = plan(queued=[ask("prod", lane="factory", cpu=2, t=5), ask("learn", cpu=1, t=6)], running=yielding,
             capacity=CAP, used={"CPU": 4}, lanes=lanes(), now=7)
    assert p.preempt == [] and p.waiting["prod"].reason == "waiting for preempted work to yield"


def test_learning_work_and_non_preemptible_work_are_never_preempted_for():
    running = [run("prod", lane="factory", cpu=4)]
    p = plan(queued=[ask("prod2", lane="factory", cpu=2, t=1), ask("learn", cpu=2, t=0)], running=running,
             capacity=CAP, used={"CPU": 4}, lanes=lanes(), now=2)
    assert p.preempt == []
    p = plan(queued=[ask("learn", cpu=2)], running=[run("x", cpu=4, started=0)], capacity=CAP, used={"CPU": 4},
             lanes=lanes(), now=2)
    assert p.preempt == []


def test_quotas_lane_caps_and_guaranteed_shares_hold_work_back_with_the_reason():
    cfg = LanesConfig(lanes={
        "factory": Lane(priority=100, guaranteed_share=0.25),
        "learning": Lane(priority=10, max_share=0.75, preemption=PreemptionPolicy(preemptible=True)),
    })
    p = plan(queued=[ask("l1", cpu=2), ask("l2", cpu=2, t=1)], running=[], capacity=CAP, used={}, lanes=cfg, now=1)
    assert p.start == ["l1"] and "lane cap" in p.waiting["l2"].reason
    p = plan(queued=[ask("q", tenant="capped", cpu=2)], running=[run("r", tenant="capped", cpu=1)], capacity=CAP,
             used={"CPU": 1}, lanes=cfg, tenant_limits={"capped": {"CPU": 2}}, now=1)
    assert p.start == [] and p.waiting["q"].reason.startswith("tenant quota: capped holds 1 of its 2 CPU")
    assert p.waiting["q"].eta_s is None


def _refused(a: Ask, cfg: LanesConfig | None = None, capacity=CAP) -> QueueRefused:
    with pytest.raises(QueueRefused) as err:
        check_request(a, lanes=cfg or LanesConfig(), capacity=capacity)
    return err.value


def test_refusals_name_the_field_and_the_limit():
    assert _refused(ask(1, lane="nope")).field == "lane"
    assert "one of ['factory', 'learning']" in str(_refused(ask(1, lane="nope")))
    only = LanesConfig(lanes={"learning": Lane(priority=10, allowed_tenants=["b"])})
    assert _refused(ask(1), only).field == "lanes.learning.allowed_tenants"
    err = _refused(ask(1, prio=101))
    assert err.field == "priority" and err.limit == "[0, 100]"
    err = _refused(ask(1, cpu=8))
    assert err.field == "resources.CPU" and err.value == 8 and err.limit == 4
    gpu = Ask(id="g", tenant="a", lane="learning", priority=50, resources={"GPU": 1}, enqueued_at=0)
    assert _refused(gpu).field == "resources.GPU"
    quota = LanesConfig(lanes={"learning": Lane(priority=10, tenant_quota={"cpu": 2})})
    err = _refused(ask(1, cpu=3), quota)
    assert err.field == "lanes.learning.tenant_quota.cpu" and err.limit == 2
    controlled = LanesConfig(lanes={"factory": Lane(priority=100, change_control=True, templates=["python -m jobs.*"])})
    assert _refused(ask(1, lane="factory", name="python x.py"), controlled).field == "lanes.factory.templates"
    check_request(ask(1, lane="factory", name="python -m jobs.train"), lanes=controlled, capacity=CAP)
    assert _refused(ask(1, cpu=4)).field == "lanes.learning.max_share"  # learning: at most 3 of 4 CPUs
    check_request(ask(1, cpu=3), lanes=LanesConfig(), capacity=CAP)


def test_a_bad_lanes_file_names_each_field():
    with pytest.raises(ConfigError) as err:
        parse_config(LanesConfig, {"lanes": {"x": {"priority": 5000, "max_share": 0}},
                                   "tenant_weights": {"a": -1}, "reservation_age_s": -1})
    text = str(err.value)
    for where in ("lanes.x.priority", "lanes.x.max_share", "reservation_age_s"):
        assert where in text, text
    with pytest.raises(ConfigError) as err:
        parse_config(LanesConfig, {"tenant_weights": {"a": 0}, "tenant_lanes": {"b": "gone"}})
    assert "tenant_weights.a" in str(err.value) and "tenant_lanes.b" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(Lane, {"priority": 1, "min_priority": 60, "max_priority": 50})
    assert "min_priority (60) must not exceed max_priority (50)" in str(err.value)


def test_admission_p99_with_1000_queued_entries_from_10_tenants():
    """The issue's bound is 50 ms per admission decision (one plan over the whole queue); asserted here with
    room for a loaded CI machine, the measured p99 printed."""
    cfg = LanesConfig(tenant_weights={"t0": 2.0})
    queued = [ask(f"q{i}", tenant=f"t{i % 10}", lane="factory" if i % 7 == 0 else "learning",
                  cpu=0.25 + (i % 4) * 0.5, prio=40 + i % 20, t=i * 0.01) for i in range(1000)]
    running = [run(f"r{i}", tenant=f"t{i % 10}", cpu=0.25, started=i) for i in range(12)]
    past = {f"t{i}": i / 20 for i in range(10)}
    capacity = {"CPU": 16.0, "GPU": 0.0}
    wall, cpu = [], []
    for _ in range(100):
        t0, c0 = time.perf_counter(), time.thread_time()
        p = plan(queued=queued, running=running, capacity=capacity, used={"CPU": 3.0}, lanes=cfg, past_usage=past,
                 now=100.0)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.thread_time() - c0) * 1000)
    assert len(p.order) == 1000 and len(p.waiting) + len(p.start) == 1000
    p99_wall, p99_cpu = (statistics.quantiles(x, n=100)[98] for x in (wall, cpu))
    print(f"admission decision, 1000 queued / 10 tenants: p50 {statistics.median(wall):.1f} ms wall, p99 "
          f"{p99_wall:.1f} ms wall, {p99_cpu:.1f} ms CPU")
    # CPU time: what the decision costs, whatever else the shared cores run (wall time is printed)
    assert p99_cpu <= 100.0, (p99_cpu, p99_wall)
