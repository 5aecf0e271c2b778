"""The trainer on a real tiny cache (prepare-data → cache-teacher of a tiny Llama): exact
resume, gradient accumulation, loss composition, frozen teacher, clone positions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kdpipe.pipeline.prepare import prepare_data
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.run_dir import METRICS_FILE, OPTIMIZER_FILE, latest_checkpoint
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.builders import build_student
from kdpipe.student_train.loader import StudentLoader
from kdpipe.student_train.lrc import LRCStudent
from kdpipe.student_train.run import train_student
from kdpipe.student_train.callbacks import Callback
from kdpipe.student_train.student_loss import LossWeights, StudentLoss
from kdpipe.student_train.trainer import Trainer
from kdpipe.teacher_cache import open_cache
from kdpipe.teacher_cache.run import cache_teacher

SEQ_LEN = 32


def build_cache(root: Path, teacher_dir: Path, *, name: str = "cache", snapshot_layers: str = "all", docs: int = 24) -> Path:
    """A tiny rs-kd cache with a val split, made by the real prepare-data and cache-teacher."""
    corpus = root / f"{name}-corpus"
    corpus.mkdir(parents=True)
    lines = [json.dumps({"text": f"document {i}: the quick brown fox jumps over {i * 7} lazy dogs. " * 2}) for i in range(docs)]
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = root / f"{name}-tokens"
    prepare_data(PrepareDataConfig(inputs=[str(corpus)], tokenizer=teacher_dir, out=store, seq_len=SEQ_LEN, val_fraction=0.25))
    cache = root / name
    cache_teacher(
        CacheTeacherConfig(
            teacher=teacher_dir, tokens=store, out=cache, snapshot_layers=snapshot_layers, snapshot_fraction=0.125,
            sequences_per_shard=32, sequences_per_chunk=4,
        )  # fmt: skip
    )
    return cache


@pytest.fixture(scope="module")
def cache(tiny_teacher, tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("trainer-cache"), tiny_teacher("llama").path)


def lrc_config(cache: Path, out: Path, **changes) -> TrainStudentConfig:
    options = dict(
        cache=cache, out=out, hidden_size=32, steps=7, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=2,
        lr_schedule="wsd", kd_weight=1.0, lm_weight=0.5, clone_weight=0.3, kd_schedule="wsd", log_every=1,
        checkpoint_every=4, eval_every=3, eval_batches=2, num_workers=0,
    )  # fmt: skip
    options.update(changes)
    return TrainStudentConfig(**options)


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field (everything else must be reproducible)."""
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


class _Crash(Exception):
    pass


