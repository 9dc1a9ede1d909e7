"""The tiny checkpoint loads unchanged in the reference implementations (the oracles of later tests)."""

from __future__ import annotations

import numpy as np
import torch


def _generate(pipe, num_frames: int, seed: int = 0):
    return pipe(
        "A robot arm picks up a red cube.",
        num_frames=num_frames,
        height=64,
        width=96,
        num_inference_steps=3,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).video


def test_diffusers_pipeline_runs_text_to_image(diffusers_pipeline) -> None:
    frames = _generate(diffusers_pipeline, num_frames=1)
    assert frames.shape == (1, 64, 96, 3)
    assert np.isfinite(frames).all() and frames.std() > 0
    np.testing.assert_array_equal(frames, _generate(diffusers_pipeline, num_frames=1))  # same seed, same image
    assert not np.array_equal(frames, _generate(diffusers_pipeline, num_frames=1, seed=1))


def test_diffusers_pipeline_runs_text_to_video(diffusers_pipeline) -> None:
    frames = _generate(diffusers_pipeline, num_frames=9)  # 4k+1 frames -> 3 latent frames
    assert frames.shape == (9, 64, 96, 3)
    assert np.isfinite(frames).all() and frames.std() > 0


def test_transformers_reasoner_loads_every_reasoner_weight(transformers_reasoner, tiny_checkpoint) -> None:
    from safetensors import safe_open

    state = transformers_reasoner.model.state_dict()
    with safe_open(tiny_checkpoint / "transformer/diffusion_pytorch_model.safetensors", "pt") as f:
        torch.testing.assert_close(state["model.language_model.layers.1.self_attn.k_proj.weight"],
                                   f.get_tensor("layers.1.self_attn.to_k.weight"), rtol=0, atol=0)
        torch.testing.assert_close(state["lm_head.weight"], f.get_tensor("lm_head.weight"), rtol=0, atol=0)
    with safe_open(tiny_checkpoint / "vision_encoder/model.safetensors", "pt") as f:
        torch.testing.assert_close(state["model.visual.merger.linear_fc2.weight"],
                                   f.get_tensor("merger.linear_fc2.weight"), rtol=0, atol=0)
