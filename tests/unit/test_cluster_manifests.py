"""Every file under cluster/ is a test case (../shared/STYLE.md, "Every shipped YAML is a test case").

- KubeRay manifests (RayCluster, RayJob, RayService) validate against the CRDs' ``openAPIV3Schema`` in
  ``../shared/kuberay-crds/``, with Kubernetes' semantics where plain JSON Schema differs: int-or-string
  fields, ``nullable``, unknown fields rejected (``kubectl apply`` validates strictly), and the CRDs' CEL
  rules evaluated after defaulting (``tests/unit/_crd.py``).
- Kueue manifests (ResourceFlavor, Cohort, ClusterQueue, LocalQueue, WorkloadPriorityClass) validate against
  the CRDs in ``../shared/kueue-crds/`` the same way, CEL rules included (``tests/unit/_crd.py``); a tenant's
  Namespace is named after the tenant and labelled with it. How they refer to each other, and to the RayJobs
  they queue, is checked by ``test_kueue_manifests.py``.
- Launcher YAMLs validate against ``ray/autoscaler/ray-schema.json`` from the installed ray, after the
  defaults that ``ray up`` fills in, with Ray's own ``validate_config``.
- Embedded Serve configs (``serveConfigV2``) validate against ``ray.serve.schema.ServeDeploySchema``; each
  application's import path resolves to a module of this repository, its args satisfy the builder's
  pydantic model and the deployments it overrides exist in the built application.
- Runtime environments parse as Ray ``RuntimeEnv``s; ``rayVersion`` and every image tag match the ray pin
  in pyproject.toml, and the aifactory wheel they install matches the project's version.
- Every node pool carries the ``aifactory.io/pool`` / ``aifactory.io/pricing-class`` Ray node labels that
  the cost collector prices by.

``check_manifest`` is also run on deliberately broken copies, so that the suite cannot silently pass.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.unit._crd import DNS_LABEL, REPO, SHARED, check_object_meta, crd_version, jsonschema_errors, schema_errors
from tests.unit._crd import load_yaml_all as _load_yaml_all

CLUSTER = REPO / "cluster"
CRDS = SHARED / "kuberay-crds"
KUEUE_CRDS = SHARED / "kueue-crds"
CLUSTER_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)

POOL_LABEL = "aifactory.io/pool"
TENANT_LABEL = "aifactory.io/tenant"
PRICING_LABEL = "aifactory.io/pricing-class"
PRICING_CLASSES = {"on-demand", "reserved", "spot"}
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


@functools.cache
def _pins() -> tuple[str, str]:
    """(ray version, aifactory version) from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_pins = [re.fullmatch(r"ray(\[[^\]]*\])?==([0-9.]+)", d.replace(" ", "")) for d in project["dependencies"]]
    ray_pins = [m.group(2) for m in ray_pins if m]
    assert len(ray_pins) == 1, f"expected exactly one ray==X pin in pyproject.toml, found {ray_pins}"
    return ray_pins[0], project["version"]


# --------------------------------------------------------------------------------------------------
# What the factory requires on top of the schemas


def _check_image(image: str, where: str) -> None:
    ray_pin, _ = _pins()
    m = re.fullmatch(r"rayproject/ray(?:-ml|-llm)?:([0-9.]+)(-py3\d+)?(-cpu|-gpu|-cu\d+)?", image)
    assert m, f"{where}: image {image!r} is not a rayproject/ray:<version>[-pyXY][-gpu] image"
    assert m.group(1) == ray_pin, f"{where}: image {image!r} does not match the ray pin {ray_pin} in pyproject.toml"
    if m.group(2):
        assert m.group(2) == "-py311", f"{where}: image {image!r}: the project runs Python 3.11"


def _check_node_labels(labels: dict[str, str], where: str) -> None:
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

    assert labels.get(POOL_LABEL), f"{where}: Ray node label {POOL_LABEL!r} is missing (the cost collector prices by it)"
    assert labels.get(PRICING_LABEL) in PRICING_CLASSES, (
        f"{where}: Ray node label {PRICING_LABEL!r} must be one of {sorted(PRICING_CLASSES)}, got {labels.get(PRICING_LABEL)!r}"
    )
    validate_node_label_syntax(labels)  # Kubernetes label syntax, as `ray start --labels` checks
    validate_node_labels(labels)  # and not under Ray's reserved ray.io/ prefix


