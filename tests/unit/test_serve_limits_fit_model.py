"""An app's token limits default from the model it serves, and bad ones are refused before anything starts.

The README's quick path (ingest, ``train --recipe tiny``, ``serve deploy`` with defaults) once ended in
DEPLOY_FAILED: fixed defaults of 192 + 64 tokens did not fit the tiny model's 128 positions, and the check ran
only inside Serve's build task (issue 21.8).
"""

from __future__ import annotations

import pytest
import torch

from aifactory.exceptions import ConfigError, one_line
from aifactory.home import FactoryHome
from aifactory.models.config import GPTConfig
from aifactory.serve.config import CompletionsArgs, Limits


@pytest.mark.parametrize("seq_len,prompt,answer", [(128, 96, 32), (2048, 1984, 64), (4, 3, 1), (2, 1, 1)])
def test_unset_limits_fill_the_models_context(seq_len, prompt, answer):
    fitted = Limits().fit(seq_len)
    assert (fitted.max_prompt_tokens, fitted.max_tokens) == (prompt, answer)
    assert fitted.max_prompt_tokens + fitted.max_tokens <= seq_len


def test_one_set_limit_keeps_its_value_and_the_other_fills_the_rest():
    assert Limits(max_tokens=16).fit(128).max_prompt_tokens == 112
    assert Limits(max_prompt_tokens=100).fit(128).max_tokens == 28


def test_limits_that_do_not_fit_name_the_fields_and_the_models_seq_len():
    with pytest.raises(ConfigError) as err:
        Limits(max_prompt_tokens=192, max_tokens=64).fit(128)
    assert "max_prompt_tokens (192) + max_tokens (64)" in str(err.value) and "seq_len (128)" in str(err.value)


def test_the_default_args_fit_the_tiny_recipes_model():
    tiny = GPTConfig().model_dump()  # the tiny recipe's shape: seq_len 128
    args = CompletionsArgs(model_name="tiny-gpt").fitted_to(tiny)
    assert args.limits.max_prompt_tokens + args.limits.max_tokens <= tiny["seq_len"]


def _registered_home(tmp_path) -> FactoryHome:
    from aifactory.registry import ModelRegistry
    from aifactory.security.signing import create_signing_key

    home = FactoryHome.from_env(tmp_path / "home")
    create_signing_key(home)
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    ModelRegistry(home).register("tiny-gpt", weights_path=str(weights), model_config=GPTConfig().model_dump(),
                                 manifest={"run_id": "r1", "tenant": "demo"})
    return home


def test_serve_deploy_refuses_unfitting_limits_before_touching_a_cluster(tmp_path, capsys):
    from aifactory.cli.main import main

    home = _registered_home(tmp_path)
    cfg = tmp_path / "app.yaml"
    cfg.write_text("limits: {max_prompt_tokens: 192, max_tokens: 64}\n")
    # No cluster runs and no --address: the args are checked first, so the error is the config's, not the cluster's.
    rc = main(["--home", str(home.root), "serve", "deploy", "--config", str(cfg), "--address", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "max_prompt_tokens (192) + max_tokens (64)" in err and "seq_len (128)" in err


def test_a_ray_side_traceback_becomes_one_line_naming_its_cause():
    message = """application 'completions' is DEPLOY_FAILED: Deploying app 'completions' failed with exception:
Traceback (most recent call last):
  File "/x/ray/serve/_private/application_state.py", line 1330, in build_serve_application
    app = call_user_app_builder_with_args_if_necessary(import_attr(import_path), args)
ray.exceptions.RayTaskError(KeyError): ray::build_serve_application() (pid=1, ip=127.0.0.1)
KeyError: 'seq_len'
"""
    assert one_line(message) == ("application 'completions' is DEPLOY_FAILED: Deploying app 'completions' failed "
                                 "with exception: KeyError: 'seq_len'")
    assert one_line("no traceback here") == "no traceback here"


def test_the_control_api_refuses_unfitting_limits_with_422_before_touching_serve(tmp_path):
    """The control API's deploy fits the operator's tenant-app defaults to the tenant's model first: a misfit is
    a 422 naming the limits, and Serve (here an address where nothing listens) is never called."""
    from fastapi.testclient import TestClient

    from aifactory.control.app import create_app
    from aifactory.registry import ModelRegistry
    from aifactory.security.apikeys import KeyStore
    from aifactory.security.signing import create_signing_key

    home = FactoryHome.from_env(tmp_path / "home").ensure()
    create_signing_key(home)
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    mv = ModelRegistry(home).register("gpt", weights_path=str(weights), model_config=GPTConfig().model_dump(),
                                      manifest={"tenant": "alpha"})
    key = KeyStore(home).create(tenant="alpha", actor="ops").secret
    app = create_app(home, address="http://127.0.0.1:9", rate=(1000.0, 1000),
                     tenant_app_defaults={"limits": {"max_prompt_tokens": 192, "max_tokens": 64}})
    client = TestClient(app, raise_server_exceptions=False)
    resp = client.post("/v1/serve/apps", headers={"Authorization": f"Bearer {key}"},
                       json={"name": "chat", "model_name": "gpt", "model_version": mv.version})
    assert resp.status_code == 422, resp.text
    assert "max_prompt_tokens (192) + max_tokens (64)" in resp.text and "seq_len (128)" in resp.text