class Interrupt(Callback):
    """At `step`: send this process SIGTERM (the real handler path) or crash without a checkpoint."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step == self.step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise _Crash()


def test_interrupted_and_resumed_runs_reproduce_the_uninterrupted_run(cache, tmp_path):
    reference = train_student(lrc_config(cache, tmp_path / "reference"))
    assert not reference.preempted and reference.step == 7

    run = tmp_path / "interrupted"
    stopped = train_student(lrc_config(cache, run), callbacks=[Interrupt(2, "sigterm")])
    assert stopped.preempted and stopped.stop_signal == "SIGTERM" and stopped.step == 2
    assert latest_checkpoint(run).name == "step-00000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again

    # A crash after the periodic checkpoint of step 4: step 5 was logged but is redone.
    with pytest.raises(_Crash):
        train_student(lrc_config(cache, run, resume=True), callbacks=[Interrupt(5, "crash")])
    assert records(run)[-1]["step"] == 5 and latest_checkpoint(run).name == "step-00000004"
    resumed = train_student(lrc_config(cache, run, resume=True))
    assert not resumed.preempted and resumed.step == 7

    expected = records(tmp_path / "reference")
    assert [r["step"] for r in expected if r["type"] == "eval"] == [3, 6, 7]
    assert all(r["eval/kl"] > 0 and 0 <= r["eval/ece"] <= 1 for r in expected if r["type"] == "eval")
    assert records(run) == expected  # every logged float, bit for bit
    final_ref, final = latest_checkpoint(tmp_path / "reference"), latest_checkpoint(run)
    assert final.name == final_ref.name == "step-00000007"
    weights_ref, weights = load_file(final_ref / "model.safetensors"), load_file(final / "model.safetensors")
    assert weights.keys() == weights_ref.keys()
    assert all(torch.equal(weights[k], weights_ref[k]) for k in weights)
    adam_ref = torch.load(final_ref / OPTIMIZER_FILE, weights_only=True)["state"]
    adam = torch.load(final / OPTIMIZER_FILE, weights_only=True)["state"]
    assert all(torch.equal(adam[p][s], adam_ref[p][s]) for p in adam_ref for s in adam_ref[p])


def test_resuming_a_finished_run_does_nothing_and_a_new_start_is_refused(cache, tmp_path):
    config = lrc_config(cache, tmp_path / "run", steps=2, eval_every=0)
    train_student(config)
    before = (tmp_path / "run" / METRICS_FILE).read_bytes()
    assert train_student(dataclasses.replace(config, resume=True)).step == 2
    assert (tmp_path / "run" / METRICS_FILE).read_bytes() == before
    with pytest.raises(ValueError, match="already holds a training run; pass --resume"):
        train_student(config)


def test_gradient_accumulation_equals_one_larger_batch_and_the_loss_is_the_weighted_sum(cache, tmp_path):
    # Batch b of batch size 4 holds the rows of batches 2b and 2b+1 of batch size 2: same data.
    common = dict(steps=3, eval_every=0, warmup_steps=0)
    train_student(lrc_config(cache, tmp_path / "big", batch_size=4, grad_accum=1, **common))
    train_student(lrc_config(cache, tmp_path / "accum", batch_size=2, grad_accum=2, **common))
    big, accum = records(tmp_path / "big"), records(tmp_path / "accum")
    for a, b in zip(big, accum, strict=True):
        assert a["tokens"] == b["tokens"] == a["step"] * 4 * SEQ_LEN
        for key in ("loss", "loss/lm", "loss/kd", "loss/clone", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        # The logged total is w_lm·CE + w_kd·KD + α·clone with the step's scheduled weights.
        total = a["w_lm"] * a["loss/lm"] + a["w_kd"] * a["loss/kd"] + a["w_clone"] * a["loss/clone"]
        assert a["loss"] == pytest.approx(total, rel=1e-6)
        assert a["loss/clone"] == pytest.approx(sum(v for k, v in a.items() if k.startswith("loss/clone/")), rel=1e-6)
    assert [r["w_kd"] for r in big] == [1.0, 1.0, 0.0]  # wsd: a decay of round(0.2 * 3) = 1 step reaches 0 at once
    w_big = load_file(latest_checkpoint(tmp_path / "big") / "model.safetensors")
    w_accum = load_file(latest_checkpoint(tmp_path / "accum") / "model.safetensors")
    assert all(torch.allclose(w_big[k], w_accum[k], atol=1e-5) for k in w_big)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_teacher_is_frozen_and_only_projections_and_norms_train(cache, tiny_teacher, tmp_path):
    teacher = tiny_teacher("llama")
    files = sorted(teacher.path.glob("*.safetensors"))
    digests = [_sha256(f) for f in files]
    captured: dict[str, Trainer] = {}

    class Keep(Callback):
        def on_train_start(self, trainer: Trainer) -> None:
            captured["trainer"] = trainer

    train_student(lrc_config(cache, tmp_path / "run", steps=3, eval_every=0), callbacks=[Keep()])
    trainer = captured["trainer"]
    student = trainer.module.student
    assert isinstance(student, LRCStudent)
    trained = {name for group in trainer.optimizer.param_groups for p in group["params"] for name, q in student.named_parameters() if p is q}
    assert trained == {name for name, _ in student.named_parameters()}
    assert all(name.endswith(("proj", "norm")) or ".proj." in name for name in trained), trained
    # Every teacher tensor the student holds is still exactly the teacher's, and never got a gradient.
    reference = teacher.model.state_dict()
    layer = student.layers[1]
    for name, hf_name in [("q", "q_proj"), ("down", "down_proj"), ("gate", "gate_proj")]:
        w = layer.teacher_weight(name)
        assert not w.requires_grad and w.grad is None
        module = "self_attn" if name == "q" else "mlp"
        assert torch.equal(w, reference[f"model.layers.1.{module}.{hf_name}.weight"])
    assert torch.equal(student.teacher_embed, reference["model.embed_tokens.weight"])
    assert [_sha256(f) for f in files] == digests
    # The checkpoint holds the trainable state only: no teacher tensor is saved with the student.
    saved = load_file(latest_checkpoint(tmp_path / "run") / "model.safetensors")
    assert set(saved) == trained


def _outputs_at(model, input_ids, positions, modules: dict[str, str]) -> dict[int, dict[str, torch.Tensor]]:
    """Outputs of named submodules of every decoder layer, gathered at the positions (B, K, W)."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for term, path in modules.items():
            def keep(module, args, output, i=i, term=term):
                index = positions.unsqueeze(-1).expand(-1, -1, output.shape[-1])
                found.setdefault(i, {})[term] = output.gather(1, index)

            hooks.append(layer.get_submodule(path).register_forward_hook(keep))
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()
    return found


