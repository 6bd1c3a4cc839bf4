"""DCP checkpoints without a process group: save/load round trip, completeness, and the resume fallback."""

import json

import torch

from aifactory.models.gpt import GPT, GPTConfig
from aifactory.train import checkpoint as ckpt

CFG = GPTConfig(seq_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 259, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_and_state(tmp_path):
    model, opt = _model_and_opt(0)
    path = tmp_path / "step_00005"
    ckpt.save_sharded(str(path), model=model, optimizer=opt, trainer_state={"step": 5, "val_curve": []})
    assert ckpt.is_complete(path)
    other, other_opt = _model_and_opt(1)
    state = ckpt.load_sharded(str(path), model=other, optimizer=other_opt)
    assert state["step"] == 5
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    sa = opt.state_dict()["state"][0]["exp_avg"]
    sb = other_opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(sa, sb)


def test_fallback_picks_newest_complete_checkpoint(tmp_path):
    model, opt = _model_and_opt(0)
    for step in (5, 10, 15):
        ckpt.save_sharded(str(tmp_path / ckpt.step_dir_name(step)), model=model, optimizer=opt, trainer_state={"step": step})
    # step 15: a shard file went missing (killed mid-upload); step 10: trainer state never written
    next((tmp_path / "step_00015").glob("*.distcp")).unlink()
    (tmp_path / "step_00010" / ckpt.STATE_FILE).unlink()
    (tmp_path / "step_00020").mkdir()  # an empty dir from a killed attempt
    assert not ckpt.is_complete(tmp_path / "step_00015")
    assert ckpt.newest_complete_checkpoint(tmp_path) == (5, tmp_path / "step_00005")
    assert ckpt.newest_complete_checkpoint(tmp_path / "missing") is None


def test_choose_resume_prefers_the_furthest_checkpoint(tmp_path):
    assert ckpt.choose_resume(None, None) is None
    assert ckpt.choose_resume((10, "/r/step_00010"), None) == (10, "/r/step_00010")
    # Ray lost the newest report (worker killed within ~2 s): the complete dir on storage is further along
    assert ckpt.choose_resume((10, "/r/step_00010"), (15, tmp_path)) == (15, str(tmp_path))
    assert ckpt.choose_resume(None, (5, tmp_path)) == (5, str(tmp_path))
    assert ckpt.step_of("/a/b/step_00042") == 42 and ckpt.step_of("/a/b/other") is None


def test_consolidated_state_loads_into_a_plain_model(tmp_path):
    model, _ = _model_and_opt(0)
    full = ckpt.consolidated_model_state(model)
    path = tmp_path / "w.pt"
    torch.save(full, path)
    from aifactory.models.gpt import load_gpt

    loaded = load_gpt(str(path), json.loads(CFG.model_dump_json()))
    idx = torch.randint(0, 259, (1, 8))
    torch.testing.assert_close(loaded(idx), model.eval()(idx))


def test_round_trip_restores_the_rng_state_so_dropout_draws_the_same_masks(tmp_path):
    model, opt = _model_and_opt(0)
    path = tmp_path / "step_00003"
    torch.manual_seed(123)
    torch.rand(5)  # the stream has moved on, as after some training steps with dropout
    ckpt.save_sharded(str(path), model=model, optimizer=opt, trainer_state={"step": 3})
    expected = torch.rand(8)  # what the uninterrupted run draws next
    torch.manual_seed(0)  # a resumed worker reseeds at start
    ckpt.load_sharded(str(path), model=model, optimizer=opt)
    assert torch.equal(torch.rand(8), expected)
    assert (path / ckpt.RNG_FILE.format(rank=0)).is_file()
