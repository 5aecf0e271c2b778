"""Two gloo ranks under torchrun (DDP, and FSDP2) train what one process trains on the same global batch.

The reference is an in-process run whose loader yields, at every step, rank 0's batch
followed by rank 1's (the loaders of a 2-rank run, concatenated): the same rows the two
ranks see together. Losses (averaged over ranks), gradient norms and weights must agree.
The gradient norm is the sharp check: AdamW's first steps move weights by about ±lr
whatever the gradient's scale, so ranks that summed gradients instead of averaging them
would still produce nearly the same weights, but twice the gradient norm.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.run_dir import latest_checkpoint
from kdpipe.student_train.loader import StudentBatch, StudentLoader
from kdpipe.student_train.losses import SparseTargetBatch
from kdpipe.student_train.parallelize import DistContext
from kdpipe.student_train.run import build_trainer
from kdpipe.teacher_cache import open_cache
from tests.unit.student_train.test_trainer import SEQ_LEN, build_cache, lrc_config, records

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
RANKS = 2
BATCH = 2


@pytest.fixture(scope="module")
def cache(tiny_teacher, tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("ddp-cache"), tiny_teacher("llama").path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _merge(batches: tuple[StudentBatch, ...]) -> StudentBatch:
    """Rows of several batches as one; entry offsets shifted past the earlier batches."""
    offsets, shift = [], 0
    for b in batches:
        offsets.append(b.targets.offsets[:-1] + shift)
        shift += int(b.targets.offsets[-1])
    targets = SparseTargetBatch(
        ids=torch.cat([b.targets.ids for b in batches]),
        weights=torch.cat([b.targets.weights for b in batches]),
        offsets=torch.cat(offsets + [torch.tensor([shift])]),
        ghost=None,
    )
    first = batches[0]
    return StudentBatch(
        input_ids=torch.cat([b.input_ids for b in batches]),
        labels=torch.cat([b.labels for b in batches]),
        targets=targets,
        snap_positions=torch.cat([b.snap_positions for b in batches]),
        snapshots={
            layer: {term: torch.cat([b.snapshots[layer][term] for b in batches]) for term in terms}
            for layer, terms in first.snapshots.items()
        },
        step=first.step,
        epoch=first.epoch,
    )


class GlobalBatches:
    """The batches of all ranks of a `RANKS`-rank run, merged into one batch per step."""

    def __init__(self, cache_dir: Path, seed: int) -> None:
        cache = open_cache(cache_dir)
        self.loaders = [
            StudentLoader(cache, split="train", batch_size=BATCH, seed=seed, rank=r, world_size=RANKS) for r in range(RANKS)
        ]

    def __iter__(self):
        for batches in zip(*self.loaders):
            yield _merge(batches)

    def state_dict(self) -> dict:
        return {"ranks": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        for loader, saved in zip(self.loaders, state["ranks"]):
            loader.load_state_dict(saved)


def test_merge_keeps_each_rows_targets(cache):
    loaders = GlobalBatches(cache, seed=0).loaders
    a, b = next(iter(loaders[0])), next(iter(loaders[1]))
    merged = _merge((a, b))
    n = a.input_ids.numel()
    for p in (0, 5, n - 1):  # positions of rank 1's rows: their entries follow all of rank 0's
        got = merged.targets.ids[merged.targets.offsets[n + p] : merged.targets.offsets[n + p + 1]]
        assert torch.equal(got, b.targets.ids[b.targets.offsets[p] : b.targets.offsets[p + 1]])
    assert torch.equal(merged.input_ids, torch.cat([a.input_ids, b.input_ids]))


# A larger AdamW epsilon keeps the update a smooth function of the gradient: with 1e-8, an
# element whose gradient is ~0 moves by ±lr depending on rounding in the all-reduce.
OPTIONS = dict(steps=4, batch_size=BATCH, grad_accum=2, eval_every=0, checkpoint_every=2, warmup_steps=1, adam_eps=1e-5)


def torchrun(cache: Path, out: Path, *extra: object) -> None:
    """`torchrun --nproc-per-node 2 -m kdpipe train-student ...` on 127.0.0.1 with OPTIONS (some from a --config file)."""
    config_file = out.parent / f"{out.name}.yaml"
    config_file.write_text("train-student:\n  adam_eps: 1.0e-5\n  kd_schedule: wsd\n")
    flags = {
        "--cache": cache, "--out": out, "--hidden-size": 32, "--steps": 4, "--batch-size": BATCH,
        "--grad-accum": 2, "--lr": 1e-2, "--warmup-steps": 1, "--lm-weight": 0.5, "--clone-weight": 0.3,
        "--config": config_file, "--log-every": 1, "--checkpoint-every": 2, "--eval-every": 4, "--eval-batches": 1,
        "--num-workers": 0, "--device": "cpu",
    }  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(RANKS),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "kdpipe", "train-student", *[str(x) for pair in flags.items() for x in pair], *map(str, extra),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(cache, out)
    return out


def _assert_same_training(a: Path, b: Path) -> None:
    """Same steps and tokens; losses and gradient norms and final weights equal up to fp32 reduction order."""
    train_a = [r for r in records(a) if r["type"] == "train"]
    train_b = [r for r in records(b) if r["type"] == "train"]
    assert [r["step"] for r in train_a] == [r["step"] for r in train_b] == [1, 2, 3, 4]
    for x, y in zip(train_a, train_b):
        assert x["tokens"] == y["tokens"] == x["step"] * 2 * RANKS * BATCH * SEQ_LEN
        for key in ("loss", "loss/lm", "loss/kd", "loss/clone", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    w_a = load_file(latest_checkpoint(a) / "model.safetensors")
    w_b = load_file(latest_checkpoint(b) / "model.safetensors")
    assert w_a.keys() == w_b.keys()
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(cache, ddp_run, tmp_path):
    # The 1-process reference: the same options, the two ranks' batches as one batch per step.
    config = lrc_config(cache, tmp_path / "single", **OPTIONS)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    build_trainer(config, ctx, loader=GlobalBatches(cache, seed=config.seed)).fit()
    _assert_same_training(ddp_run, tmp_path / "single")

    # Eval sums over both ranks: each evaluated one batch of BATCH sequences (SEQ_LEN - 1 labels each).
    (evaluation,) = [r for r in records(ddp_run) if r["type"] == "eval"]
    assert evaluation["eval/num_lm_tokens"] == RANKS * BATCH * (SEQ_LEN - 1)
    run = json.loads((ddp_run / "run.json").read_text())
    assert run["world_size"] == RANKS and run["global_batch_size"] == RANKS * BATCH * 2


def test_fsdp_trains_what_ddp_trains_and_resumes_from_its_checkpoint(cache, ddp_run, tmp_path):
    run = tmp_path / "fsdp"
    torchrun(cache, run, "--parallelism", "fsdp")
    _assert_same_training(ddp_run, run)
    # A crash right after the checkpoint of step 2: the last checkpoint is gone, a resumed run
    # loads the sharded student and optimizer from step 2 and ends on the same records.
    finished = records(run)
    shutil.rmtree(latest_checkpoint(run))
    assert latest_checkpoint(run).name == "step-00000002"
    torchrun(cache, run, "--parallelism", "fsdp", "--resume")
    assert records(run) == finished  # bit for bit (the wall-clock field aside)


def test_resume_with_another_number_of_ranks_is_refused(cache, tmp_path):
    config = lrc_config(cache, tmp_path / "run", steps=2, eval_every=0)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    build_trainer(config, ctx).fit()
    other = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(KdpipeError, match="was started on 1 rank"):
        build_trainer(lrc_config(cache, tmp_path / "run", steps=2, eval_every=0, resume=True), other)
