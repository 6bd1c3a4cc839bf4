"""One multi-node Ray cluster on this machine for tests/multinode, built with ``ray.cluster_utils.Cluster``.

A head (no workload resources) and, per test, worker nodes with their own CPUs, custom pool resources
and ``aifactory.io/pool`` labels, like the pools of cluster/kuberay/ray-cluster.factory.yaml. Tests add
the nodes they need through ``add_pool_node`` and may kill them (``remove_node``); whatever a test added
is removed after it. This folder runs in its own pytest process (see the Makefile): Ray Train gets
confused by two Ray clusters in one process (../shared/RAY-2.60-NOTES.md), and tests/integration has its
own.
"""

from __future__ import annotations

import os
import socket

# tests/conftest.py sets these at import too; repeated here because every raylet this process starts
# inherits them: nodes bind to 127.0.0.1 only and report no usage stats.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Train's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and
# ray.train.report blocks until the poll: a shorter poll keeps the multi-node Train test short.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
    os.environ.pop(var, None)

import pytest  # noqa: E402

POOL_LABEL = "aifactory.io/pool"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MultiNode:
    """The session cluster plus the worker nodes the current test added."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.added: list = []

    def add_pool_node(self, pool: str, *, num_cpus: float = 1, resources: dict[str, float] | None = None,
                      labels: dict[str, str] | None = None):
        node = self.cluster.add_node(
            num_cpus=num_cpus,
            resources={f"pool_{pool.split('-')[0]}": 1, **(resources or {})},
            labels={POOL_LABEL: pool, **(labels or {})},  # e.g. aifactory.io/pricing-class
            object_store_memory=100 << 20,
        )
        self.added.append(node)
        return node

    def remove_node(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)  # a node lost, not drained
        self.added.remove(node)

    def node_id(self, node) -> str:
        return node.node_id

    def cleanup(self) -> None:
        for node in list(self.added):
            self.cluster.remove_node(node)
        self.added.clear()


@pytest.fixture(scope="session")
def _cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,  # drivers, Serve's controller and proxy, Train's controller
            "resources": {"pool_head": 1},
            "labels": {POOL_LABEL: "head"},
            "object_store_memory": 200 << 20,
            # The cost collector reads Ray's state API, which only a full dashboard serves (without it the
            # API server answers no HTTP); on a free loopback port, never the shared default 8265.
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(),
        },
    )
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def multinode(_cluster):
    nodes = MultiNode(_cluster)
    yield nodes
    nodes.cleanup()
