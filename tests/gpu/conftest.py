"""One vLLM engine on the GPU for all GPU tests (the K/V connector is process-global in vLLM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor import vllm_compat
from cosmos3_serve.model_executor.engine_args import generation_engine_args
from cosmos3_serve.server.deployment import generator_settings

PRUNING_RATE = 0.5


@pytest.fixture(scope="session")
def gpu_reasoner(tiny_checkpoint: Path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from vllm import LLM

    return LLM(
        str(tiny_checkpoint),
        dtype="bfloat16",
        max_model_len=4096,
        **generation_engine_args(generator_settings(gpu=True)),
        limit_mm_per_prompt={"image": 1, "video": 1},
        seed=0,
        **vllm_compat.video_pruning_kwargs(PRUNING_RATE, "evs"),
    )
