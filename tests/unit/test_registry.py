"""Model registry: versions, digests, manifests, atomic registration, verify."""

import json
import threading
from pathlib import Path

import pytest
import torch

from aifactory.exceptions import ConfigError, IntegrityError, NotFound
from aifactory.home import FactoryHome
from aifactory.registry import ModelRegistry, sha256_file


@pytest.fixture
def registry(tmp_path):
    from aifactory.security.signing import create_signing_key

    home = FactoryHome.from_env(tmp_path / "home")
    create_signing_key(home)  # the control plane's start creates it; registration never does
    return ModelRegistry(home)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(10.0)}, path)
    return str(path)


MANIFEST = {"dataset_version": "ds1", "code_version": "abc", "config_hash": "h", "seed": 0,
            "metrics": {"val_loss": 2.5}, "tenant": "acme", "run_id": "r1"}


def test_register_get_list_and_manifest(registry, weights):
    mv1 = registry.register("tiny", weights_path=weights, model_config={"d_model": 8}, manifest=MANIFEST)
    mv2 = registry.register("tiny", weights_path=weights, model_config={"d_model": 8}, manifest=MANIFEST | {"parent": "tiny:v1"})
    assert (mv1.version, mv2.version) == ("v1", "v2")
    assert mv1.sha256 == sha256_file(weights) and mv1.weights_path != weights
    assert registry.get("tiny").version == "v2"
    assert registry.get("tiny", "v1").manifest["parent"] is None  # missing provenance is null, not invented
    assert registry.get("tiny", "v2").manifest["parent"] == "tiny:v1"
    assert [m.ref for m in registry.list()] == ["tiny:v1", "tiny:v2"]
    assert torch.load(mv2.weights_path, weights_only=True)["w"].sum() == 45
    registry.verify(mv2)


def test_get_skips_unservable_and_unknown_raises(registry, weights):
    registry.register("m", weights_path=weights, model_config={}, manifest=MANIFEST)
    registry.register("m", weights_path=weights, model_config={}, manifest=MANIFEST, servable=False)
    assert registry.get("m").version == "v1"
    registry.set_servable("m", "v1", False)
    with pytest.raises(NotFound):
        registry.get("m")
    with pytest.raises(NotFound, match="m:v9"):
        registry.get("m", "v9")


def test_verify_detects_tampering(registry, weights):
    mv = registry.register("m", weights_path=weights, model_config={}, manifest=MANIFEST)
    with open(mv.weights_path, "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(IntegrityError) as err:
        registry.verify(mv)
    assert err.value.expected == mv.sha256


def test_bad_registration_lists_every_problem(registry, tmp_path):
    with pytest.raises(ConfigError) as err:
        registry.register("Bad Name", weights_path=str(tmp_path / "nope.pt"), model_config={}, manifest={"x": object()})
    assert len(err.value.problems) == 4  # tenant (none named), name, weights_path, manifest
    assert registry.list() == []


def test_concurrent_registrations_get_distinct_versions(registry, weights):
    out = []
    threads = [threading.Thread(target=lambda: out.append(
        registry.register("c", weights_path=weights, model_config={}, manifest=MANIFEST).version)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 7)]
    assert len(registry.list("c")) == 6
    # no staging leftovers
    assert not [p for p in (Path(registry.location) / "acme" / "c").iterdir() if p.name.startswith(".staging")]


def test_record_is_plain_json(registry, weights):
    mv = registry.register("j", weights_path=weights, model_config={"a": 1}, manifest=MANIFEST)
    rec = json.loads((Path(mv.weights_path).parent / "version.json").read_text())
    assert rec["sha256"] == mv.sha256 and rec["manifest"]["tenant"] == "acme"
