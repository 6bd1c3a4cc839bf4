"""Model optimization without Ray: the gate, quantized-model equivalence, variant lineage, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from aifactory.exceptions import ConfigError, VariantRejected
from aifactory.home import FactoryHome
from aifactory.models.build import build_model
from aifactory.models.gpt import GPT, GPTConfig
from aifactory.models.quantized import Fp8WeightLinear, load_state, quantize_model
from aifactory.optimize.config import EvalSpec, QuantizeSpec, VariantGate
from aifactory.optimize.gate import check_gate, eval_loss, parse_ref
from aifactory.optimize.lineage import variant_tree
from aifactory.optimize.quantize import resolve_method, run_quantize
from aifactory.registry import ModelRegistry
from aifactory.tenancy import TenantRef

CFG = GPTConfig(seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=256)


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def _batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 65), generator=g) for _ in range(n)]


@pytest.fixture
def home(tmp_path):
    from aifactory.security.signing import create_signing_key

    home = FactoryHome.from_env(tmp_path / "home").ensure()
    create_signing_key(home)
    return home


@pytest.fixture
def parent(home, tmp_path):
    path = tmp_path / "parent.pt"
    torch.save(_model().state_dict(), path)
    return ModelRegistry(home).register("lm", weights_path=str(path), model_config=CFG.model_dump(),
                                        manifest={"dataset_version": "ds-1", "tenant": "acme", "seed": 0})


def _spec(method="int8-dynamic", max_loss_delta=0.05) -> QuantizeSpec:
    return QuantizeSpec(tenant=TenantRef(tenant="acme"), method=method, gate=VariantGate(max_loss_delta=max_loss_delta),
                        eval=EvalSpec(batch_size=4, max_batches=3))


# ---- the gate ------------------------------------------------------------------------------------------

def test_gate_passes_within_the_allowed_delta_and_fails_beyond_it():
    ok = check_gate(parent_val_loss=2.0, variant_val_loss=2.04, gate=VariantGate(max_loss_delta=0.05))
    assert ok.passed and ok.quality_delta == pytest.approx(0.04)
    better = check_gate(parent_val_loss=2.0, variant_val_loss=1.9, gate=VariantGate(max_loss_delta=0.0))
    assert better.passed and better.quality_delta < 0
    bad = check_gate(parent_val_loss=2.0, variant_val_loss=2.06, gate=VariantGate(max_loss_delta=0.05))
    assert not bad.passed and "max_loss_delta" in bad.reason and "+0.0600" in bad.reason


def test_gate_relative_bound_and_non_finite_losses_fail():
    rel = check_gate(parent_val_loss=2.0, variant_val_loss=2.05,
                     gate=VariantGate(max_loss_delta=1.0, max_relative_delta=0.02))
    assert not rel.passed and "max_relative_delta" in rel.reason
    nan = check_gate(parent_val_loss=2.0, variant_val_loss=math.nan, gate=VariantGate(max_loss_delta=10))
    assert not nan.passed and "not finite" in nan.reason


def test_parse_ref_and_method_resolution():
    assert parse_ref("tiny-gpt:v3") == ("tiny-gpt", "v3") and parse_ref("tiny-gpt") == ("tiny-gpt", None)
    with pytest.raises(ConfigError):
        parse_ref(":v1")
    assert resolve_method("auto", cuda=False) == "int8-dynamic"
    assert resolve_method("auto", cuda=True) == "bf16"
    with pytest.raises(ConfigError, match="is not a quantization method"):
        resolve_method("int4")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp8-weight needs a CUDA GPU"):
            resolve_method("fp8-weight")


# ---- quantized models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,tol", [("int8-dynamic", 0.05), ("bf16", 0.05)])
def test_quantized_model_matches_the_float_model_within_tolerance(method, tol):
    model = _model()
    q = quantize_model(model, method)
    x = _batches(1)[0][:, :32]
    with torch.inference_mode():
        ref, out = model(x), q(x).float()
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < tol, f"{method}: max relative logit error {rel:.4f}"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert abs(eval_loss(q, _batches()) - eval_loss(model, _batches())) < 0.02
    if method == "int8-dynamic":  # the Linear layers really are int8 now
        assert type(q.blocks[0].mlp.up).__module__.startswith("torch.ao.nn.quantized.dynamic")


def test_fp8_weight_linear_stores_fp8_and_stays_close():
    lin = torch.nn.Linear(64, 32)
    q = Fp8WeightLinear.from_linear(lin, compute_dtype=torch.float32)
    assert q.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose(q(x), lin(x), atol=0.03, rtol=0.07)


@pytest.mark.parametrize("method", ["int8-dynamic", "bf16", "fp8-weight"])
def test_variant_state_dict_round_trips_through_build_model(method, tmp_path):
    q = quantize_model(_model(), method)
    path = tmp_path / "q.pt"
    torch.save(q.state_dict(), path)
    loaded = load_state(build_model(CFG.model_dump(), {"method": method}),
                        torch.load(path, map_location="cpu", weights_only=True))
    x = _batches(1)[0][:, :16]
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))
    with pytest.raises(ConfigError, match="variant.method"):
        build_model(CFG.model_dump(), {"method": "int3"})


# ---- registration, lineage, serving --------------------------------------------------------------------

def test_quantize_registers_a_servable_variant_with_lineage(home, parent):
    mv, gate = run_quantize(home, "lm:v1", _spec(), batches=_batches())
    assert gate.passed and mv.servable and mv.ref == "lm:v2"
    m = mv.manifest
    assert m["parent"] == "lm:v1" and m["parent_sha256"] == parent.sha256 and m["dataset_version"] == "ds-1"
    assert m["variant"]["method"] == "int8-dynamic" and m["variant"]["parent"] == "lm:v1"
    assert m["variant"]["quality_delta"] == pytest.approx(gate.quality_delta)
    assert m["metrics"]["quality_delta"] == pytest.approx(m["metrics"]["val_loss"] - m["metrics"]["parent_val_loss"])
    assert m["variant"]["weight_bytes"] < m["variant"]["parent_weight_bytes"] / 2
    registry = ModelRegistry(home)
    registry.verify(mv)  # signed and digested like any version
    assert registry.get("lm").version == "v2"  # the newest servable

    from aifactory.serve.engine import Decoder, GenItem, load_version

    loaded = load_version(home.registry, "lm", "v2")  # the serving engine rebuilds the quantized structure
    out = Decoder(loaded).generate([GenItem(tokens=list(b"def f("), max_tokens=4)])[0]
    assert len(out.tokens) == 4 and out.version == "v2"
    with pytest.raises(ConfigError, match="already a int8-dynamic variant"):
        run_quantize(home, "lm:v2", _spec(), batches=_batches())


def test_a_variant_failing_the_gate_is_registered_not_servable_and_refused_by_serving(home, tmp_path):
    # One outlier weight per Linear stretches int8's per-tensor scale so far that every other weight
    # rounds to zero: the classic way dynamic int8 wrecks a model, and the gate must catch it.
    model = _model()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight[0, 0] = 1e4
    path = tmp_path / "outlier.pt"
    torch.save(model.state_dict(), path)
    registry = ModelRegistry(home)
    registry.register("lm", weights_path=str(path), model_config=CFG.model_dump(), manifest={"dataset_version": "ds-1", "tenant": "acme"})
    with pytest.raises(VariantRejected, match="max_loss_delta") as err:
        run_quantize(home, "lm:v1", _spec(max_loss_delta=0.05), batches=_batches())
    assert err.value.ref == "lm:v2" and err.value.exit_code == 3
    mv = registry.get("lm", "v2")
    assert not mv.servable and mv.manifest["variant"]["gate"]["passed"] is False
    assert registry.get("lm").version == "v1"  # the rejected variant never becomes the default

    from aifactory.serve.engine import load_version

    with pytest.raises(VariantRejected):
        load_version(home.registry, "lm", "v2")


def test_variant_tree_lists_variants_under_their_parents():
    from types import SimpleNamespace as NS

    mk = lambda v, parent=None: NS(name="lm", version=v, manifest={"parent": parent})  # noqa: E731
    versions = [mk("v1"), mk("v2"), mk("v3", "lm:v1"), mk("v4", "lm:v2"), mk("v5", "lm:v1"), mk("v6", "gone:v9")]
    tree = [(d, mv.version) for d, mv in variant_tree(versions)]
    assert tree == [(0, "v1"), (1, "v3"), (1, "v5"), (0, "v2"), (1, "v4"), (0, "v6")]


# ---- distillation loss ---------------------------------------------------------------------------------

def test_distill_loss_mixes_soft_and_hard_targets():
    from aifactory.optimize.distill import distill_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 10, (2, 5), generator=g)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 11), y.reshape(-1))
    hard_only, _, _ = distill_loss(s, t, y, temperature=2.0, alpha=0.0, pad=10)
    assert torch.allclose(hard_only, ce)
    same, soft, _ = distill_loss(s, s.clone(), y, temperature=2.0, alpha=1.0, pad=10)
    assert same.abs() < 1e-6 and soft.abs() < 1e-6  # a student equal to its teacher has nothing to learn
    differ, soft, _ = distill_loss(s, t, y, temperature=2.0, alpha=1.0, pad=10)
    assert differ > 0
    y_pad = y.clone()
    y_pad[:, 2:] = 10  # PAD positions count in neither term
    a, _, _ = distill_loss(s, t, y_pad, temperature=2.0, alpha=1.0, pad=10)
    b, _, _ = distill_loss(s[:, :2], t[:, :2], y[:, :2], temperature=2.0, alpha=1.0, pad=10)
    assert torch.allclose(a, b, atol=1e-6)


# ---- CLI -----------------------------------------------------------------------------------------------

def test_cli_refuses_before_any_cluster_work(home, parent, capsys, monkeypatch):
    from aifactory.cli.main import main

    monkeypatch.setenv("AIFACTORY_HOME", str(home.root))
    assert main(["optimize", "quantize", "lm:v9"]) == 1
    assert "no model version 'lm:v9'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["optimize", "quantize", "lm:v1", "--method", "fp8-weight"]) == 2
        assert "fp8-weight needs a CUDA GPU" in capsys.readouterr().err
    assert main(["optimize", "distill", "lm:v1", "--student", "no-such-recipe"]) == 2
    assert "--student" in capsys.readouterr().err


# ---- side-by-side measurement --------------------------------------------------------------------------

def test_compare_variants_measures_and_prices_each_variant(home, parent, tmp_path):
    from aifactory.cost.pricebook import load_price_book
    from aifactory.bench.variants import compare_variants, summarize

    mv, _ = run_quantize(home, "lm:v1", _spec(), batches=_batches())
    refs = {"parent": "lm:v1", "int8-dynamic": mv.ref}
    prompts = [list(b"import os"), list(b"def main")]
    runs = compare_variants(home.registry, refs, prompts=prompts, max_tokens=3, batch_size=2, rounds=2)
    book = load_price_book()
    rows = [summarize(runs[k], mv=ModelRegistry(home).get(*ref.split(":")),
                      quality={"val_loss": 1.0, "quality_delta": 0.0}, book=book) for k, ref in refs.items()]
    for r in rows:
        assert r["requests"] == 4 and len(r["throughput_rps_rounds"]) == 2 and r["completion_tokens"] == 12
        assert 0 < r["p50_latency_s"] <= r["p99_latency_s"] and r["cpu_s"] > 0
        # CPU-seconds priced at the book's CPU rate, per 1000 requests.
        rate = book.rate("cpu", "cpu", "local").on_demand_usd_per_hour
        assert r["cost_per_1k_requests_usd"] == pytest.approx(r["cpu_s"] / 3600 * rate / 4 * 1000, rel=1e-6)
    assert rows[1]["variant"] == "int8-dynamic" and rows[1]["weights_bytes"] < rows[0]["weights_bytes"]
