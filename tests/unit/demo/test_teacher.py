"""The demo tokenizer and teacher: round-trips, a short training run, a loadable teacher directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from kdpipe.demo import teacher as demo_teacher
from kdpipe.demo.teacher import (
    SUMMARY_FILE,
    DemoTeacherConfig,
    load_split,
    lr_schedule,
    train_demo_teacher,
    train_demo_tokenizer,
)
from kdpipe.pipeline.prepare import prepare_data
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.token_store import TokenStore
from kdpipe.student_train.losses import IGNORE_INDEX

TINY = DemoTeacherConfig(
    hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, batch_size=8, lr=1e-2, eval_sequences=16,
    num_threads=1,  # tests share the CPU: one thread each avoids oversubscription stalls
)
SAMPLE_TEXTS = [
    f'def f{i}(x):\n    """Return x plus {i} — déjà vu ünïcode ✓."""\n    return x + {i}\n\nclass C{i}:\n    pass\n'
    for i in range(300)
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus_file) -> Path:
    tokenizer = train_demo_tokenizer([corpus_file], tmp_path_factory.mktemp("tokenizer"), vocab_size=400)
    out = tmp_path_factory.mktemp("store") / "store"
    prepare_data(PrepareDataConfig(inputs=[str(corpus_file)], tokenizer=tokenizer, out=out, seq_len=32, val_fraction=0.2))
    return out


def test_tokenizer_round_trips_and_declares_its_specials(corpus_file, tmp_path):
    directory = train_demo_tokenizer([corpus_file], tmp_path / "tok", vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    assert len(tokenizer) == 400
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<s>", "</s>", "<pad>"]
    for text in [SAMPLE_TEXTS[7], "  leading spaces\ttabs\n\n and 中文 never seen in training 🙂"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # merges were learnt: the training text takes far fewer tokens than bytes
    assert len(tokenizer(SAMPLE_TEXTS[7])["input_ids"]) < len(SAMPLE_TEXTS[7].encode()) / 2
    again = train_demo_tokenizer([corpus_file], tmp_path / "again", vocab_size=400)
    assert (again / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()


def val_loss_of(model: torch.nn.Module, store_dir: Path, num_sequences: int) -> float:
    """Independent reference: Hugging Face's own shifted loss, token-weighted over the val sequences."""
    split = TokenStore.open(store_dir).split("val")
    tokens = torch.from_numpy(split.tokens(0, min(num_sequences, split.num_sequences))).long()
    with torch.no_grad():
        return float(model(input_ids=tokens, labels=tokens).loss)


def test_short_training_learns_and_saves_a_complete_teacher(store, tmp_path):
    summary = train_demo_teacher(store, tmp_path / "teacher", config=TINY, minutes=None, steps=30)
    assert summary.steps == 30 and summary.tokens == 30 * 8 * 32

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "teacher"), local_files_only=True)
    assert isinstance(model, LlamaForCausalLM) and model.config.vocab_size == 400
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "teacher"), local_files_only=True)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(Path(store) / "tokenizer")).get_vocab()

    val_loss = val_loss_of(model, store, TINY.eval_sequences)
    assert val_loss == pytest.approx(summary.val_loss, abs=1e-4)
    torch.manual_seed(TINY.seed)
    untrained = LlamaForCausalLM(model.config)
    assert val_loss_of(untrained, store, TINY.eval_sequences) == pytest.approx(math.log(400), abs=0.2)
    assert val_loss < math.log(400) - 1.5  # the sample corpus is very repetitive: 30 steps learn a lot
    record = json.loads((tmp_path / "teacher" / SUMMARY_FILE).read_text())
    assert record["steps"] == 30 and record["val_loss"] == summary.val_loss


def plan_fixed(monkeypatch, planned: int) -> None:
    """Run the real budget calibration (it trains throw-away steps, then restores the weights) but plan `planned` steps."""
    real = demo_teacher._steps_in_budget

    def fixed(*args, **kwargs):
        real(*args, **kwargs)
        return planned

    monkeypatch.setattr(demo_teacher, "_steps_in_budget", fixed)


def test_a_time_budget_only_chooses_the_step_count(store, tmp_path, monkeypatch):
    plan_fixed(monkeypatch, 12)
    timed = train_demo_teacher(store, tmp_path / "timed", config=TINY, minutes=10.0, steps=10**6)
    assert timed.steps == timed.planned_steps == 12
    replay = train_demo_teacher(store, tmp_path / "replay", config=TINY, minutes=None, steps=12)
    assert replay.val_loss == timed.val_loss
    a, b = load_file(tmp_path / "timed" / "model.safetensors"), load_file(tmp_path / "replay" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_budget_stops_a_run_that_falls_behind_its_plan(store, tmp_path, monkeypatch):
    plan_fixed(monkeypatch, 500)
    summary = train_demo_teacher(store, tmp_path / "late", config=TINY, minutes=1e-4, steps=10**6)
    assert 1 <= summary.steps < summary.planned_steps == 500
    assert summary.tokens == summary.steps * 8 * 32
    assert "stopped by the 0.0001-minute budget" in summary.text()


def test_the_budget_plan_fits_the_machine(store, tmp_path):
    summary = train_demo_teacher(store, tmp_path / "t", config=TINY, minutes=0.02, steps=10**6)
    assert 1 <= summary.planned_steps < 10**6


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = DemoTeacherConfig(lr=1e-3, warmup_fraction=0.05, min_lr_ratio=0.1)
    rates = [lr_schedule(config, 100).value(step) / 1e-3 for step in range(100)]
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    assert rates[-1] == pytest.approx(0.1)
    assert lr_schedule(config, 1).value(0) == pytest.approx(1e-3)  # one step: warm-up of one step, at the peak


def test_refuses_a_store_without_val_and_a_foreign_out_dir(corpus_file, store, tmp_path):
    no_val = tmp_path / "no-val"
    tokenizer = Path(store) / "tokenizer"
    prepare_data(PrepareDataConfig(inputs=[str(corpus_file)], tokenizer=tokenizer, out=no_val, seq_len=32))
    with pytest.raises(KdpipeError, match="no validation sequences"):
        train_demo_teacher(no_val, tmp_path / "t", config=TINY, minutes=None, steps=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(KdpipeError, match="not a demo teacher"):
        train_demo_teacher(store, foreign, config=TINY, minutes=None, steps=1)
    with pytest.raises(KdpipeError, match="num_heads"):
        DemoTeacherConfig(hidden_size=30, num_heads=4)


def test_only_the_padded_tail_is_masked_from_the_labels(corpus_file, store, tmp_path):
    padded = tmp_path / "padded"
    config = PrepareDataConfig(inputs=[str(corpus_file)], tokenizer=Path(store) / "tokenizer", out=padded, seq_len=32, tail="pad")
    summary = prepare_data(config)
    split = TokenStore.open(padded).split("train")
    num_padding = summary.splits["train"]["num_padding"]
    assert num_padding > 0
    tokens, labels = load_split(split, split.num_sequences)
    assert (labels[-1, -num_padding:] == IGNORE_INDEX).all()
    assert (labels[-1, :-num_padding] == tokens[-1, :-num_padding]).all() and (labels[:-1] == tokens[:-1]).all()
