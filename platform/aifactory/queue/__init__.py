"""The tenant job queue inside one Ray cluster: lanes, priority, fair share, backfill, preemption.

Ray places every task and actor; the queue only decides when a whole workload is let onto the cluster and
what is asked to yield. One module per concern:

- :mod:`~aifactory.queue.lanes`: the typed lane config (``<home>/lanes.yaml``);
- :mod:`~aifactory.queue.store`: the durable SQLite queue (``<home>/queue/queue.sqlite``);
- :mod:`~aifactory.queue.policy`: the pure plan (order, fair share, backfill and reservation, preemption, ETAs);
- :mod:`~aifactory.queue.door`: refusals at once, then :func:`enqueue`; :func:`cancel`;
- :mod:`~aifactory.queue.dispatcher`: :func:`dispatch_once` and the detached dispatcher actor;
- :mod:`~aifactory.queue.metrics`: Prometheus series through ``ray.util.metrics``.

The front door (:class:`aifactory.jobs.Client`, so ``factory submit`` and ``POST /v1/jobs``) enqueues, runs one
inline pass, and returns the entry's id at once.
"""

from aifactory.queue.door import cancel, enqueue
from aifactory.queue.lanes import Lane, LanesConfig, load_lanes
from aifactory.queue.store import QueueEntry, QueueStore

__all__ = ["Lane", "LanesConfig", "QueueEntry", "QueueStore", "cancel", "enqueue", "load_lanes"]