def _check_runtime_env(runtime_env: dict, where: str) -> None:
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**runtime_env)
    except Exception as e:  # noqa: BLE001 - any rejection by Ray is a test failure with its message
        raise AssertionError(f"{where}: runtime_env rejected by Ray: {e}") from e
    _, version = _pins()
    pip = runtime_env.get("pip") or []
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip
    for req in packages:
        m = re.match(r"aifactory\s*(@\s*\S*aifactory-([0-9][^-]*)-|==\s*([0-9.]+))", req)
        if m:
            got = m.group(2) or m.group(3)
            assert got == version, f"{where}: installs aifactory {got}, but pyproject.toml is at {version}"


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _check_entrypoint(entrypoint: str, where: str) -> None:
    m = re.match(r"python3?\s+-m\s+([\w.]+)", entrypoint)
    assert m, f"{where}: entrypoint {entrypoint!r} should run a recipe module (`python -m jobs.<verb> ...`)"
    assert _module_file(m.group(1)), f"{where}: entrypoint module {m.group(1)!r} is not a module of this repository"


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    ray_pin, _ = _pins()
    assert spec.get("rayVersion") == ray_pin, f"{where}: rayVersion {spec.get('rayVersion')!r} != ray pin {ray_pin}"
    assert (spec.get("authOptions") or {}).get("mode") == "token", f"{where}: Ray token auth must be on (authOptions.mode: token)"
    groups = [("headGroupSpec", spec["headGroupSpec"])] + [
        (f"workerGroupSpecs[{g['groupName']}]", g) for g in spec.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        gwhere = f"{where}.{name}"
        pod = group["template"]["spec"]
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            _check_image(c["image"], f"{gwhere}.{c['name']}")
        labels = group.get("labels") or {}
        _check_node_labels(labels, gwhere)
        pod_labels = (group["template"].get("metadata") or {}).get("labels") or {}
        assert pod_labels.get(POOL_LABEL) == labels[POOL_LABEL], (
            f"{gwhere}: pod label {POOL_LABEL}={pod_labels.get(POOL_LABEL)!r} differs from the Ray node label {labels[POOL_LABEL]!r}"
        )
        for res, amount in (group.get("resources") or {}).items():
            assert float(amount) >= 0, f"{gwhere}: Ray resource {res}={amount!r} must be a non-negative number"
        if name != "headGroupSpec":
            lo, hi, n = group["minReplicas"], group["maxReplicas"], group.get("replicas", group["minReplicas"])
            assert 0 <= lo <= n <= hi, f"{gwhere}: need minReplicas ({lo}) <= replicas ({n}) <= maxReplicas ({hi})"
            if spec.get("enableInTreeAutoscaling"):
                assert hi > lo, f"{gwhere}: an autoscaled group needs maxReplicas > minReplicas"
    pools = [g.get("labels", {}).get(POOL_LABEL) for _, g in groups]
    assert len(pools) == len(set(pools)), f"{where}: each group needs its own {POOL_LABEL} (got {pools})"


def _check_serve_config(text: str, where: str) -> None:
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    (config,) = _load_yaml_all(text)
    # Ray's schemas accept unknown keys silently; `serve deploy` would then ignore a misspelt field.
    for key in config:
        assert key in ServeDeploySchema.model_fields, f"{where}: unknown Serve config field {key!r}"
    for app in config.get("applications", []):
        for key in app:
            assert key in ServeApplicationSchema.model_fields, f"{where}: application field {key!r} is unknown"
        for dep in app.get("deployments", []):
            for key in dep:
                assert key in DeploymentSchema.model_fields, f"{where}: deployment field {key!r} is unknown"
    schema = ServeDeploySchema.model_validate(config)

    for app in schema.applications:
        awhere = f"{where}: application {app.name!r}"
        if app.runtime_env:
            _check_runtime_env(app.runtime_env, awhere)
        module_name, _, attr = app.import_path.replace(":", ".").rpartition(".")
        assert _module_file(module_name), (
            f"{awhere}: import_path {app.import_path!r}: no module {module_name!r} in this repository "
            f"(expected {module_name.replace('.', '/')}.py)"
        )
        module = importlib.import_module(module_name)
        builder = getattr(module, attr, None)
        assert builder is not None, f"{awhere}: {module_name} has no attribute {attr!r}"
        _check_app_builds(builder, app, awhere)


def _check_app_builds(builder, app, where: str) -> None:
    """What `serve deploy` does with an application: convert args, call the builder, build the graph."""
    import inspect
    import typing

    from pydantic import BaseModel
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    from aifactory.exceptions import NotFound

    if inspect.isfunction(builder):
        (param,) = inspect.signature(builder).parameters.values()
        hinted = typing.get_type_hints(builder).get(param.name)
        if inspect.isclass(hinted) and issubclass(hinted, BaseModel):
            hinted.model_validate(app.args or {})  # the args match the builder's model
            # Ray converts args only when the annotation is the class itself: a string annotation
            # (`from __future__ import annotations`) makes Serve pass the builder a plain dict.
            assert inspect.isclass(param.annotation), (
                f"{where}: {builder.__module__}.{builder.__name__}'s parameter annotation is the string "
                f"{param.annotation!r}; Serve passes such a builder a dict, not {hinted.__name__}"
            )
    try:
        built = build_app(call_user_app_builder_with_args_if_necessary(builder, app.args or {}), name=app.name)
        names = {d.name for d in built.deployments}
    except NotFound:
        # The builder resolves live state (e.g. the registry's newest model version) that a unit test has
        # no cluster for: check the overridden names against the names the builder's module spells out.
        source = inspect.getsource(inspect.getmodule(inspect.unwrap(builder)))
        names = {dep.name for dep in app.deployments if f'"{dep.name}"' in source or f"'{dep.name}'" in source}
    for dep in app.deployments:
        assert dep.name in names, f"{where}: overrides deployment {dep.name!r}, which the app does not define ({sorted(names)})"


def _check_kuberay(doc: dict, where: str) -> None:
    kind = doc["kind"]
    errors = schema_errors(doc, CRDS)
    assert not errors, f"{where}: {kind} does not validate against the KubeRay CRD:\n  " + "\n  ".join(errors[:20])
    check_object_meta(doc.get("metadata"), where)
    spec = doc["spec"]
    if kind == "RayCluster":
        _check_ray_cluster_spec(spec, where)
    elif kind == "RayJob":
        assert spec.get("rayClusterSpec") or spec.get("clusterSelector"), f"{where}: needs rayClusterSpec or clusterSelector"
        if spec.get("rayClusterSpec"):
            _check_ray_cluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
        else:
            target = spec["clusterSelector"].get("ray.io/cluster")
            names = {
                d["metadata"]["name"]
                for p in CLUSTER_FILES
                if p.suffix in (".yaml", ".yml")
                for d in _load_yaml_all(p.read_text())
                if isinstance(d, dict) and d.get("kind") == "RayCluster"
            }
            assert target in names, f"{where}: clusterSelector ray.io/cluster={target!r} names no RayCluster in cluster/ ({sorted(names)})"
        from aifactory.tenancy import TenantRef

        meta = spec.get("metadata") or {}
        assert "tenant" in meta, f"{where}: spec.metadata needs a tenant (the job's cost attribution)"
        TenantRef(tenant=meta["tenant"], project=meta.get("project", "default"))
        if spec.get("runtimeEnvYAML"):
            (runtime_env,) = _load_yaml_all(spec["runtimeEnvYAML"])
            _check_runtime_env(runtime_env, f"{where}.runtimeEnvYAML")
        _check_entrypoint(spec["entrypoint"], where)
    elif kind == "RayService":
        _check_ray_cluster_spec(spec["rayClusterConfig"], f"{where}.rayClusterConfig")
        assert spec.get("serveConfigV2"), f"{where}: a RayService needs serveConfigV2"
        _check_serve_config(spec["serveConfigV2"], f"{where}.serveConfigV2")


def _check_launcher(config: dict, where: str) -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = jsonschema_errors(config, schema)
    assert not errors, f"{where}: does not validate against ray-schema.json:\n  " + "\n  ".join(errors[:20])
    try:  # what `ray up` runs: fill in the provider's defaults, then Ray's own checks
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{where}: Ray rejects the launcher config: {e}") from e
    docker = config.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            _check_image(docker[key], f"{where}.docker.{key}")
    assert config.get("idle_timeout_minutes") is not None, f"{where}: set idle_timeout_minutes"
    for name, node_type in config["available_node_types"].items():
        nwhere = f"{where}.available_node_types.{name}"
        _check_node_labels(node_type.get("labels") or {}, nwhere)
        if (node_type.get("docker") or {}).get("worker_image"):
            _check_image(node_type["docker"]["worker_image"], nwhere)
        if name != config["head_node_type"]:
            lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
            assert 0 <= lo <= hi and hi > 0, f"{nwhere}: need 0 <= min_workers ({lo}) <= max_workers ({hi}), max > 0"


def _check_kueue(doc: dict, where: str) -> None:
    # How they fit together (queues -> flavors, cohorts, namespaces; RayJobs -> queues) is
    # tests/unit/test_kueue_manifests.py's: this checks each object alone.
    errors = schema_errors(doc, KUEUE_CRDS)
    assert not errors, f"{where}: {doc['kind']} does not validate against the Kueue CRD:\n  " + "\n  ".join(errors[:20])
    scope = crd_version(KUEUE_CRDS, doc["kind"], doc["apiVersion"])["scope"]
    check_object_meta(doc.get("metadata"), where, scope=scope)
    if scope == "Namespaced":  # else kubectl puts it in whatever namespace the caller's context has
        assert doc["metadata"].get("namespace"), f"{where}: a {doc['kind']} names its tenant's namespace (metadata.namespace)"


def _check_namespace(doc: dict, where: str) -> None:
    from aifactory.tenancy import TenantRef

    assert set(doc) <= {"apiVersion", "kind", "metadata"}, f"{where}: a tenant Namespace has only metadata (got {sorted(doc)})"
    meta = doc.get("metadata")
    check_object_meta(meta, where, scope="Cluster")
    name = meta["name"]
    assert DNS_LABEL.match(name), f"{where}: namespace name {name!r} must be a DNS label"
    tenant = (meta.get("labels") or {}).get(TENANT_LABEL)
    assert tenant == name, f"{where}: a tenant's namespace is named after it and labelled {TENANT_LABEL}={name!r} (got {tenant!r})"
    TenantRef(tenant=tenant)


def check_manifest(path: Path) -> int:
    """Validate one file under cluster/; returns how many documents it checked. Raises on any problem."""
    assert path.suffix in (".yaml", ".yml"), f"{path}: cluster/ holds only YAML manifests"
    docs = _load_yaml_all(path.read_text())
    assert docs, f"{path}: empty"
    for i, doc in enumerate(docs):
        where = f"{path.name}[{i}]"
        assert isinstance(doc, dict), f"{where}: not a mapping"
        if doc.get("apiVersion", "").startswith("ray.io/"):
            assert doc.get("kind") in KUBERAY_KINDS, f"{where}: unknown KubeRay kind {doc.get('kind')!r}"
            _check_kuberay(doc, where)
        elif doc.get("apiVersion", "").startswith("kueue.x-k8s.io/"):
            _check_kueue(doc, where)
        elif doc.get("apiVersion") == "v1" and doc.get("kind") == "Namespace":
            _check_namespace(doc, where)
        elif "provider" in doc and "cluster_name" in doc:
            _check_launcher(doc, where)
        else:
            raise AssertionError(f"{where}: neither a KubeRay or Kueue manifest (apiVersion ray.io/..., kueue.x-k8s.io/...), "
                                 "a tenant Namespace nor a launcher config")
    return len(docs)


# --------------------------------------------------------------------------------------------------


def test_cluster_dir_has_the_manifests():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER_FILES}
    for required in (
        "kuberay/ray-cluster.factory.yaml",
        "kuberay/ray-job.train.yaml",
        "kuberay/ray-service.completions.yaml",
        "launcher/aws.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_manifest_is_valid(path: Path):
    assert check_manifest(path) >= 1


def test_factory_cluster_has_every_pool():
    (cluster,) = _load_yaml_all((CLUSTER / "kuberay/ray-cluster.factory.yaml").read_text())
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}

    def limits(g):
        return g["template"]["spec"]["containers"][0]["resources"]["limits"]

    train = [g for g in groups.values() if "pool_train" in g.get("resources", {})]
    assert {g["labels"][PRICING_LABEL] for g in train} == {"reserved", "spot"}
    assert all(limits(g).get("nvidia.com/gpu") for g in train)
    spot = next(g for g in train if g["labels"][PRICING_LABEL] == "spot")
    assert spot["template"]["spec"].get("tolerations"), "spot nodes are tainted: the spot group must tolerate it"
    inference = [g for g in groups.values() if "pool_inference" in g.get("resources", {})]
    assert any(limits(g).get("nvidia.com/gpu") for g in inference)
    assert any(set(g["resources"]) - {"pool_inference"} for g in inference), "an ASIC example (custom resource)"
    data = [g for g in groups.values() if "pool_data" in g.get("resources", {})]
    assert data and not any(limits(g).get("nvidia.com/gpu") for g in data)
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


