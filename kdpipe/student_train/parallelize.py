"""Distributed training: process group from torchrun's environment, DDP or FSDP2 wrapping.

Model code knows nothing of this module: the trainer hands it the train module (student
plus loss) and gets back a wrapped module, a context for gradient accumulation, and full
state dicts for checkpoints.

- The process group comes from the variables torchrun (or `srun torchrun`) sets: RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. gloo on CPU, NCCL on GPU (one GPU per
  rank, cuda:LOCAL_RANK). Without them the run is a single process and no group is made.
- DDP averages gradients over ranks. The frozen teacher tensors of an LRC student are
  buffers: they are excluded from DDP's broadcasts (identical on every rank, checked
  against the cache manifest, and a 3B teacher would be sent at every forward otherwise).
- FSDP2 (`fully_shard`) shards parameters, gradients and optimizer state, gathering the
  weights in bf16 on GPUs (fp32 on CPU, where gloo runs it for tests). A plain student is
  sharded per decoder block, then the root. An LRC student is sharded
  at the root only: its layers compute their weights outside their own `forward`
  (`LRCStudent._base_weights`), and FSDP2 gathers a module's parameters in a hook on its
  forward, so per-layer units would never be gathered. Its trainable state is the small
  part anyway (projections and norms); the teacher buffers stay replicated.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from kdpipe.schemas.errors import KdpipeError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, slots=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    def all_reduce(self, tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
        """In place over all ranks (a no-op in a single process); returns `tensor`."""
        if self.distributed:
            dist.all_reduce(tensor, op=op)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (e.g. a decision only rank 0 can make)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def init_distributed(device: str) -> DistContext:
    """Join torchrun's process group if its variables are set; pick this rank's device."""
    launched = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    if launched["WORLD_SIZE"] is None:
        return DistContext(rank=0, world_size=1, local_rank=0, device=_device(device, 0))
    missing = [name for name, value in launched.items() if value is None]
    if missing:
        raise KdpipeError(f"WORLD_SIZE is set but {', '.join(missing)} are not; launch with torchrun (or srun torchrun)")
    rank, world_size, local_rank = int(launched["RANK"]), int(launched["WORLD_SIZE"]), int(launched["LOCAL_RANK"])
    torch_device = _device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if torch_device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=30),
            device_id=torch_device if torch_device.type == "cuda" else None,
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _device(option: str, local_rank: int) -> torch.device:
    if option == "cpu" or (option == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise KdpipeError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise KdpipeError(
            f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); start at most one rank per GPU"
        )
    return torch.device("cuda", local_rank)


def parallelize(
    module: nn.Module, *, ctx: DistContext, mode: str, blocks: list[nn.Module], find_unused_parameters: bool
) -> nn.Module:
    """Wrap `module` for data-parallel training (returned unchanged in a single process).

    `blocks` are the FSDP units below the root (empty: root only). `find_unused_parameters`
    is needed by DDP when the loss does not reach every parameter (e.g. clone loss only).
    """
    if mode == "fsdp":
        if not dist.is_initialized():
            raise KdpipeError("--parallelism fsdp needs a process group; launch with torchrun (also for one process)")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # On GPU: gather weights in bf16, reduce gradients in fp32 (the usual FSDP2 mixed
        # precision). On CPU everything stays fp32, as without FSDP.
        gpu = ctx.device.type == "cuda"
        precision = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu else {}
        for block in blocks:
            fully_shard(block, mp_policy=MixedPrecisionPolicy(**precision))
        # The root's input is the batch: its KD target weights and snapshots stay fp32 (the
        # losses choose their dtypes). Its parameters are needed again at once by backward:
        # they stay gathered after forward.
        root_policy = MixedPrecisionPolicy(**precision, cast_forward_inputs=False)
        fully_shard(module, mp_policy=root_policy, reshard_after_forward=False)
        return module
    if not ctx.distributed:
        return module
    ignored = [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    return DistributedDataParallel(
        module,
        device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=find_unused_parameters,
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 wraps in place: the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for micro-batches that are not the last of a step."""
    if isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(enabled)
    yield


_FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Unsharded model and optimizer state (optimizer keyed by parameter names), on CPU.

    Collective under FSDP (every rank must call it); only rank 0's copy is complete then.
    """
    inner = unwrap(module)
    return get_model_state_dict(inner, options=_FULL_STATE), get_optimizer_state_dict(inner, optimizer, options=_FULL_STATE)


def load_full_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Tensor], optimizer_state: dict[str, Any]
) -> None:
    """Load states written by `full_state` (each rank passes the full copy it read from disk)."""
    inner = unwrap(module)
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(inner, model_state, options=options)
    set_optimizer_state_dict(inner, optimizer, optimizer_state, options=options)


def grad_norm_value(norm: Tensor) -> Tensor:
    """A gradient norm as a plain tensor (FSDP2 returns a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
