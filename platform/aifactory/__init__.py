"""aifactory: data, training, serving and benchmarks on one Ray cluster, with per-tenant cost accounting.

``import aifactory`` is light: it imports neither torch nor Ray's Serve/Train/Data. Public names resolve on
first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public API by area: name -> module that defines it.
_EXPORTS: dict[str, str] = {
    # tenancy and configuration
    "TenantRef": "aifactory.tenancy",
    "WorkloadKind": "aifactory.tenancy",
    "SLOClass": "aifactory.tenancy",
    "JobTags": "aifactory.tenancy",
    "job_metadata": "aifactory.tenancy",
    "tags_from_metadata": "aifactory.tenancy",
    "UNATTRIBUTED": "aifactory.tenancy",
    "StrictModel": "aifactory.config",
    "load_config": "aifactory.config",
    "parse_config": "aifactory.config",
    "FactoryHome": "aifactory.home",
    # errors
    "FactoryError": "aifactory.exceptions",
    "ConfigError": "aifactory.exceptions",
    "ClusterUnreachable": "aifactory.exceptions",
    "JobNotFound": "aifactory.exceptions",
    "QuotaExceeded": "aifactory.exceptions",
    "BudgetExceeded": "aifactory.exceptions",
    "DataError": "aifactory.exceptions",
    "ContractViolation": "aifactory.exceptions",
    "NotFound": "aifactory.exceptions",
    "IntegrityError": "aifactory.exceptions",
    "AuthenticationError": "aifactory.exceptions",
    "PermissionDenied": "aifactory.exceptions",
    # cluster and jobs
    "LocalCluster": "aifactory.cluster",
    "Client": "aifactory.jobs",
    "JobRecord": "aifactory.jobs",
    # serving
    "CompletionsArgs": "aifactory.serve.config",
    "EmbeddingsArgs": "aifactory.serve.config",
    "tenant_usage": "aifactory.serve.usage",
    # data plane
    "ByteTokenizer": "aifactory.data.tokenizer",
    "DatasetStore": "aifactory.data.store",
    "DatasetVersion": "aifactory.data.store",
    "IngestConfig": "aifactory.data.ingest",
    "ingest": "aifactory.data.ingest",
    # models, registry and training
    "GPTConfig": "aifactory.models.config",
    "ModelRegistry": "aifactory.registry",
    "ModelVersion": "aifactory.registry",
    "TrainJob": "aifactory.train.config",
    "run_training": "aifactory.train.runner",
    # benchmarks
    "SweepSpec": "aifactory.bench.spec",
    "run_sweep": "aifactory.bench.runner",
    "compare_runs": "aifactory.bench.compare",
    # security: the control API's client, API keys
    "ControlClient": "aifactory.control.client",
    "KeyStore": "aifactory.security.apikeys",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aifactory' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from aifactory.cluster import LocalCluster
    from aifactory.config import StrictModel, load_config, parse_config
    from aifactory.exceptions import (
        BudgetExceeded, ClusterUnreachable, ConfigError, ContractViolation, DataError, FactoryError,
        IntegrityError, JobNotFound, NotFound, QuotaExceeded, AuthenticationError, PermissionDenied,
    )
    from aifactory.home import FactoryHome
    from aifactory.control.client import ControlClient
    from aifactory.jobs import Client, JobRecord
    from aifactory.security.apikeys import KeyStore
    from aifactory.serve.config import CompletionsArgs, EmbeddingsArgs
    from aifactory.serve.usage import tenant_usage
    from aifactory.tenancy import (
        UNATTRIBUTED, JobTags, SLOClass, TenantRef, WorkloadKind, job_metadata, tags_from_metadata,
    )
