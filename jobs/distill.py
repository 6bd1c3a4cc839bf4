"""Distill a registered teacher into a smaller student with Ray Train (FSDP2 + bf16-mixed); gate; register.

    ray job submit --working-dir . --metadata-json '{"tenant": "demo", "workload": "train"}' \
        -- python -m jobs.distill tiny-gpt:v3 --student tiny_student

``--student`` names a distillation recipe (a DistillSpec) or a training recipe (a TrainJob used as the
student) of :mod:`aifactory.recipes`, or ``module:function``. Options: ``--max-steps N``, ``--workers N``, ``--max-loss-delta X``, ``--tenant T``. Prints
the student's summary as JSON on the last line; exits 3 when the student fails its gate.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    import ray

    from aifactory.cluster.connect import apply_ray_env
    from aifactory.exceptions import FactoryError
    from aifactory.home import FactoryHome
    from aifactory.recipes import student_spec
    from aifactory.optimize.distill import run_distillation

    p = argparse.ArgumentParser(prog="python -m jobs.distill", description=__doc__.splitlines()[0])
    p.add_argument("teacher", help="teacher model as NAME:VERSION (or NAME)")
    p.add_argument("--student", default="tiny_student", help="student recipe (default: tiny_student)")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="override the student's steps")
    p.add_argument("--workers", type=int, help="override the number of Train workers")
    p.add_argument("--max-loss-delta", dest="max_loss_delta", type=float, help="allowed loss increase over the teacher")
    p.add_argument("--tenant", help="override the recipe's tenant")
    args = p.parse_args(argv)

    home = FactoryHome.from_env()
    spec = student_spec(args.student, tenant=args.tenant, max_steps=args.max_steps, workers=args.workers,
                        max_loss_delta=args.max_loss_delta)
    apply_ray_env(home)
    ray.init(address="auto", logging_level="WARNING")  # inside `ray job submit`, the job's cluster
    try:
        mv, gate, run = run_distillation(home, args.teacher, spec, log=lambda m: print(m, flush=True))
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        ray.shutdown()
    print(json.dumps({"model": mv.ref, "teacher": mv.manifest["parent"], "run_id": run["run_id"],
                      "quality_delta": gate.quality_delta, "servable": mv.servable}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