def _set(doc: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    if value is _DELETE:
        del doc[last]
    elif isinstance(doc, list):
        doc[int(last)] = value
    else:
        doc[last] = value


_DELETE = object()


def _serve_config_with(**changes: Any):
    def mutate(doc: dict) -> None:
        (config,) = _load_yaml_all(doc["spec"]["serveConfigV2"])
        config["applications"][0].update(changes)
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)

    return mutate


# case -> (file, what to change, new value, a fragment the error must name: the failure is the mutation's)
BROKEN = {
    "typo-in-worker-group": (
        "kuberay/ray-cluster.factory.yaml", "spec.workerGroupSpecs.0.minReplica", 0, "'minReplica' was unexpected",
    ),
    "missing-required-field": (
        "kuberay/ray-cluster.factory.yaml", "spec.workerGroupSpecs.0.maxReplicas", _DELETE, "'maxReplicas' is a required",
    ),
    "wrong-type": ("kuberay/ray-cluster.factory.yaml", "spec.workerGroupSpecs.0.maxReplicas", "many", "maxReplicas"),
    "bad-quantity": (
        "kuberay/ray-cluster.factory.yaml",
        "spec.headGroupSpec.template.spec.containers.0.resources.limits.memory",
        "lots",
        "limits.memory",
    ),
    "stale-ray-version": ("kuberay/ray-cluster.factory.yaml", "spec.rayVersion", "2.9.0", "rayVersion '2.9.0'"),
    "stale-image": (
        "kuberay/ray-cluster.factory.yaml",
        "spec.headGroupSpec.template.spec.containers.0.image",
        "rayproject/ray:2.52.0-py311",
        "does not match the ray pin",
    ),
    "auth-off": ("kuberay/ray-cluster.factory.yaml", "spec.authOptions", {"mode": "disabled"}, "token auth"),
    "pool-label-missing": ("kuberay/ray-cluster.factory.yaml", "spec.workerGroupSpecs.0.labels", {}, POOL_LABEL),
    "bad-ray-label": (
        "kuberay/ray-cluster.factory.yaml",
        lambda doc: doc["spec"]["workerGroupSpecs"][0]["labels"].update({"ray.io/pool": "x"}),
        None,
        "ray.io/",
    ),
    "job-module-missing": (
        "kuberay/ray-job.train.yaml", "spec.entrypoint", "python -m jobs.no_such_job", "'jobs.no_such_job'",
    ),
    "job-without-tenant": ("kuberay/ray-job.train.yaml", "spec.metadata", {"project": "x"}, "needs a tenant"),
    "job-bad-runtime-env": (
        "kuberay/ray-job.train.yaml", "spec.runtimeEnvYAML", "pip: 3\n", "runtime_env rejected",
    ),
    "serve-import-missing": (
        "kuberay/ray-service.completions.yaml",
        _serve_config_with(import_path="serve_apps.no_such_app:app_builder"),
        None,
        "no module 'serve_apps.no_such_app'",
    ),
    "serve-unknown-deployment": (
        "kuberay/ray-service.completions.yaml",
        _serve_config_with(deployments=[{"name": "NoSuchDeployment", "num_replicas": 1}]),
        None,
        "'NoSuchDeployment'",
    ),
    "serve-bad-args": (
        "kuberay/ray-service.embeddings.yaml", _serve_config_with(args={"max_queued_request": 3}), None, "max_queued_request",
    ),
    "serve-unknown-field": (
        "kuberay/ray-service.completions.yaml", _serve_config_with(rout_prefix="/x"), None, "'rout_prefix' is unknown",
    ),
    "launcher-unknown-field": (
        "launcher/aws.yaml", "available_node_types.data_cpu.max_worker", 3, "'max_worker' was unexpected",
    ),
    "launcher-bad-head-type": ("launcher/aws.yaml", "head_node_type", "no_such_type", "head_node_type"),
    "launcher-stale-image": (
        "launcher/aws.yaml", "docker.image", "rayproject/ray:2.40.0-py311-gpu", "does not match the ray pin",
    ),
}


def _recipes_present() -> bool:
    return all(_module_file(m) for m in ("jobs.train", "serve_apps.completions", "serve_apps.embeddings"))


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_manifest_rejects_a_broken_copy(case, tmp_path):
    rel, where, value, message = BROKEN[case]
    (doc,) = _load_yaml_all((CLUSTER / rel).read_text())
    broken = copy.deepcopy(doc)
    if callable(where):
        where(broken)
    else:
        _set(broken, where, value)
    target = tmp_path / Path(rel).name
    target.write_text(yaml.safe_dump(broken, sort_keys=False))
    with pytest.raises((AssertionError, ValueError, jsonschema.ValidationError), match=re.escape(message)):
        check_manifest(target)
    # ...while the untouched copy passes (once the recipes it names exist: until then the parametrized
    # test above reports them missing).
    if _recipes_present():
        target.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert check_manifest(target) == 1
