"""Build the student a run trains, from its config and the teacher cache's manifest.

Both kinds present one interface to the trainer: `forward(input_ids_BT,
capture_positions_BK=None) -> LRCOutput` (final hidden states, no LM head, so that the
losses can apply the head in position chunks) and `lm_head_weight()`; `lm_head_bias`
below gives the head's bias where a plain architecture has one.

- `lrc`: the teacher named in the manifest is loaded and checked against the manifest's
  config and weights hashes (a teacher that changed since caching would make the cached
  targets and snapshots lie about it), then wrapped by `LRCStudent`.
- `plain`: any causal-LM config from a JSON file, randomly initialised; its vocabulary
  must cover every id the cache can hold (the teacher's LM-head rows).
"""

from __future__ import annotations


import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from kdpipe.schemas.cache_format import CacheManifest
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.lrc import LRCOutput, LRCSpec, LRCStudent
from kdpipe.student_train.validate import check_plain_config, read_student_config, teacher_dir
from kdpipe.student_train.lrc_init import (
    SharedBasis,
    best_logit_scale,
    cached_residual_samples,
    calibration_tokens,
    shared_basis,
)
from kdpipe.teacher_cache import TeacherCache, TeacherModel, check_same_teacher


class PlainStudent(nn.Module):
    """A Hugging Face causal LM behind the LRC student's interface (no clone activations)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids_BT: Tensor, *, capture_positions_BK: Tensor | None = None) -> LRCOutput:
        assert capture_positions_BK is None, "a plain student has no clone activations"
        out = self.model.get_decoder()(input_ids=input_ids_BT, use_cache=False)
        return LRCOutput(hidden=out.last_hidden_state, activations={})  # (B, T, D)

    def lm_head_weight(self) -> Tensor:
        return self.model.get_output_embeddings().weight  # (V, D)

    def lm_head_bias(self) -> Tensor | None:
        return self.model.get_output_embeddings().bias

    def blocks(self) -> list[nn.Module]:
        """The decoder blocks: the longest module list under the decoder, whatever it is called."""
        lists = [m for m in self.model.get_decoder().modules() if isinstance(m, nn.ModuleList)]
        return list(max(lists, key=len)) if lists else []


Student = LRCStudent | PlainStudent


def lm_head_bias(student: Student) -> Tensor | None:
    """The LM head's bias, if the architecture has one (LRC teachers' heads have none)."""
    return student.lm_head_bias() if isinstance(student, PlainStudent) else None


def build_student(
    config: TrainStudentConfig, manifest: CacheManifest, *, device: torch.device, cache: TeacherCache | None = None
) -> Student:
    """The student of `config`, initialised from `config.seed`, on `device`.

    `cache` is where `--lrc-init shared` reads its residual samples; without it (export,
    which loads trained weights right after) the projections start random instead.
    """
    if config.clone_weight > 0 and not manifest.snapshot.layers:
        raise KdpipeError(
            f"cache {config.cache} has no FFN snapshots, which --clone-weight > 0 needs; use a cache made with "
            "--snapshot-layers or set --clone-weight 0"
        )
    torch.manual_seed(config.seed)
    if config.student == "lrc":
        teacher = load_teacher(manifest, device=device)
        assert config.hidden_size is not None
        shared = config.lrc_init == "shared" and cache is not None
        spec = LRCSpec(
            hidden_size=config.hidden_size,
            init="shared" if shared else "random",
            init_std=config.init_std,
            tie_embeddings=config.tie_embeddings,
            basis=shared_basis_of(cache, teacher, config.hidden_size) if shared else None,
        )
        student = LRCStudent(teacher, spec)
        if shared:
            calibrate_final_norm(student, calibration_tokens(cache).to(device))
        if config.clone_weight > 0:
            student.capture_layers = manifest.snapshot.layers
        return student
    assert config.student_config is not None
    return build_plain(read_student_config(config.student_config), manifest).to(device)


def shared_basis_of(cache: TeacherCache, teacher: PreTrainedModel, hidden_size: int) -> SharedBasis:
    """The shared basis of `--lrc-init shared` from the cache's snapshots and the teacher's embedding and norms."""
    post_norm_weights = [layer.post_attention_layernorm.weight.detach().cpu() for layer in teacher.get_decoder().layers]
    embedding_VD = teacher.get_input_embeddings().weight.detach()
    return shared_basis(cached_residual_samples(cache, post_norm_weights, embedding_VD), hidden_size)


@torch.no_grad()
def calibrate_final_norm(student: LRCStudent, tokens_BT: Tensor) -> None:
    """Scale the shared init's final norm to the `LOGIT_SCALES` entry that predicts `tokens_BT` best."""
    hidden_BTS = student(tokens_BT).hidden
    hidden_ND = hidden_BTS[:, :-1].reshape(-1, hidden_BTS.shape[-1])  # (B*(T-1), d_S)
    scale = best_logit_scale(hidden_ND, student.lm_head_weight(), tokens_BT[:, 1:].reshape(-1))
    student.final_norm.mul_(scale)


def load_teacher(manifest: CacheManifest, *, device: torch.device) -> PreTrainedModel:
    """The cache's teacher, frozen, refused if it is not the teacher the cache was made from."""
    path = teacher_dir(manifest)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    # Without transformers' "Loading weights" bar: a stray tqdm line on stderr would break
    # the one-line error of the hash check below.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        teacher = TeacherModel.load(path, device=str(device), dtype=dtype)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    check_same_teacher(path, teacher.info, manifest.teacher)
    return teacher.model


def build_plain(config: PretrainedConfig, manifest: CacheManifest) -> PlainStudent:
    """A randomly initialised plain student (fp32 master weights), checked against the cache."""
    check_plain_config(config, manifest, where="plain student")
    return PlainStudent(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
