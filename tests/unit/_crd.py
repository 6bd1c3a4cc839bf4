"""Offline validation of Kubernetes custom resources against their CRDs, as the API server would do it.

Shared by the manifest tests (``test_cluster_manifests.py``: KubeRay; ``test_kueue_manifests.py``: Kueue):

- ``crd_version(crd_dir, kind, api_version)`` finds the CRD of ``kind`` in a directory of CRD files (e.g.
  ``../shared/kuberay-crds/``) and returns its served, non-deprecated version named by ``api_version``;
  the test skips, naming the directory, where the directory is missing (a user's clone has no ../shared/).
- ``schema_errors(doc, crd_version)`` checks a manifest against that version's ``openAPIV3Schema`` with
  Kubernetes' semantics where plain JSON Schema differs: int-or-string fields, ``nullable``, and unknown
  fields rejected (``kubectl apply`` validates strictly); then applies the schema's defaults and evaluates
  its CEL rules (``x-kubernetes-validations``), each translated below, as the API server does after
  defaulting. A rule this module has no translation for fails loudly rather than passing unchecked.
- ``check_object_meta`` checks what a CRD leaves opaque (``metadata``: name, labels, annotations).
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# ../shared/ lies beside the checkout for developers and CI, not beside a user's clone: point
# AIFACTORY_SHARED_DIR at a copy, or the tests that need it skip naming the directory they need.
SHARED = Path(os.environ.get("AIFACTORY_SHARED_DIR") or REPO.parent / "shared")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_yaml_all(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d is not None]


# --------------------------------------------------------------------------------------------------
# Finding the CRD


@functools.cache
def _crds_by_kind(crd_dir: Path) -> dict[str, dict]:
    crds = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in load_yaml_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds[doc["spec"]["names"]["kind"]] = doc
    return crds


def crd_version(crd_dir: Path, kind: str, api_version: str) -> dict:
    """The CRD version (``name``, ``schema``, ...) that serves ``api_version`` for ``kind``, with ``scope`` added."""
    if not crd_dir.is_dir():
        pytest.skip(f"needs the CRD schemas in {crd_dir} (../shared/ beside the repository, as CI has it; "
                    f"or set AIFACTORY_SHARED_DIR to a directory holding {crd_dir.name}/)")
    crds = _crds_by_kind(crd_dir)
    assert kind in crds, f"kind {kind!r} has no CRD in {crd_dir} (kinds there: {sorted(crds)})"
    crd = crds[kind]
    group, _, version = api_version.partition("/")
    assert group == crd["spec"]["group"], f"apiVersion {api_version!r}: group must be {crd['spec']['group']!r}"
    versions = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in versions, f"apiVersion {api_version!r}: served versions are {sorted(versions)}"
    assert not versions[version].get("deprecated"), (
        f"apiVersion {api_version!r} is deprecated; served versions are {sorted(versions)}"
    )
    return {**versions[version], "scope": crd["spec"]["scope"]}


# --------------------------------------------------------------------------------------------------
# Structural schema -> JSON Schema


def k8s_to_jsonschema(node: Any) -> Any:
    """An OpenAPI v3 structural schema (as in a CRD) as a JSON Schema that checks what the API server does."""
    if isinstance(node, list):
        return [k8s_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: k8s_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    for key in ("properties", "patternProperties"):  # their keys are field names, not schema keywords
        if key in node:
            out[key] = {name: k8s_to_jsonschema(sub) for name, sub in node[key].items()}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    # The API server (kubectl's default --validate=strict) rejects fields a structural schema does not
    # declare, unless the node preserves unknown fields: JSON Schema allows them unless told otherwise.
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(crd_dir: Path, kind: str, api_version: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(k8s_to_jsonschema(crd_version(crd_dir, kind, api_version)["schema"]["openAPIV3Schema"]))


def jsonschema_errors(instance: Any, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


def schema_errors(doc: dict, crd_dir: Path) -> list[str]:
    """Every way ``doc`` fails its CRD: the structural schema, then (after defaulting) the CEL rules."""
    version = crd_version(crd_dir, doc["kind"], doc["apiVersion"])
    validator = _validator(crd_dir, doc["kind"], doc["apiVersion"])
    errors = [
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if errors:  # CEL rules assume a structurally valid object
        return errors
    schema = version["schema"]["openAPIV3Schema"]
    return cel_errors(apply_defaults(copy.deepcopy(doc), schema), schema)


# --------------------------------------------------------------------------------------------------
# Defaulting and CEL rules (x-kubernetes-validations)


def apply_defaults(instance: Any, schema: dict) -> Any:
    """The structural schema's ``default``s filled in, as the API server does before it runs CEL rules."""
    if isinstance(instance, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                instance[name] = apply_defaults(instance[name], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            for name in instance:
                instance[name] = apply_defaults(instance[name], schema["additionalProperties"])
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in instance]
    return instance


_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# Each CEL rule of the CRDs under ../shared/, by its text (whitespace collapsed), as a Python predicate of
# `self`. Rules on `oldSelf` (immutability on update) cannot fail on a create and are not listed.
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    # Kueue ClusterQueue / Cohort
    "!has(self.cohortName) && has(self.resourceGroups) ? self.resourceGroups.all(rg, rg.flavors.all(f, "
    "f.resources.all(r, !has(r.borrowingLimit)))) : true":
        lambda s: "cohortName" in s or "resourceGroups" not in s
        or all("borrowingLimit" not in r for rg in s["resourceGroups"] for f in rg["flavors"] for r in f["resources"]),
    "!has(self.preference) || (self.whenCanBorrow == 'TryNextFlavor' && self.whenCanPreempt == 'TryNextFlavor')":
        lambda s: "preference" not in s
        or (s.get("whenCanBorrow") == "TryNextFlavor" and s.get("whenCanPreempt") == "TryNextFlavor"),
    "!(self.reclaimWithinCohort == 'Never' && has(self.borrowWithinCohort) && self.borrowWithinCohort.policy != 'Never')":
        lambda s: not (s.get("reclaimWithinCohort") == "Never" and "borrowWithinCohort" in s
                       and s["borrowWithinCohort"].get("policy") != "Never"),
    "self.flavors.all(x, size(x.resources) == size(self.coveredResources))":
        lambda s: all(len(f["resources"]) == len(s["coveredResources"]) for f in s["flavors"]),
    # Kueue ResourceFlavor
    "!has(self.topologyName) || self.nodeLabels.size() >= 1":
        lambda s: "topologyName" not in s or len(s.get("nodeLabels") or {}) >= 1,
    "self.all(x, x.effect in ['NoSchedule', 'PreferNoSchedule', 'NoExecute'])":
        lambda s: all(x.get("effect") in _EFFECTS for x in s),
    "self.all(x, !has(x.key) ? x.operator == 'Exists' : true)":
        lambda s: all("key" in x or x.get("operator") == "Exists" for x in s),
    "self.all(x, has(x.tolerationSeconds) ? x.effect == 'NoExecute' : true)":
        lambda s: all("tolerationSeconds" not in x or x.get("effect") == "NoExecute" for x in s),
    "self.all(x, !has(x.operator) || x.operator in ['Equal', 'Exists'])":
        lambda s: all("operator" not in x or x["operator"] in ("Equal", "Exists") for x in s),
    "self.all(x, has(x.operator) && x.operator == 'Exists' ? !has(x.value) : true)":
        lambda s: all(not (x.get("operator") == "Exists" and "value" in x) for x in s),
    "self.all(x, !has(x.effect) || x.effect in ['NoSchedule', 'PreferNoSchedule', 'NoExecute'])":
        lambda s: all("effect" not in x or x["effect"] in _EFFECTS for x in s),
    # KubeRay
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda s: not ("jobStatus" in s and "jobDeploymentStatus" in s),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda s: "jobStatus" in s or "jobDeploymentStatus" in s,
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not (("onSuccess" in s or "onFailure" in s) and "deletionRules" in s),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: ("onSuccess" in s and "onFailure" in s) or "deletionRules" in s,
}


