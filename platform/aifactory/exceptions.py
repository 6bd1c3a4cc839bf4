"""The factory's domain errors.

A user's mistake raises a :class:`FactoryError` subclass whose message says what was wrong, where, and
what to do. The CLI prints ``str(error)`` on one line and exits non-zero without a traceback.

Errors that carry fields define ``__reduce__`` so that they survive crossing Ray process boundaries.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def error_line(error: BaseException | None, default: str = "") -> str:
    """``Type: first line`` of an error, for run records, manifests and one-line messages."""
    if error is None:
        return default
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def one_line(text: str) -> str:
    """A multi-line failure (Ray hands back a remote traceback in the message) as one line naming its cause:
    the first line, then the last ``Type: message`` line of the traceback, the exception that caused it."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    causes = [ln for ln in lines[1:] if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failed)\b:?", ln)]
    head = lines[0].rstrip(":")
    return f"{head}: {causes[-1]}" if causes else head


class FactoryError(Exception):
    """Base class of every error the factory raises on purpose."""

    exit_code: int = 1

    def __reduce__(self):
        return (self.__class__, self.args)


class ConfigError(FactoryError, ValueError):
    """A configuration (YAML, JSON, CLI flags) failed validation.

    ``problems`` lists every problem found, each as ``"<field>: <what is wrong>"``, so that a user fixes
    them all in one go.
    """

    exit_code = 2

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"invalid {source}: {self.problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"invalid {source}: {len(self.problems)} problems\n{lines}")

    def __reduce__(self):
        return (self.__class__, (self.source, self.problems))


class InvalidTenant(ConfigError):
    """A tenant, project or cost-center name breaks the naming rules."""


class ClusterError(FactoryError):
    """The Ray cluster could not be reached, started or stopped."""


class ClusterUnreachable(ClusterError):
    def __init__(self, address: str, reason: str = ""):
        self.address = address
        self.reason = reason
        hint = "start one with `factory up`, or pass --address / set RAY_ADDRESS"
        detail = f" ({reason})" if reason else ""
        super().__init__(f"no Ray cluster answers at {address}{detail}: {hint}")

    def __reduce__(self):
        return (self.__class__, (self.address, self.reason))


class JobNotFound(FactoryError):
    def __init__(self, job_id: str, address: str):
        self.job_id = job_id
        self.address = address
        super().__init__(f"no job {job_id!r} on the cluster at {address}; `factory jobs` lists the jobs")

    def __reduce__(self):
        return (self.__class__, (self.job_id, self.address))


class QuotaExceeded(FactoryError):
    """Work would take a tenant over a resource quota."""

    def __init__(self, tenant: str, resource: str, requested: float, limit: float, in_use: float = 0.0,
                 pool: str | None = None, lane: str | None = None):
        self.tenant = tenant
        self.resource = resource
        self.requested = requested
        self.limit = limit
        self.in_use = in_use
        self.pool = pool  # None: the all-pools quota
        self.lane = lane
        lane_part = "" if lane is None else f", lane={lane!r}"
        super().__init__(
            f"QuotaExceeded(tenant={tenant!r}{lane_part}, pool={pool or 'all'!r}, resource={resource!r}, "
            f"requested={requested:g}, held={in_use:g}, limit={limit:g}): ask an admin to raise the quota "
            "or wait for running work"
        )

    def __reduce__(self):
        return (self.__class__, (self.tenant, self.resource, self.requested, self.limit, self.in_use, self.pool,
                                 self.lane))


class MeterUnavailable(FactoryError):
    """A tenant with a quota asked for work, but the meter has no fresh holdings to check it against.

    Admission fails closed: without live usage the factory cannot tell whether the tenant is within its
    quota, so the work is refused rather than let through.
    """

    def __init__(self, tenant: str, resource: str, age_s: float | None, max_age_s: float):
        self.tenant = tenant
        self.resource = resource
        self.age_s = age_s
        self.max_age_s = max_age_s
        seen = "never reported" if age_s is None else f"last reported {age_s:.0f} s ago (fresh: < {max_age_s:.0f} s)"
        super().__init__(
            f"MeterUnavailable(tenant={tenant!r}, resource={resource!r}): the tenant has a {resource} quota but the "
            f"cost meter {seen}, so its holdings are unknown and the work is refused; start the meter with "
            "`factory up` (it starts with the cluster) or `factory meter start`, then retry"
        )

    def __reduce__(self):
        return (self.__class__, (self.tenant, self.resource, self.age_s, self.max_age_s))


class BudgetExceeded(FactoryError):
    """A tenant is over its hard budget for the current period."""

    def __init__(self, tenant: str, period: str, spent_usd: float, limit_usd: float):
        self.tenant = tenant
        self.period = period
        self.spent_usd = spent_usd
        self.limit_usd = limit_usd
        super().__init__(
            f"BudgetExceeded(tenant={tenant!r}, period={period!r}, spent_usd={spent_usd:.4f}, "
            f"limit_usd={limit_usd:.4f}): no new work is admitted until the budget is raised or the period ends"
        )

    def __reduce__(self):
        return (self.__class__, (self.tenant, self.period, self.spent_usd, self.limit_usd))


