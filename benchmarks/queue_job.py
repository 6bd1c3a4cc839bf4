"""A job of ``--tasks`` Ray tasks holding 1 CPU each for ``--seconds`` (the queue benchmark's unit of work).

    ray job submit -- python benchmarks/queue_job.py --tasks 4 --seconds 5

The tasks sleep: they hold their logical CPU as a real job's tasks would, without loading the host's
cores, so the benchmark measures what the queue lets onto the cluster and when, not CPU contention.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    import ray

    ray.init(logging_level="ERROR", log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        def hold(seconds: float) -> float:
            time.sleep(seconds)
            return seconds

        ray.get([hold.remote(args.seconds) for _ in range(args.tasks)])
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
