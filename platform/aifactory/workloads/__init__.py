"""The front door: every unit of work is a :class:`Workload`, launched through :func:`launch`.

A workload says what it is (kind), whose it is (tenant, project), which lane it goes to, and what it will
hold on the cluster in all (derived from its own config by the component that owns the config). ``launch``
admits it (quota and budget against the meter's live holdings, failing closed), starts it, keeps a typed
run record and records its cost events, in that order; callers never repeat those steps.
"""

from aifactory.workloads.launch import RunHandle, RunRecord, launch, list_records, read_record
from aifactory.workloads.spec import DEFAULT_LANE, Resources, Workload

__all__ = ["DEFAULT_LANE", "Resources", "RunHandle", "RunRecord", "Workload", "launch", "list_records",
           "read_record"]
