"""The generator sidecar's door into vLLM's workers (`worker_extension_cls`).

vLLM mixes `Cosmos3WorkerExtension` into its worker class, so the generator lives in each worker process, next to
the reasoner's model runner and the K/V export connector: the prompt K/V never leave the process (or the GPU).

- While vLLM sizes its KV cache, `patches.reserve_generator_memory` calls `cosmos3_prepare_generator`: it loads the
  generator, measures its memory (`generator_memory`) and returns the reservation vLLM leaves it.
- A driver then calls `cosmos3_start_generator` (through `collective_rpc`) with the address of its event socket:
  the generator loop starts on its own thread (`generator_loop`), and the call returns what the driver needs to know
  (limits, memory).
- `cosmos3_submit` queues commands for the loop and returns at once: the engine core never waits for a step.

With tensor parallelism every rank runs the same calls on its shard; rank 0 answers and sends events.
"""

from __future__ import annotations

from typing import Any

import torch

from cosmos3_serve.model_executor import kv_export, log_routing, patches
from cosmos3_serve.model_executor.admission import GenerationLimits, GeneratorSettings, LatentGeometry
from cosmos3_serve.model_executor.diffusion_executor import DiffusionExecutor
from cosmos3_serve.model_executor.generator_loop import GeneratorLoop
from cosmos3_serve.model_executor.generator_memory import GeneratorMemory, measure
from cosmos3_serve.model_executor.generator_parallel import GeneratorGroup
from cosmos3_serve.model_executor.parallel_degrees import ParallelDegrees
from cosmos3_serve.model_executor.wire import Commands
from cosmos3_serve.quant.precision import nvfp4_kernel
from cosmos3_serve.quant.tower_precision import describe_tower

# vLLM imports this module (`worker_extension_cls`) in each worker process before it builds the worker: the workers'
# log records and patches are in place before the worker sizes its KV cache or builds its profiler, and no other
# process pays for their imports.
log_routing.route_to_vllm()
patches.reserve_generator_memory()
patches.profile_all_threads()


class Cosmos3WorkerExtension:
    """RPC surface of the generator in a vLLM worker (every name is prefixed: vLLM forbids clashes)."""

    def cosmos3_prepare_generator(self) -> int | None:
        """Load the generator of the served checkpoint on this worker's device and measure its memory: the bytes to
        leave it beside the KV cache (None when the engine serves no generator). Idempotent."""
        settings = GeneratorSettings.from_additional_config(self.vllm_config.additional_config)
        if settings is None:
            return None
        if getattr(self, "cosmos3_loop", None) is None:
            group = GeneratorGroup.of_tensor_parallel_group(torch.device(self.device),
                                                            ParallelDegrees.parse(settings.parallel))  # fmt: skip
            executor = DiffusionExecutor(self.vllm_config.model_config.model, self.vllm_config, self.device,
                                         settings.max_batch_tokens, getattr(torch, settings.vae_dtype),
                                         group,
                                         settings.a16_steps, settings.attention_precision)  # fmt: skip
            self.cosmos3_memory: GeneratorMemory = measure(executor, settings)
            kv_export.PROMPT_KV_STORE.max_bytes = settings.state_budget_bytes
            self.cosmos3_loop = GeneratorLoop(executor, group, kv_export.PROMPT_KV_STORE)
        return self.cosmos3_memory.total

    def cosmos3_start_generator(self, events_address: str | None) -> dict[str, Any]:
        """Start the generator loop (its events go to `events_address`); what the driver needs to know of it."""
        if getattr(self, "cosmos3_loop", None) is None:
            raise RuntimeError("the engine was built without the generator's settings (generation_engine_args)")
        loop = self.cosmos3_loop
        loop.start(events_address)
        executor = loop.executor
        settings = GeneratorSettings.from_additional_config(self.vllm_config.additional_config)
        config = executor.config
        kv_bytes_per_token = (config.num_hidden_layers * 2 * executor.tower.layers[0].attn.num_kv_heads
                              * config.head_dim * executor.dtype.itemsize)  # fmt: skip
        limits = GenerationLimits.of(settings, LatentGeometry.from_checkpoint(self.vllm_config.model_config.model),
                                     kv_bytes_per_token)  # fmt: skip
        return {"dtype": str(executor.dtype).removeprefix("torch."), "device": str(executor.device),
                "vae_dtype": str(executor.codec.vae.dtype).removeprefix("torch."),
                "generator_parameters": sum(p.numel() for p in executor.tower.parameters()),
                "max_batch_tokens": executor.max_batch_tokens, "limits": limits.__dict__,
                "parallel": {"cfg": executor.group.degrees.cfg, "sp": executor.group.degrees.sp,
                             "tower_shards": executor.group.tower.size},
                "memory_gib": self.cosmos3_memory.report(),
                "kv_cache_gib": round(self._cosmos3_kv_cache_bytes() / 2**30, 3),
                "kv_cache_tokens": self._cosmos3_kv_cache_tokens(),
                "towers": self._cosmos3_tower_precisions(executor.tower)}  # fmt: skip

    def _cosmos3_tower_precisions(self, generator: torch.nn.Module) -> dict[str, dict[str, Any]]:
        """Each tower's linear layers by precision, its weight memory, how a GPU without FP4 tensor cores runs
        NVFP4 layers, and the generator's attention precision."""
        towers = {"reasoner": describe_tower(self.model_runner.get_model()), "generator": describe_tower(generator)}
        towers["generator"]["attention"] = generator.attention_precision
        if any("nvfp4" in tower["linear_layers"] for tower in towers.values()):
            capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
            for tower in towers.values():
                tower["nvfp4_kernel"] = nvfp4_kernel(capability)
        return towers

    def cosmos3_submit(self, commands: dict[str, Any]) -> None:
        """Queue commands (`wire.Commands` as a payload) for the loop's next step boundary; returns at once."""
        self.cosmos3_loop.submit(Commands.from_payload(commands))

    def _cosmos3_kv_cache_tokens(self) -> int | None:
        cache = self.vllm_config.cache_config
        return None if cache.num_gpu_blocks is None else cache.num_gpu_blocks * cache.block_size

    def _cosmos3_kv_cache_bytes(self) -> int:
        caches = getattr(self.model_runner, "kv_caches", None) or []
        tensors = [t for cache in caches for t in (cache if isinstance(cache, (list, tuple)) else [cache])]
        return sum(t.numel() * t.element_size() for t in tensors)
