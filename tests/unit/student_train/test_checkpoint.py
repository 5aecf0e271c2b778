"""Checkpoints: round trip, crash leftovers ignored and cleaned, keep-last-K, weights-only loads."""

import json
import os
import pickle

import pytest
import torch
from torch import nn

from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.run_dir import (
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    RNG_FILE,
    TRAINER_STATE_FILE,
    complete_checkpoints,
    latest_checkpoint,
)
from kdpipe.student_train.checkpoint import load_checkpoint, save_checkpoint


def _trained_state(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A tiny model with tied weights and an AdamW that has taken two steps (so it has state)."""
    torch.manual_seed(seed)
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight  # tied, like a tied LM head: shares storage
    model = nn.ModuleDict({"embed": embed, "head": head, "proj": nn.Linear(4, 4)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(2):
        x = model["embed"](torch.tensor([1, 2, 3]))
        loss = model["head"](model["proj"](x)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(run_dir, step, model, opt, keep=3, **trainer):
    return save_checkpoint(
        run_dir,
        step,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        trainer_state={"step": step, "loader": {"step": step, "seed": 1}, **trainer},
        rng_state={"torch": torch.get_rng_state()},
        keep=keep,
    )


def test_round_trip_restores_model_optimizer_trainer_and_rng(tmp_path):
    model, opt = _trained_state()
    rng_before = torch.get_rng_state()
    path = _save(tmp_path, 7, model, opt, metrics_cursor=3)
    assert path == tmp_path / CHECKPOINTS_DIR / "step-00000007"

    ckpt = load_checkpoint(path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ckpt.model_state[name], tensor, rtol=0, atol=0)
    assert ckpt.trainer_state == {"step": 7, "loader": {"step": 7, "seed": 1}, "metrics_cursor": 3}
    assert torch.equal(ckpt.rng_state["torch"], rng_before)

    # A fresh model and optimizer restored from the checkpoint take the same next step.
    fresh_model, fresh_opt = _trained_state(seed=99)
    fresh_model.load_state_dict(ckpt.model_state)
    fresh_opt.load_state_dict(ckpt.optimizer_state)
    for m, o in ((model, opt), (fresh_model, fresh_opt)):
        m["head"](m["proj"](m["embed"](torch.tensor([4, 5])))).sum().backward()
        o.step()
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_optimizer_and_rng_load_weights_only(tmp_path):
    model, opt = _trained_state()
    path = _save(tmp_path, 1, model, opt)
    optimizer_state = torch.load(path / OPTIMIZER_FILE, weights_only=True)
    rng_state = torch.load(path / RNG_FILE, weights_only=True)
    assert set(optimizer_state["state"]) == set(opt.state_dict()["state"])
    assert optimizer_state["param_groups"][0]["betas"] == (0.9, 0.95)
    assert rng_state["torch"].dtype == torch.uint8


def test_code_in_a_checkpoint_is_refused(tmp_path):
    """A pickle that would run code is not data: loading it is a one-line KdpipeError."""
    model, opt = _trained_state()
    path = _save(tmp_path, 1, model, opt)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(path / OPTIMIZER_FILE, "wb") as handle:
        pickle.dump({"state": Evil()}, handle, protocol=2)
    with pytest.raises(KdpipeError, match=r"step-00000001 is unreadable") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_truncated_checkpoint_names_the_directory(tmp_path):
    model, opt = _trained_state()
    path = _save(tmp_path, 2, model, opt)
    (path / "model.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(KdpipeError, match=str(path)):
        load_checkpoint(path)
    with pytest.raises(KdpipeError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_crash_leftover_is_ignored_and_cleaned_on_next_save(tmp_path):
    model, opt = _trained_state()
    _save(tmp_path, 10, model, opt)
    checkpoints = tmp_path / CHECKPOINTS_DIR
    # A save of step 20 that died half-way (newer step, but not renamed into place).
    crashed = checkpoints / ".tmp-step-00000020-12345"
    crashed.mkdir()
    (crashed / TRAINER_STATE_FILE).write_text(json.dumps({"step": 20}))
    assert latest_checkpoint(tmp_path) == checkpoints / "step-00000010"

    _save(tmp_path, 30, model, opt)
    assert not crashed.exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000010", "step-00000030"]
    assert latest_checkpoint(tmp_path) == checkpoints / "step-00000030"


def test_keeps_last_k_complete_checkpoints(tmp_path):
    model, opt = _trained_state()
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 10, 15, 20, 25):
        _save(tmp_path, step, model, opt, keep=2)
        kept = [p.name for p in complete_checkpoints(tmp_path)]
        assert kept[-1] == f"step-{step:08d}"
        assert len(kept) <= 2
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000020", "step-00000025"]
    assert not [p for p in (tmp_path / CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]
    with pytest.raises(KdpipeError, match="keep at least 1"):
        _save(tmp_path, 30, model, opt, keep=0)


def test_same_step_saved_twice_keeps_the_complete_one(tmp_path):
    model, opt = _trained_state()
    first = _save(tmp_path, 4, model, opt, marker="first")
    second = _save(tmp_path, 4, model, opt, marker="second")
    assert first == second
    assert load_checkpoint(first).trainer_state["marker"] == "first"
    assert [p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir()] == ["step-00000004"]


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"), RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")],
    ids=["oserror", "safetensors"],
)
def test_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, error):
    model, opt = _trained_state()
    kept = _save(tmp_path, 2, model, opt)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr("kdpipe.student_train.checkpoint.save_file", full)
    with pytest.raises(KdpipeError, match="out of disk space .* step-4 checkpoint .* bytes free; earlier checkpoints are kept"):
        _save(tmp_path, 4, model, opt)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir()) == [kept.name]  # no tmp dir left


def test_a_genuine_error_while_saving_is_not_hidden(tmp_path, monkeypatch):
    model, opt = _trained_state()

    def bug(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr("kdpipe.student_train.checkpoint.save_file", bug)
    with pytest.raises(TypeError, match="a bug"):
        _save(tmp_path, 4, model, opt)