def test_clone_loss_is_taken_at_the_cached_snapshot_positions_only(cache, tiny_teacher, tmp_path):
    config = lrc_config(cache, tmp_path / "unused", lm_weight=0.0, kd_weight=0.0, clone_weight=1.0)
    opened = open_cache(cache)
    student = build_student(config, opened.manifest, device=torch.device("cpu"))
    module = StudentLoss(student, mode=opened.mode, kd_temperature=1.0, chunk_size=64, use_lm=False, use_kd=False, use_clone=True)
    batch = next(iter(StudentLoader(opened, split="train", batch_size=4, seed=0)))
    positions = batch.snap_positions  # (B, K)
    got = module(batch, LossWeights(0.0, 0.0, 1.0))

    # Independent reference: the exported student and the live teacher, hooked at the same positions.
    exported = AutoModelForCausalLM.from_config(student.config)
    exported.load_state_dict(student.student_weights(), strict=False)
    exported.tie_weights()
    terms = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "ffn_out": "mlp.down_proj"}
    ours = _outputs_at(exported.eval(), batch.input_ids, positions, terms)
    theirs = _outputs_at(tiny_teacher("llama").model, batch.input_ids, positions, terms)
    for layer_index, layer in enumerate(student.layers):
        theirs[layer_index]["ffn_out"] = theirs[layer_index]["ffn_out"] @ layer.proj["down"].detach()
    for term in terms:
        want = sum(F.mse_loss(ours[i][term], theirs[i][term]) for i in ours)
        # bf16 snapshots agree to ~2e-4; snapshots of the neighbouring positions would be off by > 1%.
        assert float(got[f"loss/clone/{term}"]) == pytest.approx(float(want), rel=1e-3), term

    # Causality pins the positions: tokens after a row's last snapshot position cannot change its
    # clone loss, a token before its first one must.
    last, first = positions.max(dim=1).values, positions.min(dim=1).values
    later = batch.input_ids.clone()
    changed = 0
    for row in range(later.shape[0]):
        if last[row] + 1 < SEQ_LEN:
            later[row, last[row] + 1 :] = (later[row, last[row] + 1 :] + 1) % 300
            changed += 1
    assert changed
    assert torch.equal(module(batch._replace(input_ids=later), LossWeights(0.0, 0.0, 1.0))["loss/clone"], got["loss/clone"])
    earlier = batch.input_ids.clone()
    earlier[0, first[0]] = (earlier[0, first[0]] + 1) % 300
    assert not torch.equal(module(batch._replace(input_ids=earlier), LossWeights(0.0, 0.0, 1.0))["loss/clone"], got["loss/clone"])


def test_a_plain_student_trains_on_kd_and_lm(cache, tmp_path):
    student_config = tmp_path / "student.json"
    student_config.write_text(json.dumps(dict(
        model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
    )))  # fmt: skip
    config = lrc_config(
        cache, tmp_path / "run", student="plain", hidden_size=None, student_config=student_config, clone_weight=0.0,
        steps=6, lr=1e-2, lr_schedule="constant", warmup_steps=0, kd_schedule="constant", lm_weight=0.1,
    )  # fmt: skip
    summary = train_student(config)
    train = [r for r in records(tmp_path / "run") if r["type"] == "train"]
    assert summary.step == 6 and "loss/clone" not in train[0] and {"loss/lm", "loss/kd"} <= train[0].keys()
    assert train[-1]["loss/kd"] < train[0]["loss/kd"] and train[-1]["loss/lm"] < train[0]["loss/lm"] and train[-1]["loss"] < train[0]["loss"]
    saved = load_file(latest_checkpoint(tmp_path / "run") / "model.safetensors")
    assert "model.model.embed_tokens.weight" in saved
