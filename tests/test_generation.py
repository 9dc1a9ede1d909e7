"""The generator sidecar on the reasoner's exported K/V: text -> image and text -> video latents equal diffusers'
`Cosmos3OmniPipeline` for the same seed (float32, CFG on and off), and the reasoner runs once per request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor.generation import Cosmos3Generator, GenerationRequest
from cosmos3_serve.sampling.prompts import PromptSpec, cfg_token_ids

LATENT_ATOL = 1e-4
PROMPT, NEGATIVE = "A robot arm picks up a red cube.", "blurry, low quality"


@pytest.fixture(scope="module")
def generator(tiny_checkpoint: Path, vllm_reasoner) -> Cosmos3Generator:
    return Cosmos3Generator(tiny_checkpoint, vllm_reasoner, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("num_frames, negative", [(1, None), (1, NEGATIVE), (17, NEGATIVE)])
def test_prompt_token_ids_equal_the_reference(generator, diffusers_pipeline, num_frames: int, negative) -> None:
    spec = PromptSpec(num_frames=num_frames, height=64, width=96, fps=16.0)
    ours = cfg_token_ids(generator.tokenizer, PROMPT, negative, spec)
    theirs = diffusers_pipeline.tokenize_prompt(PROMPT, negative, num_frames=num_frames, height=64, width=96, fps=16.0)
    assert ours == tuple(theirs)


@pytest.mark.parametrize(
    "num_frames, guidance_scale", [(1, 6.0), (1, 1.0), (9, 6.0)], ids=["t2i-cfg", "t2i-no-cfg", "t2v-cfg"]
)
def test_latents_equal_the_reference(generator, diffusers_pipeline, num_frames: int, guidance_scale: float) -> None:
    request = GenerationRequest(PROMPT, NEGATIVE, num_frames=num_frames, height=64, width=96, fps=16.0,
                                num_inference_steps=4, guidance_scale=guidance_scale, seed=7)  # fmt: skip
    ours = generator.generate_latents(request)
    reference = diffusers_pipeline(
        PROMPT, negative_prompt=NEGATIVE, num_frames=num_frames, height=64, width=96, fps=16.0,
        num_inference_steps=4, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).video  # fmt: skip
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= LATENT_ATOL
    assert reference.abs().mean() > 0.1  # a real signal, not zeros


def test_reasoner_runs_once_per_request_whatever_the_step_count(generator, vllm_reasoner) -> None:
    calls = {"n": 0}

    def count_forwards(worker):
        model = worker.model_runner.get_model()
        return model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    [handle] = vllm_reasoner.collective_rpc(count_forwards)  # in-process engine: the hook sees this `calls`
    try:
        counts = []
        for steps in (2, 6):
            before = calls["n"]
            generator.generate_latents(GenerationRequest(PROMPT, NEGATIVE, num_frames=1, height=32, width=32,
                                                         num_inference_steps=steps, seed=steps))  # fmt: skip
            counts.append(calls["n"] - before)
    finally:
        handle.remove()
    assert counts == [1, 1]  # one prefill of both CFG prompts, none while denoising


def test_decoded_frames_equal_the_reference(generator, diffusers_pipeline) -> None:
    request = GenerationRequest(PROMPT, NEGATIVE, num_frames=5, height=32, width=64, fps=16.0,
                                num_inference_steps=3, guidance_scale=6.0, seed=3)  # fmt: skip
    frames = generator.decode(generator.generate_latents(request))
    reference = diffusers_pipeline(
        PROMPT, negative_prompt=NEGATIVE, num_frames=5, height=32, width=64, fps=16.0, num_inference_steps=3,
        guidance_scale=6.0, generator=torch.Generator().manual_seed(3), output_type="np",
    ).video  # fmt: skip  [T, H, W, 3] in [0, 1]
    assert frames.shape == (5, 32, 64, 3) and frames.dtype == torch.uint8
    difference = (frames.float() - torch.from_numpy(reference) * 255).abs()
    assert difference.max() <= 1.0  # rounding to 8 bits
