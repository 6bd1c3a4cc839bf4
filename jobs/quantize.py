"""Quantize a registered model, gate it on its parent's validation split, and register the variant.

    ray job submit --working-dir . --entrypoint-num-cpus 1 --metadata-json '{"tenant": "demo", "workload": "other"}' \
        -- python -m jobs.quantize tiny-gpt:v3 --method int8-dynamic

Options: ``--method auto|int8-dynamic|bf16|fp8-weight`` (auto: bf16 on a GPU, int8-dynamic on a CPU),
``--max-loss-delta X`` (override the recipe's gate), ``--tenant T``. Prints the variant's summary as JSON on
the last line; exits 3 when the variant fails its gate (it is then registered not servable). The work runs
in this (entrypoint) process, which the job's metadata and entrypoint resources attribute: it needs no Ray
tasks, so it does not call ``ray.init``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from aifactory.exceptions import FactoryError
    from aifactory.home import FactoryHome
    from aifactory.recipes import quantize_spec
    from aifactory.optimize.quantize import run_quantize

    p = argparse.ArgumentParser(prog="python -m jobs.quantize", description=__doc__.splitlines()[0])
    p.add_argument("model", help="parent model as NAME:VERSION (or NAME: the newest servable)")
    p.add_argument("--method", default="auto", help="auto, int8-dynamic, bf16 or fp8-weight")
    p.add_argument("--max-loss-delta", dest="max_loss_delta", type=float, help="allowed validation-loss increase")
    p.add_argument("--tenant", default="demo", help="tenant of the job")
    args = p.parse_args(argv)

    home = FactoryHome.from_env()
    spec = quantize_spec(args.method, tenant=args.tenant, max_loss_delta=args.max_loss_delta)
    try:
        mv, gate = run_quantize(home, args.model, spec, log=lambda m: print(m, flush=True))
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps({"model": mv.ref, "parent": mv.manifest["parent"], "method": mv.manifest["variant"]["method"],
                      "quality_delta": gate.quality_delta, "servable": mv.servable}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
