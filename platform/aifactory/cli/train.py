"""``factory train | models | rerun``: training runs, the model registry, and re-executing a run."""

from __future__ import annotations

import argparse
import os

from aifactory.cli._common import add_address, home_of
from aifactory.cli._output import add_format, emit, emit_obj, progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with Ray Train (FSDP2 + bf16 by default) and register it")
    p.add_argument("--recipe", help="a training recipe, e.g. tiny, or an import path module:function "
                                    "(see aifactory.recipes)")
    p.add_argument("--config", help="a TrainJob YAML/JSON file instead of a recipe")
    p.add_argument("--dataset", help="dataset version (default: the newest)")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="override the number of steps")
    p.add_argument("--workers", type=int, help="override the number of Train workers")
    p.add_argument("--tenant", help="override the recipe's tenant")
    p.add_argument("--lane", help="the lane it runs in (default: the tenant's in lanes.yaml, else factory)")
    p.add_argument("--run-id", dest="run_id", default=os.environ.get("AIFACTORY_RUN_ID") or None,
                   help="use this run id (default: $AIFACTORY_RUN_ID); a preempted run's id resumes it")
    add_address(p)
    add_format(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("models", help="list registered model versions")
    p.add_argument("--name", help="only this model")
    add_format(p)
    p.set_defaults(func=_models)

    p = sub.add_parser("rerun", help="re-execute a training run from its manifest and compare the curves")
    p.add_argument("run_id")
    add_address(p)
    add_format(p)
    p.set_defaults(func=_rerun)


def _connect(args, home, job):
    from aifactory.cluster.connect import init_ray, resolve_address
    from aifactory.config import config_hash
    from aifactory.provenance import code_version
    from aifactory.tenancy import WorkloadKind, job_metadata

    code = code_version()
    meta = job_metadata(job.tenant, workload=WorkloadKind.TRAIN, config_hash=config_hash(job),
                        code_version=code.sha, code_dirty=code.dirty, extra={"entrypoint": "factory train"})
    return init_ray(home, address=resolve_address(home, args.address), job_metadata=meta)


def _cluster_gpus(args, home) -> float:
    """GPUs of the cluster ``factory train`` will use, read before any driver connects (admission needs them
    when ``use_gpu`` is unset): the state API of a running cluster, or this machine's for an embedded one."""
    from aifactory.cluster.connect import apply_ray_env, resolve_address

    address = resolve_address(home, args.address)
    if address is None:  # an embedded cluster on this machine: Ray counts its CUDA devices
        import torch

        return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    apply_ray_env(home)
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address.dashboard_url, detail=True, raise_on_missing_output=False)
    return float(sum((n.resources_total or {}).get("GPU", 0) for n in nodes if n.state == "ALIVE"))


def _summary(out) -> dict:
    m = out.metrics
    return {"run_id": out.run_id, "status": out.manifest.get("status"), "model": out.model_name,
            "model_version": out.model_version, "dataset_version": out.manifest.get("dataset_version"),
            "val_loss": out.final_val_loss, "steps": m.get("step"), "tokens_per_s": m.get("tokens_per_s"),
            "data_wait_fraction": m.get("data_wait_fraction"), "mfu": m.get("mfu"),
            "peak_memory_bytes_per_worker": m.get("peak_memory_bytes_per_worker"),
            "checkpoint_save_s": (m.get("checkpoint_save_s") or {}).get("mean"), "wall_s": out.manifest.get("wall_s"),
            "restarts": len(m.get("restarts") or [])}


def _train(args: argparse.Namespace) -> int:
    import ray

    from aifactory.exceptions import Preempted
    from aifactory.queue.door import resolve_lane
    from aifactory.recipes import build_job
    from aifactory.train.runner import run_training
    from aifactory.train.yielding import PREEMPTED_EXIT_CODE

    home = home_of(args).ensure()
    job = build_job(recipe=args.recipe or (None if args.config else "tiny"), config=args.config,
                    dataset=args.dataset, max_steps=args.max_steps, workers=args.workers, tenant=args.tenant)
    try:  # admitted first, connected after: a refused run leaves no driver job on the cluster
        out = run_training(job, home=home, run_id=args.run_id, log=progress, cluster_gpus=_cluster_gpus(args, home),
                           connect=lambda: _connect(args, home, job),
                           lane=resolve_lane(home, job.tenant.tenant, args.lane))
    except Preempted as err:  # it yielded when asked: a result to report, not an error (exit 75: re-queue it)
        emit_obj({"run_id": err.run_id, "status": "preempted", "step": err.step, "reason": err.reason}, args.format)
        return PREEMPTED_EXIT_CODE
    finally:
        ray.shutdown()
    emit_obj(_summary(out), args.format)
    return 0


def _models(args: argparse.Namespace) -> int:
    from aifactory.registry import ModelRegistry

    versions = ModelRegistry(home_of(args)).list(args.name)
    if args.format == "json":
        emit([mv.to_dict() for mv in versions], "json")
        return 0
    from aifactory.optimize.lineage import variant_label, variant_tree

    # Variants (quantized, distilled) are listed under their parents, indented, with their quality delta.
    rows = [{"name": mv.name, "version": "  " * depth + ("└ " if depth else "") + mv.version,
             "variant": variant_label(mv.manifest), "servable": mv.servable, "sha256": mv.sha256[:12],
             "val_loss": (mv.manifest.get("metrics") or {}).get("val_loss"),
             "delta": (mv.manifest.get("metrics") or {}).get("quality_delta"), "dataset": mv.manifest.get("dataset_version"),
             "run_id": mv.manifest.get("run_id"), "tenant": mv.manifest.get("tenant"), "created": mv.created_at}
            for depth, mv in variant_tree(versions)]
    emit(rows, args.format)
    return 0


def _rerun(args: argparse.Namespace) -> int:
    import ray

    from aifactory.train.config import TrainJob
    from aifactory.train.runner import rerun
    from aifactory.train.runs import read_manifest

    home = home_of(args).ensure()
    job = TrainJob.model_validate(read_manifest(home, args.run_id)["job"])
    _connect(args, home, job)
    try:
        out, cmp = rerun(args.run_id, home=home, log=progress)
    finally:
        ray.shutdown()
    emit_obj({**_summary(out), "rerun_of": args.run_id, "max_abs_val_loss_diff": cmp["max_abs_diff"],
              "tolerance": cmp["tolerance"], "reproduced": cmp["reproduced"]}, args.format)
    return 0 if cmp["reproduced"] else 1
