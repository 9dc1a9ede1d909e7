"""The VAE at the generator's two ends: conditioning clips in (encoded to clean latent frames), videos out (latents
decoded to uint8 frames), batched by shape.

The VAE is diffusers' `AutoencoderKLWan` (Wan 2.2: 16x spatial, 4x temporal compression, causal in time), its
latents normalised by the checkpoint's per-channel mean and std as the reference pipeline normalises them. The
decoder's forward is ours (`VaeDecoder`: fused passes, CUDA graphs for short clips).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from torch.profiler import record_function

from cosmos3_serve.model_executor.profile_ranges import PROFILE_RANGES
from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.model_executor.vae_decoder import MAX_CHUNK_LATENT_VOXELS
from cosmos3_serve.model_executor.vae_graphs import VaeDecoder
from cosmos3_serve.sampling.actions import INVERSE_DYNAMICS
from cosmos3_serve.sampling.conditioning import action_conditioning_clip, condition_mask, conditioning_clip

PIXEL_SLICE_FRAMES = 16  # frames of a decoded video turned into pixels at a time


def latent_shape(vae_config, request: GenerationRequest) -> tuple[int, int, int, int, int]:
    """`[1, z_dim, T', H', W']` of a text / image / video -> image / video request's latents."""
    latent_t = (request.num_frames - 1) // vae_config.scale_factor_temporal + 1
    return (1, vae_config.z_dim, latent_t, request.height // vae_config.scale_factor_spatial,
            request.width // vae_config.scale_factor_spatial)  # fmt: skip


@dataclass
class ConditioningClip:
    """Pixels the VAE encodes for a request's clean latent frames.

    The VAE is causal in time (its first latent frame sees the first pixel frame, each later one four more), so
    clean frames that lead the clip need only the pixel frames up to the last of them: an image-conditioned video
    or a policy request encodes one frame, not the whole clip; the rest of the latents are noise anyway."""

    pixels: torch.Tensor  # [1, 3, T, H, W] in [-1, 1], T = 1 + temporal * (clean latent frames - 1)
    latent_frames: int  # latent frames of the whole clip
    content_hw: tuple[int, int]  # latent (height, width) to keep: an action canvas' content, without its padding

    def latents(self, encoded: torch.Tensor) -> torch.Tensor:
        """`[1, C, latent_frames, h, w]` of the encoded prefix: the content kept, zeros after the encoded frames."""
        content = encoded[:, :, :, : self.content_hw[0], : self.content_hw[1]]
        return F.pad(content, (0, 0, 0, 0, 0, self.latent_frames - content.shape[2]))

    @classmethod
    def of(cls, vae_config, request: GenerationRequest) -> ConditioningClip | None:
        """What the VAE encodes for the request's clean latent frames; None when it has none (the reference encodes
        zeros there and uses none of it)."""
        temporal, spatial = vae_config.scale_factor_temporal, vae_config.scale_factor_spatial
        if request.action_mode is None:
            shape = latent_shape(vae_config, request)
            mask = condition_mask(shape[2], request.image is not None, request.video is not None,
                                  request.condition_frame_indexes)  # fmt: skip
            if not mask.any():
                return None
            pixel_frames = 1 + temporal * int(mask.nonzero().max())  # up to the last clean latent frame
            pixels = conditioning_clip(pixel_frames, request.height, request.width, request.image, request.video,
                                       request.condition_frame_indexes)  # fmt: skip
            return cls(pixels, shape[2], shape[3:])
        latent_frames = request.action_chunk_size // temporal + 1  # of the clip's action_chunk_size + 1 frames
        clean_frames = latent_frames if request.action_mode == INVERSE_DYNAMICS else 1  # every frame / the first
        pixel_frames = 1 + temporal * (clean_frames - 1)
        pixels, (content_h, content_w) = action_conditioning_clip(request.action_frames, pixel_frames,
                                                                  request.action_canvas)  # fmt: skip
        return cls(pixels, latent_frames, (max(content_h // spatial, 1), max(content_w // spatial, 1)))


class VaeCodec:
    """Encodes conditioning clips and decodes finished videos on one device, clips / latents of one shape in one
    batch."""

    def __init__(self, vae: AutoencoderKLWan, device: torch.device, use_graphs: bool) -> None:
        self.vae, self.device = vae, device
        self.decoder = VaeDecoder(vae, use_graphs=use_graphs)
        self._normalization: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def config(self):
        return self.vae.config

    def encode_by_shape(self, clips: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalised latents `[1, C, T', H', W']` of `[1, 3, T, H, W]` clips in [-1, 1] (the VAE's distribution
        mode); clips of one shape share one encoder call, its batch padded to a power of two (`_padded_batch`)."""
        mean, inv_std = self._latent_normalization()
        latents = {}
        for ids, batch in _batches_by_shape(clips):
            with record_function(PROFILE_RANGES["encode"]):
                padded = _padded_batch(batch.to(self.device, self.vae.dtype, non_blocking=True))
                raw = self.vae.encode(padded).latent_dist.mode()[: len(ids)]
            latents.update(zip(ids, ((raw - mean) * inv_std).float().split(1)))
        return latents

    def decode_by_shape(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """uint8 frames `[T, H, W, 3]` of normalised latents `[1, C, T', H', W']`; latents of one shape share one
        decoder call, as many as fit the decoder's chunk (`decode_batch_limit`: the activations of a batch stay
        those of one chunk)."""
        mean, inv_std = self._latent_normalization()
        frames = {}
        for ids, batch in _batches_by_shape(latents, decode_batch_limit):
            with record_function(PROFILE_RANGES["decode"]):
                video = self.decoder(batch.to(self.vae.dtype) / inv_std + mean)  # [B, 3, T, H, W] in [-1, 1]
                pixels = to_pixels(video)
            frames.update(zip(ids, pixels.permute(0, 2, 3, 4, 1).unbind(0)))
        return frames

    def _latent_normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std) of the VAE's latent channels, `[1, C, 1, 1, 1]` in the VAE's dtype, computed as the
        reference pipeline computes them for its VAE; once per dtype (a copy to the device waits for queued work)."""
        dtype = self.vae.dtype
        if dtype not in self._normalization:
            config = self.vae.config
            mean = torch.tensor(config.latents_mean, dtype=dtype, device=self.device).view(1, -1, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(config.latents_std, dtype=dtype, device=self.device).view(1, -1, 1, 1, 1)
            self._normalization[dtype] = (mean, inv_std)
        return self._normalization[dtype]


def to_pixels(video: torch.Tensor, frames_per_slice: int = PIXEL_SLICE_FRAMES) -> torch.Tensor:
    """uint8 `[B, 3, T, H, W]` of a video in [-1, 1]: `round((x + 1) * 127.5)` in float32, a slice of frames at a
    time (a float32 copy of a whole 720p, 189-frame video is 2 GiB)."""
    pixels = torch.empty(video.shape, dtype=torch.uint8, device=video.device)
    for start in range(0, video.shape[2], frames_per_slice):
        part = video[:, :, start : start + frames_per_slice]
        pixels[:, :, start : start + frames_per_slice] = part.to(torch.float32, copy=True).add_(1).mul_(127.5).round_()
    return pixels


def decode_batch_limit(shape: tuple[int, ...]) -> int:
    """Latents of `shape` `[1, C, T', H', W']` decoded in one batch: as many as one chunk of the decoder holds."""
    return max(1, MAX_CHUNK_LATENT_VOXELS // (shape[-2] * shape[-1]))


def _batches_by_shape(
    tensors: dict[str, torch.Tensor], limit: Callable[[tuple[int, ...]], int] | None = None
) -> list[tuple[list[str], torch.Tensor]]:
    """`[1, ...]` tensors grouped by shape, at most `limit(shape)` per group (all if None): (their keys, the group
    concatenated on dim 0)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, tensor in tensors.items():
        groups.setdefault(tuple(tensor.shape), []).append(key)
    batches = []
    for shape, keys in groups.items():
        size = len(keys) if limit is None else limit(shape)
        batches += [(keys[i : i + size], torch.cat([tensors[key] for key in keys[i : i + size]]))
                    for i in range(0, len(keys), size)]  # fmt: skip
    return batches


def _padded_batch(batch: torch.Tensor) -> torch.Tensor:
    """`batch` with its last item repeated up to a power of two. cuDNN plans each convolution anew for every input
    shape it has not seen (about 0.1 s of host for the VAE encoder, while the GPU waits); a burst of requests would
    otherwise bring a new batch size nearly every time, and the powers of two are few."""
    missing = (1 << (batch.shape[0] - 1).bit_length()) - batch.shape[0]
    return torch.cat([batch, batch[-1:].expand(missing, *batch.shape[1:])]) if missing else batch
