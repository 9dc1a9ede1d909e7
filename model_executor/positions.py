"""Where a request's generator tokens sit: their mRoPE positions after its prompt, and the patching of latents
into tokens, as diffusers' `Cosmos3OmniPipeline` computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig


def vision_positions(
    config: GeneratorConfig, grid_thw: tuple[int, int, int], und_len: int, fps: float, temporal_compression: int
) -> torch.Tensor:
    """mRoPE positions `[3, T*H*W]` of the latent patches that follow a prompt of `und_len` tokens."""
    offset = und_len + config.unified_3d_mrope_temporal_modality_margin
    times = step_times(config, grid_thw[0], offset, fps, temporal_compression, temporal_compression)
    return _grid_positions(config, times, grid_thw[1], grid_thw[2], offset)


def action_positions(
    config: GeneratorConfig, chunk_size: int, und_len: int, fps: float, temporal_compression: int
) -> torch.Tensor:
    """mRoPE positions `[3, chunk_size]` of an action chunk after a prompt of `und_len` tokens: one source frame per
    action, action k at the time of the frame it leads to (k + 1), on the latent frames' time scale."""
    offset = und_len + config.unified_3d_mrope_temporal_modality_margin
    times = step_times(config, chunk_size, offset, fps, 1, temporal_compression, first=1)
    return _grid_positions(config, times, 1, 1, offset)


def step_times(
    config: GeneratorConfig, steps: int, offset: int, fps: float, frames_per_step: int, base_frames_per_step: int,
    first: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Temporal positions `[steps]` of steps spanning `frames_per_step` source frames each, from step `first`.

    With fps modulation (and more than one step) time is measured in steps of `base_frames_per_step` frames at
    the base frame rate, else it counts steps."""
    indexes = torch.arange(steps, dtype=torch.float32) + first
    if config.enable_fps_modulation and steps > 1:
        return indexes / (fps / frames_per_step) * (config.base_fps / base_frames_per_step) + offset
    return indexes + int(offset)


def _grid_positions(config: GeneratorConfig, times_t: torch.Tensor, grid_h: int, grid_w: int, offset: int) -> torch.Tensor:
    """`[3, T*H*W]` positions of a T x H x W token grid at temporal positions `times_t`."""
    grid_t = times_t.shape[0]
    h = torch.arange(grid_h, dtype=torch.float32)
    w = torch.arange(grid_w, dtype=torch.float32)
    if not config.unified_3d_mrope_reset_spatial_ids:
        h, w = h + int(offset), w + int(offset)
    return torch.stack(
        [
            times_t.view(-1, 1, 1).expand(grid_t, grid_h, grid_w).flatten(),
            h.view(1, -1, 1).expand(grid_t, grid_h, grid_w).flatten(),
            w.view(1, 1, -1).expand(grid_t, grid_h, grid_w).flatten(),
        ]
    )


def patchify(latents_cthw: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, T, H, W] -> [T * ceil(H/p) * ceil(W/p), p * p * C]; H and W are zero-padded to multiples of p."""
    c, t, h, w = latents_cthw.shape
    x = F.pad(latents_cthw, (0, -w % patch, 0, -h % patch))
    x = x.reshape(c, t, x.shape[2] // patch, patch, x.shape[3] // patch, patch)
    return torch.einsum("cthpwq->thwpqc", x).reshape(-1, patch * patch * c)


def unpatchify(tokens: torch.Tensor, shape_cthw: tuple[int, int, int, int], patch: int) -> torch.Tensor:
    """Inverse of `patchify`, cropping the padding."""
    c, t, h, w = shape_cthw
    hp, wp = -(-h // patch), -(-w // patch)
    x = tokens.reshape(t, hp, wp, patch, patch, c)
    return torch.einsum("thwpqc->cthpwq", x).reshape(c, t, hp * patch, wp * patch)[:, :, :h, :w]
