import subprocess
import sys
import textwrap

import pytest
from pydantic import Field

from aifactory.config import StrictModel, apply_overrides, config_hash, load_config, parse_config
from aifactory.exceptions import ConfigError, QuotaExceeded
from aifactory.home import FactoryHome
from aifactory.tenancy import (
    UNATTRIBUTED, SLOClass, TenantRef, WorkloadKind, job_metadata, tags_from_metadata,
)


@pytest.mark.parametrize("name", ["a", "search", "team-42", "x" * 63, "0abc"])
def test_valid_tenant_names(name):
    assert TenantRef(tenant=name).tenant == name


@pytest.mark.parametrize("name", ["", "A", "Search", "team_42", "-a", "a-", "x" * 64, "a.b", "unattributed", "idle"])
def test_invalid_tenant_names_are_refused(name):
    with pytest.raises(ConfigError) as info:
        parse_config(TenantRef, {"tenant": name}, source="--tenant")
    assert "tenant" in str(info.value)


def test_metadata_round_trip():
    ref = TenantRef(tenant="search", project="ranking", cost_center="cc-7")
    meta = job_metadata(ref, workload=WorkloadKind.TRAIN, slo_class=SLOClass.BATCH, config_hash="abc",
                        code_version="1234", code_dirty=True, submitted_by="ann")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    tags = tags_from_metadata(meta)
    assert (tags.tenant, tags.project, tags.cost_center, tags.workload) == ("search", "ranking", "cc-7", "train")
    assert tags.slo_class == "batch" and tags.code_dirty is True and tags.submitted_by == "ann"


def test_plain_ray_metadata_is_attributed_like_ours():
    tags = tags_from_metadata({"tenant": "ads", "project": "ctr"})
    assert (tags.tenant, tags.project, tags.attributed) == ("ads", "ctr", True)


@pytest.mark.parametrize("meta", [None, {}, {"tenant": ""}, {"tenant": "Not Valid"}, {"tenant": "idle"}, {"owner": "x"}])
def test_missing_or_invalid_tenant_is_unattributed_not_dropped(meta):
    tags = tags_from_metadata(meta)
    assert tags.tenant == UNATTRIBUTED and not tags.attributed


class _Inner(StrictModel):
    lr: float = Field(gt=0, description="learning rate")


class _Job(StrictModel):
    tenant: TenantRef
    kind: WorkloadKind
    slo: SLOClass = SLOClass.BATCH
    inner: _Inner


def test_yaml_errors_name_file_and_every_field(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent("""
        tenant: {tenant: Bad_Tenant}
        kind: training
        slo: realtime
        inner: {lr: -1, lrr: 3}
        extra_field: 1
    """))
    with pytest.raises(ConfigError) as info:
        load_config(_Job, path)
    err = info.value
    text = str(err)
    assert str(path) in text
    fields = [p.split(":")[0] for p in err.problems]
    assert set(fields) == {"tenant.tenant", "kind", "slo", "inner.lr", "inner.lrr", "extra_field"}
    assert "'ingest'" in text and "'batch-inference'" in text  # allowed values are listed
    assert "'interactive'" in text


def test_bad_yaml_syntax_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tenant: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(_Job, path)
    assert "line" in str(info.value) and str(path) in str(info.value)


def test_overrides_and_hash_are_stable(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("tenant: {tenant: a}\nkind: train\ninner: {lr: 0.1}\n")
    job = load_config(_Job, path, overrides={"inner.lr": 0.5, "slo": None})
    assert job.inner.lr == 0.5 and job.slo is SLOClass.BATCH
    assert config_hash(job) == config_hash(job.model_copy())
    assert config_hash(job) != config_hash(load_config(_Job, path))
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}


def test_errors_pickle_with_fields():
    import pickle

    err = pickle.loads(pickle.dumps(QuotaExceeded("search", "GPU", 8, 4)))
    assert (err.tenant, err.resource, err.requested, err.limit) == ("search", "GPU", 8, 4)
    assert "tenant='search'" in str(err)
    cfg = pickle.loads(pickle.dumps(ConfigError("x.yaml", ["a: bad", "b: bad"])))
    assert cfg.problems == ["a: bad", "b: bad"]


def test_home_locations_and_uris(tmp_path, monkeypatch):
    monkeypatch.setenv("AIFACTORY_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("AIFACTORY_CHECKPOINTS_URI", "s3://bucket/ckpt")
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "config.yaml").write_text("storage: {datasets: " + str(tmp_path / "ds") + "}\n")
    home = FactoryHome.from_env()
    assert home.datasets == str(tmp_path / "ds")
    assert home.checkpoints == "s3://bucket/ckpt"
    assert home.registry == str(tmp_path / "h" / "registry")
    assert home.ledger_path == tmp_path / "h" / "ledger.sqlite"


def test_home_config_errors_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("storage: {datasetz: /x}\n")
    with pytest.raises(ConfigError) as info:
        FactoryHome.from_env(tmp_path)
    assert "config.yaml" in str(info.value) and "storage.datasetz" in str(info.value)


def test_import_aifactory_is_light():
    code = (
        "import sys, aifactory, aifactory.cli.main; aifactory.TenantRef; aifactory.FactoryHome;"
        "heavy = [m for m in ('torch', 'ray.serve', 'ray.train', 'ray.data', 'ray.tune') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
