"""A Ray Train run whose two workers span two nodes survives losing one of those nodes: it restarts on
the remaining nodes of the pool from its last checkpoint and finishes.

A minimal DDP loop of its own (gloo, a linear model) keeps this test about placement and recovery,
not about the model; the factory's trainer uses the same Ray Train mechanisms (checkpoint + report,
FailureConfig) and has its own integration tests.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

TOTAL_STEPS = 8


def _loop(config: dict) -> None:
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt")
        model.module.load_state_dict(state["model"]) if hasattr(model, "module") else model.load_state_dict(state["model"])
        start = state["step"]
    # Where this attempt's workers ran and where they started from: the test reads these files.
    log = Path(config["log_dir"]) / f"{uuid.uuid4().hex}.json"
    log.write_text(json.dumps({"rank": ctx.get_world_rank(), "node": ray.get_runtime_context().get_node_id(),
                               "start_step": start}))
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for step in range(start + 1, config["total_steps"] + 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(config["step_s"])
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if ctx.get_world_rank() == 0:
                inner = model.module if hasattr(model, "module") else model
                torch.save({"model": inner.state_dict(), "step": step}, Path(tmp) / "state.pt")
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report({"step": step, "loss": float(loss)}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"step_{step:05d}")


def test_two_node_run_resumes_after_losing_a_node(multinode, tmp_path):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Three nodes of the training pool: two for the workers, one spare that stands in for the node
    # the autoscaler would bring up.
    nodes = {n.node_id: n for n in (multinode.add_pool_node("train-gpu-spot", num_cpus=1) for _ in range(3))}
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    storage = tmp_path / "storage"

    def attempts() -> list[dict]:
        out = []
        for p in log_dir.glob("*.json"):
            try:
                out.append(json.loads(p.read_text()) | {"mtime": p.stat().st_mtime})
            except (json.JSONDecodeError, OSError):
                pass  # being written
        return sorted(out, key=lambda a: a["mtime"])

    killed: dict[str, str] = {}

    def kill_a_worker_node() -> None:
        # After the second checkpoint is on storage (and a poll later, registered), lose the node of
        # one worker, as a spot reclaim would.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = sorted(storage.glob("*/step_*"))
            if len(done) >= 2 and len(attempts()) >= 2:
                time.sleep(1.5)
                victim = next(a["node"] for a in attempts() if a["rank"] == 1)
                killed["node"] = victim
                multinode.remove_node(nodes[victim])
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker_node, daemon=True)
    killer.start()
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"log_dir": str(log_dir), "total_steps": TOTAL_STEPS, "step_s": 0.3},
        scaling_config=ScalingConfig(
            num_workers=2,
            resources_per_worker={"CPU": 1, "pool_train": 0.01},
            placement_strategy="STRICT_SPREAD",  # the two workers on two different nodes
        ),
        run_config=RunConfig(
            name="multinode",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    killer.join(timeout=5)

    assert killed, "the test never killed a node"
    assert result.error is None
    with result.checkpoint.as_directory() as d:
        import torch

        assert torch.load(Path(d) / "state.pt")["step"] == TOTAL_STEPS
    runs = attempts()
    first, later = runs[:2], runs[2:]
    assert len({a["node"] for a in first}) == 2, "the two workers of the first attempt shared a node"
    assert later, "the run never restarted after losing a node"
    resumed = later[-2:]
    assert len({a["node"] for a in resumed}) == 2 and killed["node"] not in {a["node"] for a in resumed}
    assert all(a["start_step"] >= 1 for a in resumed), f"the restart began from scratch: {resumed}"
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert killed["node"] not in alive
