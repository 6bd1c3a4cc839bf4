"""``factory optimize quantize | distill``: cheaper variants of registered models, each behind a quality gate.

A variant that fails its gate is registered NOT servable (its evidence is kept) and the command exits 3
with the reason.
"""

from __future__ import annotations

import argparse

from aifactory.cli._common import add_address, home_of
from aifactory.cli._output import add_format, emit_obj, progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help="quantized and distilled variants of registered models (quality-gated)")
    verbs = p.add_subparsers(dest="optimize_command", metavar="VERB", required=True)

    q = verbs.add_parser("quantize", help="quantize MODEL_VERSION (NAME:VERSION) and register the variant")
    q.add_argument("model", metavar="MODEL_VERSION", help="parent model, NAME:VERSION (or NAME: newest servable)")
    q.add_argument("--method", default="auto", help="int8-dynamic (CPU), bf16, fp8-weight (fp8 GPUs), auto (default)")
    q.add_argument("--max-loss-delta", dest="max_loss_delta", type=float,
                   help="override the recipe's allowed validation-loss increase over the parent")
    q.add_argument("--tenant", help="tenant of the job (default: the parent's)")
    add_format(q)
    q.set_defaults(func=_quantize)

    d = verbs.add_parser("distill", help="distill TEACHER_VERSION into a smaller student (Ray Train, FSDP2 + bf16)")
    d.add_argument("model", metavar="TEACHER_VERSION", help="teacher model, NAME:VERSION (or NAME)")
    d.add_argument("--student", required=True,
                   help="a distillation or training recipe (e.g. tiny_student), or module:function (see aifactory.recipes)")
    d.add_argument("--max-steps", dest="max_steps", type=int, help="override the student's steps")
    d.add_argument("--workers", type=int, help="override the number of Train workers")
    d.add_argument("--max-loss-delta", dest="max_loss_delta", type=float,
                   help="override the recipe's allowed validation-loss increase over the teacher")
    d.add_argument("--tenant", help="override the recipe's tenant")
    add_address(d)
    add_format(d)
    d.set_defaults(func=_distill)


def _connect(args, home, tenant, workload, config) -> None:
    from aifactory.cluster.connect import init_ray, resolve_address
    from aifactory.config import config_hash
    from aifactory.provenance import code_version
    from aifactory.tenancy import job_metadata

    code = code_version()
    meta = job_metadata(tenant, workload=workload, config_hash=config_hash(config), code_version=code.sha,
                        code_dirty=code.dirty, extra={"entrypoint": f"factory optimize {args.optimize_command}"})
    init_ray(home, address=resolve_address(home, args.address), job_metadata=meta)


def _summary(mv, gate) -> dict:
    v = mv.manifest.get("variant") or {}
    return {"model": mv.ref, "parent": mv.manifest.get("parent"), "method": v.get("method"),
            "servable": mv.servable, "parent_val_loss": gate.parent_val_loss, "val_loss": gate.variant_val_loss,
            "quality_delta": gate.quality_delta, "gate": gate.reason, "dataset_version": mv.manifest.get("dataset_version"),
            "size_bytes": mv.size_bytes}


def _quantize(args: argparse.Namespace) -> int:
    from aifactory.recipes import quantize_spec
    from aifactory.optimize.gate import parse_ref
    from aifactory.optimize.quantize import check_parent, resolve_method, run_quantize
    from aifactory.registry import ModelRegistry

    home = home_of(args).ensure()
    parent = ModelRegistry(home).get(*parse_ref(args.model))  # unknown model: NotFound before any work
    check_parent(parent)
    spec = quantize_spec(args.method, tenant=args.tenant or parent.manifest.get("tenant") or "demo",
                         max_loss_delta=args.max_loss_delta)
    resolve_method(spec.method)  # hardware that cannot run the method: refused before connecting
    # In this process, without a cluster: a gate reads a few validation batches (aifactory.optimize.gate);
    # `ray job submit ... python -m jobs.quantize` runs the same on the cluster, attributed to the tenant.
    mv, gate = run_quantize(home, parent.ref, spec, log=progress)
    emit_obj(_summary(mv, gate), args.format)
    return 0


def _distill(args: argparse.Namespace) -> int:
    import ray

    from aifactory.recipes import student_spec
    from aifactory.optimize.distill import run_distillation
    from aifactory.tenancy import WorkloadKind

    home = home_of(args).ensure()
    spec = student_spec(args.student, tenant=args.tenant, max_steps=args.max_steps, workers=args.workers,
                        max_loss_delta=args.max_loss_delta)
    _connect(args, home, spec.student.tenant, WorkloadKind.TRAIN, spec)
    try:
        mv, gate, run = run_distillation(home, args.model, spec, log=progress)
    finally:
        ray.shutdown()
    emit_obj({**_summary(mv, gate), "run_id": run["run_id"], "wall_s": run.get("wall_s")}, args.format)
    return 0