class Preempted(FactoryError):
    """A training run yielded to higher-priority work (``aifactory.train.yielding``): it saved a checkpoint at
    ``step`` and stopped; running it again with the same run id resumes from there. Not a failure.

    Its exit code is 75, sysexits' EX_TEMPFAIL ("temporary failure; the user is invited to retry"): what a
    dispatcher reads from ``factory train`` / ``python -m jobs.train`` to put the run back in its queue.
    """

    exit_code = 75

    def __init__(self, run_id: str, step: int, reason: str = ""):
        self.run_id = run_id
        self.step = step
        self.reason = reason
        why = f" ({reason})" if reason else ""
        super().__init__(f"training run {run_id} was preempted at step {step}{why}: its checkpoint is kept; "
                         f"run it again with the same run id (AIFACTORY_RUN_ID={run_id}) to resume from step {step}")

    def __reduce__(self):
        return (self.__class__, (self.run_id, self.step, self.reason))


class QueueRefused(FactoryError):
    """Work the queue will never start as asked (an unknown lane, a tenant not allowed there, a priority out of
    the lane's range, more than the whole cluster, over a limit by itself): refused at once, never queued."""

    def __init__(self, field: str, value: object, limit: object, hint: str = ""):
        self.field = field
        self.value = value
        self.limit = limit
        self.hint = hint
        super().__init__(f"QueueRefused(field={field!r}, value={value!r}, limit={limit!r})"
                         + (f": {hint}" if hint else ""))

    def __reduce__(self):
        return (self.__class__, (self.field, self.value, self.limit, self.hint))


class DataError(FactoryError):
    """A dataset, shard or manifest is missing, corrupt or breaks its contract."""


class ContractViolation(DataError):
    """Data breaks a rule of its dataset contract; names the file and the rule."""

    def __init__(self, path: str, rule: str, detail: str):
        self.path = path
        self.rule = rule
        self.detail = detail
        super().__init__(f"{path}: contract rule {rule!r} broken: {detail}")

    def __reduce__(self):
        return (self.__class__, (self.path, self.rule, self.detail))


class NotFound(FactoryError):
    """A named thing (dataset version, model version, run, deployment) does not exist."""

    def __init__(self, kind: str, name: str, hint: str = ""):
        self.kind = kind
        self.name = name
        self.hint = hint
        super().__init__(f"no {kind} {name!r}" + (f": {hint}" if hint else ""))

    def __reduce__(self):
        return (self.__class__, (self.kind, self.name, self.hint))


class IntegrityError(FactoryError):
    """An artifact's digest or signature does not match its manifest."""

    def __init__(self, path: str, expected: str, actual: str):
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(f"{path}: integrity check failed (expected {expected}, found {actual}); refusing to load it")

    def __reduce__(self):
        return (self.__class__, (self.path, self.expected, self.actual))


class AuthenticationError(FactoryError):
    """A request carried no API key, or one that is unknown, revoked or malformed (HTTP 401)."""


class PermissionDenied(FactoryError):
    """An authenticated caller may not do this (HTTP 403; cross-tenant reads answer 404 instead)."""


class VariantRejected(FactoryError):
    """An optimized variant (quantized, distilled) failed its quality gate: it is kept, but not servable."""

    exit_code = 3

    def __init__(self, ref: str, reason: str):
        self.ref = ref
        self.reason = reason
        super().__init__(f"variant {ref} failed its quality gate and was registered as NOT servable: {reason}")

    def __reduce__(self):
        return (self.__class__, (self.ref, self.reason))


class EmbeddingModelMismatch(FactoryError):
    """A retrieval index was built from another embedding model's vectors than the one at hand: its neighbours
    would be meaningless, so it is refused (build: the embeddings' model; serving: the query encoder)."""

    def __init__(self, where: str, index_model: str, serving_model: str):
        self.where = where
        self.index_model = index_model
        self.serving_model = serving_model
        super().__init__(f"{where}: built with embedding model {index_model}, but the model here is {serving_model}; "
                         "rebuild the index from embeddings of this model, or serve the model it "
                         "was built with")

    def __reduce__(self):
        return (self.__class__, (self.where, self.index_model, self.serving_model))


class IndexStale(FactoryError):
    """A tenant's retrieval index is older than the tier allows (answers 503 until a fresh one is published)."""

    def __init__(self, tenant: str, version: str, age_s: float, max_age_s: float):
        self.tenant = tenant
        self.version = version
        self.age_s = age_s
        self.max_age_s = max_age_s
        super().__init__(f"tenant {tenant!r}: index {version} is {age_s:.0f}s old, over the tier's max_age_s "
                         f"{max_age_s:.0f}s; publish a newer index")

    def __reduce__(self):
        return (self.__class__, (self.tenant, self.version, self.age_s, self.max_age_s))
