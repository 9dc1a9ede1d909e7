"""Pixels of image / video conditioning, prepared as the reference pipeline prepares them, for the VAE.

Image -> video: the image is resized to cover the target size (bilinear, antialiased), center-cropped, and
repeated over all frames; video -> video: diffusers' `VideoProcessor` resizes the frames, the first
`max(condition_frame_indexes) * 4 + 1` are kept and the last one repeats to the requested length. Action modes:
the clip (an image is a clip of one frame) is cut or repeated to its length and placed on its canvas
(`sampling.actions`): downscaled (bicubic, antialiased) and padded right and bottom (reflected, or replicated
where the padding is as wide as the content).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cosmos3_serve.sampling.actions import SPATIAL_COMPRESSION, content_size
TEMPORAL_COMPRESSION = 4


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """One RGB image -> `[1, 3, height, width]` in [-1, 1]: resize to cover, center crop, 8-bit rounding."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), copy=True)).permute(2, 0, 1)[None].float()
    scale = max(width / pixels.shape[-1], height / pixels.shape[-2])
    resized = (math.ceil(scale * pixels.shape[-2]), math.ceil(scale * pixels.shape[-1]))
    pixels = F.interpolate(pixels, size=resized, mode="bilinear", align_corners=False, antialias=True)
    top, left = round((resized[0] - height) / 2), round((resized[1] - width) / 2)
    pixels = pixels[:, :, top : top + height, left : left + width]
    return pixels.round().clamp(0, 255) / 127.5 - 1.0


def conditioning_clip(
    num_frames: int,
    height: int,
    width: int,
    image: Image.Image | None = None,
    video: list[Image.Image] | None = None,
    condition_frame_indexes: tuple[int, ...] = (0, 1),
    keep: str = "first",
) -> torch.Tensor:
    """`[1, 3, num_frames, height, width]` in [-1, 1] for the VAE; zeros where nothing conditions."""
    clip = torch.zeros(1, 3, num_frames, height, width)
    if video is not None:
        frames = _video_processor().preprocess_video(video, height, width)
        kept = max(condition_frame_indexes) * TEMPORAL_COMPRESSION + 1
        frames = frames[:, :, :kept] if keep == "first" else frames[:, :, -kept:]
        filled = min(frames.shape[2], num_frames)
        clip[:, :, :filled] = frames[:, :, :filled]
        clip[:, :, filled:] = clip[:, :, filled - 1 : filled]
    elif image is not None:
        clip[:, :, :] = image_to_tensor(image, height, width)[:, :, None]
    return clip


def condition_mask(latent_frames: int, image: bool, video: bool, condition_frame_indexes: tuple[int, ...]) -> torch.Tensor:
    """`[latent_frames]`: 1 for clean conditioning latent frames, 0 for frames to generate."""
    mask = torch.zeros(latent_frames)
    if video:
        mask[[i for i in condition_frame_indexes if 0 <= i < latent_frames]] = 1.0
    elif image and latent_frames > 1:
        mask[0] = 1.0
    return mask


def action_conditioning_clip(
    frames: list[Image.Image], num_frames: int, canvas_hw: tuple[int, int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`[1, 3, num_frames, H, W]` in [-1, 1] on the canvas `(H, W)`, and the (height, width) of its content."""
    clip = _video_processor().preprocess_video(frames)  # [1, 3, F, h, w], h and w multiples of 16
    if clip.shape[2] < num_frames:
        clip = torch.cat([clip, clip[:, :, -1:].expand(-1, -1, num_frames - clip.shape[2], -1, -1)], dim=2)
    clip = clip[:, :, :num_frames]
    frame_hw = tuple(clip.shape[-2:])
    content_hw = content_size(frame_hw, canvas_hw)
    frames_tchw = clip[0].transpose(0, 1)
    if content_hw != frame_hw:
        frames_tchw = F.interpolate(frames_tchw, size=content_hw, mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = canvas_hw[0] - content_hw[0], canvas_hw[1] - content_hw[1]
    if pad_h or pad_w:
        mode = "replicate" if pad_h >= content_hw[0] or pad_w >= content_hw[1] else "reflect"
        frames_tchw = F.pad(frames_tchw, (0, pad_w, 0, pad_h), mode=mode)
    return frames_tchw.transpose(0, 1)[None], content_hw


def _video_processor():
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=SPATIAL_COMPRESSION, resample="bilinear")