def _normalise(rule: str) -> str:
    return " ".join(rule.split())


_CEL = {_normalise(rule): check for rule, check in CEL_RULES.items()}


def cel_errors(instance: Any, schema: dict, path: str = "") -> list[str]:
    """The CEL rules of ``schema`` that ``instance`` (already defaulted) breaks, each with the CRD's message."""
    errors = []
    for rule in schema.get("x-kubernetes-validations") or []:
        text = _normalise(rule["rule"])
        if "oldSelf" in text:
            continue
        check = _CEL.get(text)
        if check is None:
            errors.append(f"{path or '<root>'}: the CRD's rule {text!r} has no translation in tests/unit/_crd.py "
                          "CEL_RULES: add one")
        elif not check(instance):
            errors.append(f"{path or '<root>'}: {rule.get('message', 'fails')} (CRD rule: {text})")
    if isinstance(instance, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in instance:
                errors += cel_errors(instance[name], sub, f"{path}.{name}" if path else name)
        if isinstance(schema.get("additionalProperties"), dict):
            for name, value in instance.items():
                errors += cel_errors(value, schema["additionalProperties"], f"{path}.{name}" if path else name)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            errors += cel_errors(item, schema["items"], f"{path}.{i}")
    return errors


# --------------------------------------------------------------------------------------------------
# What the CRD leaves opaque


def check_object_meta(meta: Any, where: str, *, scope: str | None = None) -> None:
    # ObjectMeta is opaque in a CRD schema ({type: object}); check what the API server would.
    assert isinstance(meta, dict) and meta.get("name"), f"{where}: metadata.name is required"
    assert DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 63, f"{where}: bad name {meta['name']!r}"
    if scope == "Cluster":
        assert "namespace" not in meta, f"{where}: a cluster-scoped object has no metadata.namespace ({meta['namespace']!r})"
    if meta.get("namespace") is not None:
        ns = meta["namespace"]
        assert isinstance(ns, str) and DNS_LABEL.match(ns) and len(ns) <= 63, f"{where}: bad namespace {ns!r}"
    for key in ("labels", "annotations"):
        for k, v in (meta.get(key) or {}).items():
            assert isinstance(v, str), f"{where}: metadata.{key}.{k} must be a string, got {v!r}"


# --------------------------------------------------------------------------------------------------
# Quantities ("500m", "1800Gi", 8)

_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}
_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$")


def parse_quantity(value: Any) -> Fraction:
    """A Kubernetes resource quantity as an exact number (CPU cores, bytes, devices)."""
    m = _QUANTITY.match(str(value).strip())
    assert m, f"{value!r} is not a Kubernetes quantity"
    number = Fraction(m.group(1))
    if m.group(2):
        return number * Fraction(10) ** int(m.group(2)[1:])
    return number * _SUFFIXES[m.group(3) or ""]
