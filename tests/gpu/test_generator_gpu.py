"""The generator on a Hopper GPU: bf16 tower with FlashAttention 3 varlen over the exported prompt K/V, against
diffusers' pipeline in bf16 on the same GPU (same seed, so the same bf16 initial noise); a mixed batch equals its
requests alone up to bf16 rounding (different GEMM shapes round differently)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor.generation import GenerationRequest
from cosmos3_serve.model_executor.generation_client import Cosmos3Generator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LATENT_REL_TOL = 5e-2  # ||ours - diffusers|| / ||diffusers||, both bf16, after 4 steps of a random model
PROMPT, NEGATIVE = "A robot arm picks up a red cube.", "blurry"


@pytest.fixture(scope="module")
def gpu_generator(tiny_checkpoint: Path, gpu_reasoner) -> Cosmos3Generator:
    return Cosmos3Generator(tiny_checkpoint, gpu_reasoner)


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


@pytest.mark.parametrize("num_frames", [1, 9])
def test_bf16_latents_follow_the_bf16_reference(gpu_generator, tiny_checkpoint: Path, num_frames: int) -> None:
    from tests.oracle import load_diffusers_pipeline

    pipe = load_diffusers_pipeline(tiny_checkpoint, dtype=torch.bfloat16).to("cuda")
    common = dict(negative_prompt=NEGATIVE, num_frames=num_frames, height=64, width=96, fps=16.0,
                  num_inference_steps=4, guidance_scale=6.0)  # fmt: skip
    ours = gpu_generator.generate_latents(GenerationRequest(PROMPT, seed=2, **common))
    reference = pipe(PROMPT, **common, generator=torch.Generator().manual_seed(2), output_type="latent").video
    assert _relative_error(ours, reference.cpu()) <= LATENT_REL_TOL  # results come back from the worker on the CPU


def test_mixed_batch_on_gpu(gpu_generator) -> None:
    requests = {
        "a": GenerationRequest(PROMPT, NEGATIVE, num_frames=1, height=64, width=96, num_inference_steps=3, seed=1),
        "b": GenerationRequest("A dog runs.", None, num_frames=9, height=32, width=64, num_inference_steps=4, seed=2),
    }
    together = gpu_generator.generate(requests)
    for request_id, request in requests.items():
        assert _relative_error(together[request_id].video, gpu_generator.generate_latents(request)) <= LATENT_REL_TOL
