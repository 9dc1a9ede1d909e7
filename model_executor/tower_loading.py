"""The generator tower built and loaded as vLLM builds a model: its linear layers take the engine's quantization
config, its weights come from the checkpoint (or vLLM's dummy loader for configs-only checkpoints), and each
layer's quantization method processes them after loading (online FP8 quantizes here)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch

from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig
from cosmos3_serve.model_executor.generator import AllReduce, Cosmos3GeneratorTower, iter_transformer_weights
from cosmos3_serve.model_executor.parallel_degrees import TowerShard
from cosmos3_serve.model_executor.patches import keep_aten_cpu_gemm, linear_layers_sharded_as


def load_tower(checkpoint: str | Path, vllm_config, device: torch.device, all_reduce: AllReduce | None = None,
               weights: Iterable[tuple[str, torch.Tensor]] | None = None,
               shard: TowerShard | None = None) -> Cosmos3GeneratorTower:  # fmt: skip
    """The tower of `checkpoint` on `device` in the engine's dtype, with `weights` (diffusers' transformer names;
    None: the checkpoint's, or random ones under `--load-format dummy`); `shard`: this rank's tensor-parallel shard
    (None: sharded like the reasoner, over vLLM's tensor-parallel group)."""
    from vllm.config import CompilationConfig, CompilationMode, set_current_vllm_config
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    config = GeneratorConfig.from_checkpoint(checkpoint)
    # The tower is not compiled (eager, or a CUDA graph of eager kernels): build it with vLLM's fused kernels
    # (norms, SiLU), whatever the engine compiles.
    tower_config = copy.copy(vllm_config)
    tower_config.compilation_config = CompilationConfig(mode=CompilationMode.NONE, custom_ops=["all"])
    shard = shard or TowerShard(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(vllm_config.model_config.dtype)
    try:  # vLLM's layers read these settings and allocate in the default dtype
        with set_current_vllm_config(tower_config), torch.device(device), linear_layers_sharded_as(shard):
            tower = Cosmos3GeneratorTower(config, vllm_config.quant_config, all_reduce, shard)
    finally:
        torch.set_default_dtype(default_dtype)
    if weights is None and vllm_config.load_config.load_format == "dummy":
        from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

        DummyModelLoader(vllm_config.load_config).load_weights(tower, vllm_config.model_config)
    else:
        tower.load_weights(iter_transformer_weights(Path(checkpoint)) if weights is None else weights)
    keep_aten_cpu_gemm(tower)
    process_weights_after_loading(tower, vllm_config.model_config, torch.device(device))  # quantization
    return tower
