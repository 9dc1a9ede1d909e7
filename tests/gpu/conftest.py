"""One vLLM engine on the GPU for all GPU tests (the K/V connector is process-global in vLLM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor import vllm_compat
from cosmos3_serve.model_executor.worker_extension import generation_engine_args

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
        gpu_memory_utilization=0.3,
        **generation_engine_args(),
        limit_mm_per_prompt={"image": 1, "video": 1},
        seed=0,
        **vllm_compat.video_pruning_kwargs(PRUNING_RATE, "evs"),
    )
