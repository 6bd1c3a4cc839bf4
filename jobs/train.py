"""Train a GPT on a dataset version with Ray Train (FSDP2 + bf16-mixed by default); register validated checkpoints.

    ray job submit --working-dir . --metadata-json '{"tenant": "demo", "workload": "train"}' \
        -- python -m jobs.train --recipe tiny

Options: ``--config FILE`` (a TrainJob YAML/JSON) instead of a recipe, ``--dataset VERSION``, ``--max-steps N``,
``--workers N``, ``--tenant T``, ``--run-id ID`` (default ``$AIFACTORY_RUN_ID``: the queue's dispatcher sets it,
and the same id resumes a preempted run). Prints the run id, the final validation loss and the registered model
version as JSON on the last line; a run that yielded (aifactory.train.yielding) prints its status and step instead
and exits with 75 (PREEMPTED_EXIT_CODE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    import ray

    from aifactory.cluster.connect import apply_ray_env
    from aifactory.exceptions import Preempted
    from aifactory.home import FactoryHome
    from aifactory.recipes import build_job
    from aifactory.train.runner import run_training
    from aifactory.train.yielding import PREEMPTED_EXIT_CODE

    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", help="a training recipe of aifactory.recipes or module:function (default: tiny)")
    p.add_argument("--config", help="a TrainJob YAML/JSON file instead of a recipe")
    p.add_argument("--dataset", help="dataset version (default: the newest)")
    p.add_argument("--max-steps", type=int, help="override the number of steps")
    p.add_argument("--workers", type=int, help="override the number of workers")
    p.add_argument("--tenant", help="override the tenant")
    p.add_argument("--run-id", default=os.environ.get("AIFACTORY_RUN_ID") or None,
                   help="use this run id (default: $AIFACTORY_RUN_ID); a preempted run's id resumes it")
    args = p.parse_args(argv)

    home = FactoryHome.from_env()
    job = build_job(recipe=args.recipe or (None if args.config else "tiny"), config=args.config, dataset=args.dataset,
                    max_steps=args.max_steps, workers=args.workers, tenant=args.tenant)
    apply_ray_env(home)
    ray.init(address="auto", logging_level="WARNING")  # inside `ray job submit`, the job's cluster
    try:
        out = run_training(job, home=home, run_id=args.run_id, log=lambda m: print(m, flush=True))
    except Preempted as err:
        print(json.dumps({"run_id": err.run_id, "status": "preempted", "step": err.step, "reason": err.reason}))
        return PREEMPTED_EXIT_CODE
    finally:
        ray.shutdown()
    print(json.dumps({"run_id": out.run_id, "val_loss": out.final_val_loss, "model": out.model_name,
                      "model_version": out.model_version}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
