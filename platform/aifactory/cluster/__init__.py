"""The Ray cluster the factory runs on: a local head (`factory up`), or any cluster by address."""

from aifactory.cluster.connect import ClusterAddress, init_ray, ray_env, resolve_address
from aifactory.cluster.local import ClusterState, LocalCluster

__all__ = ["ClusterAddress", "ClusterState", "LocalCluster", "init_ray", "ray_env", "resolve_address"]
