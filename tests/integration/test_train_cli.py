"""The real commands end to end: prepare-data → cache-teacher → train-student → export-student.

The teacher is the tiny Qwen2 (q/k/v biases, untied head padded to 320 rows). Checks that
the export loads with AutoModelForCausalLM and computes the trained LRC student's logits,
that SIGTERM checkpoints and exits 75 and `--resume` finishes the run on the same curve,
and that every bad input is one `error:` line with exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdpipe.cli import main
from kdpipe.schemas.cache_format import CacheManifest
from kdpipe.schemas.run_dir import METRICS_FILE, latest_checkpoint, read_run_config
from kdpipe.student_train.builders import build_student
from kdpipe.student_train.checkpoint import load_checkpoint
from kdpipe.student_train.run import train_student
from kdpipe.student_train.trainer import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
VOCAB_ROWS = 320  # the tiny Qwen2's LM head rows


def kdpipe(*args: object, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "kdpipe", *map(str, args)]
    if not wait:  # its own process group, to be signalled as a whole like a Slurm job step
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tiny_teacher, tmp_path_factory) -> Path:
    """A copy of the tiny Qwen2 teacher, its token store, and an rs-kd cache with snapshots of every layer."""
    root = tmp_path_factory.mktemp("train-cli")
    shutil.copytree(tiny_teacher("qwen2").path, root / "teacher")
    lines = [json.dumps({"text": f"record {i}: caches of sparse logits train students {i * 3} times over. " * 2}) for i in range(24)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    steps = [
        ("prepare-data", root / "corpus.jsonl", "--tokenizer", root / "teacher", "--out", root / "tokens", "--seq-len", 32, "--val-fraction", 0.25),
        ("cache-teacher", "--teacher", root / "teacher", "--tokens", root / "tokens", "--out", root / "cache", "--mode", "rs-kd",
         "--snapshot-layers", "all", "--snapshot-fraction", 0.125, "--sequences-per-shard", 32, "--sequences-per-chunk", 4),
    ]  # fmt: skip
    for args in steps:
        done = kdpipe(*args)
        assert done.returncode == 0, done.stderr
    return root


def train_args(work: Path, out: Path, *extra: object) -> list[object]:
    return [
        "train-student", "--cache", work / "cache", "--out", out, "--student", "lrc", "--hidden-size", 24, "--batch-size", 2,
        "--lr", 1e-2, "--clone-weight", 0.5, "--log-every", 1, "--num-workers", 1, *extra,
    ]  # fmt: skip


def test_train_then_export_gives_a_standard_model_with_the_students_logits(work, tmp_path):
    done = kdpipe(*train_args(work, tmp_path / "run", "--steps", 3, "--eval-every", 3))
    assert done.returncode == 0, done.stderr
    assert "trained 3 steps" in done.stdout
    again = kdpipe(*train_args(work, tmp_path / "run", "--steps", 3, "--eval-every", 3, "--resume"))
    assert again.returncode == 0, again.stderr
    assert "already finished all 3 steps, nothing to train" in " ".join(again.stdout.split())
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "run.json", METRICS_FILE, "checkpoints"}
    assert json.loads((run / "run.json").read_text())["cache"]["fingerprint"] == json.loads((work / "cache" / "manifest.json").read_text())["fingerprint"]
    assert in_process("export-student", run, "--out", tmp_path / "export") == 0

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported).__name__ == "Qwen2ForCausalLM" and exported.config.hidden_size == 24
    # The trained student, rebuilt from its checkpoint (the teacher is hash-checked again).
    manifest = CacheManifest.from_json((work / "cache" / "manifest.json").read_text(), where="manifest")
    student = build_student(read_run_config(run), manifest, device=torch.device("cpu"))
    student.load_state_dict(load_checkpoint(latest_checkpoint(run)).model_state)
    student.eval()
    ids = torch.randint(0, VOCAB_ROWS, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student(ids).hidden @ student.lm_head_weight().T  # (B, T, V)
        got = exported(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    prompt = tokenizer("the teacher", return_tensors="pt")
    generated = exported.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_a_plain_student_exports_with_save_pretrained(work, tmp_path):
    config = tmp_path / "student.json"
    config.write_text(json.dumps(dict(
        model_type="qwen2", vocab_size=VOCAB_ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )))  # fmt: skip
    code = in_process(
        "train-student", "--cache", work / "cache", "--out", tmp_path / "run", "--student", "plain", "--student-config", config,
        "--steps", 2, "--batch-size", 2, "--num-workers", 0,
    )  # fmt: skip
    assert code == 0
    assert in_process("export-student", tmp_path / "run", "--out", tmp_path / "export") == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    saved = load_checkpoint(latest_checkpoint(tmp_path / "run")).model_state
    assert torch.equal(exported.lm_head.weight, saved["model.lm_head.weight"])
    assert (tmp_path / "export" / "tokenizer.json").is_file()


def _train_steps(run: Path) -> list[int]:
    path = run / METRICS_FILE
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "train"]


def test_sigterm_to_the_job_checkpoints_exits_75_and_resume_finishes_on_the_same_curve(work, tmp_path):
    steps = 10  # the signal comes as soon as 2 steps are logged; the stop follows within a step
    run = tmp_path / "run"
    process = kdpipe(*train_args(work, run, "--steps", steps), wait=False)
    deadline = time.monotonic() + 120
    while len(_train_steps(run)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # Every process of the group, loader worker included (--num-workers 1), as Slurm does.
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    stopped_at = _train_steps(run)[-1]
    assert 2 <= stopped_at < steps and latest_checkpoint(run).name == f"step-{stopped_at:08d}"

    assert in_process(*train_args(work, run, "--steps", steps, "--resume")) == 0
    assert _train_steps(run) == list(range(1, steps + 1))

    # The same run without interruption, in this process: the same curve to the last bit.
    config = read_run_config(run)
    train_student(type(config)(**{**{k: getattr(config, k) for k in config.__slots__}, "out": tmp_path / "reference", "resume": False}))
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in path.read_text().splitlines()]  # noqa: E731
    assert strip(run / METRICS_FILE) == strip(tmp_path / "reference" / METRICS_FILE)
    final, reference = load_file(latest_checkpoint(run) / "model.safetensors"), load_file(latest_checkpoint(tmp_path / "reference") / "model.safetensors")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def in_process(*args: object) -> int:
    """The real CLI entry point (`kdpipe.cli.main`) in this process, saving an interpreter start; its exit status."""
    sys_argv = sys.argv
    sys.argv = ["kdpipe", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = sys_argv
    return exit_info.value.code


def _error(capsys, *args: object) -> str:
    """Run the CLI in-process; return its one error line (exit status must be 2)."""
    code = in_process(*args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_inputs_are_one_line_and_exit_2(work, tmp_path, capsys):
    args = lambda out, *extra: train_args(work, out, "--steps", 1, "--num-workers", 0, *extra)  # noqa: E731
    assert "'tiny' is not one of 'lrc', 'plain'" in _error(capsys, *args(tmp_path / "a", "--student", "tiny"))

    small = tmp_path / "small.json"
    small.write_text(json.dumps(dict(model_type="llama", vocab_size=300, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)))  # fmt: skip
    plain = ["--student", "plain", "--student-config", small, "--clone-weight", 0]
    line = _error(capsys, "train-student", "--cache", work / "cache", "--out", tmp_path / "b", "--steps", 1, *plain)
    assert "vocabulary has 300 ids but the cache's teacher has 320" in line
    line = _error(capsys, "train-student", "--cache", work / "cache", "--out", tmp_path / "b", "--steps", 1, *plain[:4], "--clone-weight", 1)
    assert "--clone-weight > 0 needs --student lrc" in line

    # A cache without snapshots, of a teacher copy whose weights then change.
    shutil.copytree(work / "teacher", tmp_path / "teacher")
    code = in_process("cache-teacher", "--teacher", tmp_path / "teacher", "--tokens", work / "tokens", "--out", tmp_path / "bare",
                      "--snapshot-layers", "none", "--sequences-per-shard", 32, "--sequences-per-chunk", 4)  # fmt: skip
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    bare = ["--cache", tmp_path / "bare"]
    assert "has no FFN snapshots" in _error(capsys, *args(tmp_path / "c"), *bare)
    weights = load_file(tmp_path / "teacher" / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    save_file(weights, tmp_path / "teacher" / "model.safetensors", metadata={"format": "pt"})
    line = _error(capsys, *args(tmp_path / "c"), *bare, "--clone-weight", 0)
    assert "is not the teacher of this cache (its weights hash" in line

    # A second start without --resume, and a resume on another cache.
    assert in_process(*args(tmp_path / "run")) == 0
    capsys.readouterr()
    assert "already holds a training run; pass --resume" in _error(capsys, *args(tmp_path / "run"))
    resume_elsewhere = ["train-student", *bare, *train_args(work, tmp_path / "run", "--steps", 1, "--resume")[3:]]
    line = _error(capsys, *resume_elsewhere)
    assert "was trained on cache" in line and "resume with the original cache" in line
