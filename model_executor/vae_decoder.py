"""The Wan VAE decoder's forward with fewer passes over its activations, on diffusers' modules and weights.

Diffusers' `AutoencoderKLWan.decode` runs the causal decoder one latent frame at a time. Every causal 3-D convolution
concatenates the two frames cached from the previous chunk with its input, zero-pads that in space, clones the
input's last frames as the next chunk's cache, and adds its bias in a pass of its own; between convolutions,
RMSNorm + SiLU, residual adds and an up block's shortcut (a channel repeat and a permuted copy) each take more.
`prepare_decoder` switches the decoder's modules to classes here, which compute the same sums with fewer passes:

- `ImplicitPaddingCausalConv3d`: the spatial zero padding is the convolution's own.
- `BufferedResidualBlock`: RMSNorm + SiLU writes straight into the next convolution's input buffer, after the two
  frames of history (the previous chunk's last, or zeros), and the next chunk's history is a copy of that buffer's
  last two frames (a view where the chunk has no more frames than that): no concatenation or pad. The convolutions run without bias; conv1's is added inside
  conv2's RMSNorm, conv2's and the shortcut's inside the residual add (`vae_kernels.py`).
- `FusedResidualUpBlock`: the shortcut is added by one kernel that reads the block's input where `DupUp3D` would
  have copied it twice.
- `NativeDtypeUpsample`: nearest-neighbour upsampling in the activations' dtype (diffusers goes through float32
  and back; copying values, both give the same result).
- `BufferedDecoder3d`: the head (RMSNorm + SiLU, then the output convolution) and the input convolution buffered
  the same way.

`decode` runs the first latent frame alone (diffusers' first chunk: its frame is not upsampled in time), then the
rest in chunks of several latent frames (`MAX_CHUNK_LATENT_VOXELS`): a causal convolution over a chunk with two
frames of history computes what frame-by-frame chunks compute, in bigger convolutions and fewer launches.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanCausalConv3d,
    WanDecoder3d,
    WanResidualBlock,
    WanResidualUpBlock,
    WanRMS_norm,
    WanUpsample,
    unpatchify,
)
from torch import nn

from cosmos3_serve.model_executor import patches
from cosmos3_serve.model_executor.vae_kernels import add_bias_and_residual, add_dup_up, rms_norm_silu

# Latent voxels (batch x frames x height x width) per chunk after the first frame: a policy clip batch of 8 (8 x 4
# x 11 x 20) in one chunk; 720p latent frames (45 x 80) two at a time. At the decoder's last level the first
# residual block's input holds 4 frames x 8 x 8 positions x 512 channels per latent voxel: 4 GiB in float32 at this
# budget, and its convolution's time-padded buffer 5 GiB more (diffusers' one frame at a time: a quarter of that).
MAX_CHUNK_LATENT_VOXELS = 1 << 13

# Diffusers' feat_cache, indexed as a list: per causal convolution (by its place in the decoder's order), its last
# input frames, or None before the first chunk ("Rep" for a temporal upsampler's first).
History = defaultdict[int, torch.Tensor | str | None]


class ImplicitPaddingCausalConv3d(WanCausalConv3d):
    """Diffusers' causal 3-D convolution (zero padding: width and height on both sides, time before the input, where
    the cached frames of the previous chunk go first), with the spatial zero padding left to the convolution: the
    same sums without a padded copy of every input. `_padding` is diffusers' (W, W, H, H, T before, T after)."""

    @property
    def history_frames(self) -> int:
        """The frames of history (cached or zero) that go before a chunk."""
        return self._padding[4]

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        pad_t = self.history_frames
        if cache_x is not None and pad_t > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            pad_t -= cache_x.shape[2]
        if pad_t > 0:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        return self.over_history(x, with_bias=True)

    def over_history(self, x: torch.Tensor, with_bias: bool = False) -> torch.Tensor:
        """The convolution of an input whose first `history_frames` frames are its history (no time padding left),
        without its bias unless `with_bias` (the caller's fused pass adds it)."""
        pad_w, _, pad_h = self._padding[:3]
        bias = self.bias if with_bias else None
        return F.conv3d(x, self.weight, bias, self.stride, (0, pad_h, pad_w), self.dilation, self.groups)


def _history_buffer(x: torch.Tensor, conv: ImplicitPaddingCausalConv3d, history: History, idx: int) -> torch.Tensor:
    """An empty input buffer `[B, C, history + T, H, W]` for `conv` over chunk `x`, in the layout of conv's weight
    (channels innermost or not), its history frames filled from `history[idx]` (zeros before the first chunk). The
    caller fills the rest and convolves it with `_convolve_keeping_history`."""
    batch, channels, frames, height, width = x.shape
    before = conv.history_frames
    layout = torch.channels_last_3d if conv.weight.stride(1) == 1 else torch.contiguous_format
    buffer = torch.empty((batch, channels, before + frames, height, width), dtype=x.dtype, device=x.device,
                         memory_format=layout)  # fmt: skip
    if history[idx] is None:
        buffer[:, :, :before].zero_()
    else:
        buffer[:, :, :before].copy_(history[idx])
    return buffer


def _convolve_keeping_history(conv: ImplicitPaddingCausalConv3d, buffer: torch.Tensor, history: History, idx: int,
                              with_bias: bool = False) -> torch.Tensor:  # fmt: skip
    """`conv` over a filled `_history_buffer`; its last frames become `history[idx]`, the next chunk's history. A view
    of them would keep the whole buffer alive until the next chunk: with several frames per chunk that is most of
    the decoder's memory (every causal convolution's input at once), so they are copied unless the buffer holds no
    more than them."""
    frames = buffer.shape[2] - conv.history_frames
    tail = buffer[:, :, frames:]
    history[idx] = tail.clone() if frames > conv.history_frames else tail
    return conv.over_history(buffer, with_bias)


class BufferedResidualBlock(WanResidualBlock):
    """`WanResidualBlock` whose causal convolutions read time-padded buffers that RMSNorm + SiLU write into, with
    their biases added inside the next fused pass."""

    def forward(self, x: torch.Tensor, feat_cache: History, feat_idx: list[int]) -> torch.Tensor:
        shortcut = self.conv_shortcut
        residual = x if isinstance(shortcut, nn.Identity) else shortcut.over_history(x)  # 1 x 1 x 1: no history
        hidden = self._norm_silu_conv(x, self.norm1, None, self.conv1, feat_cache, feat_idx)
        hidden = self._norm_silu_conv(hidden, self.norm2, self.conv1.bias, self.conv2, feat_cache, feat_idx)
        residual_bias = None if isinstance(shortcut, nn.Identity) else shortcut.bias
        return add_bias_and_residual(hidden, self.conv2.bias, residual, residual_bias)

    @staticmethod
    def _norm_silu_conv(x: torch.Tensor, norm: WanRMS_norm, in_bias: torch.Tensor | None,
                        conv: ImplicitPaddingCausalConv3d, feat_cache: History, feat_idx: list[int]) -> torch.Tensor:
        """conv(silu(norm(x + in_bias))) without conv's bias, over the cached history."""
        buffer = _history_buffer(x, conv, feat_cache, feat_idx[0])
        rms_norm_silu(x, norm, buffer[:, :, conv.history_frames :], in_bias)
        feat_idx[0] += 1
        return _convolve_keeping_history(conv, buffer, feat_cache, feat_idx[0] - 1)


class FusedResidualUpBlock(WanResidualUpBlock):
    """`WanResidualUpBlock` with its `DupUp3D` shortcut added by one kernel, from the block's input."""

    def forward(
        self, x: torch.Tensor, feat_cache: History, feat_idx: list[int], first_chunk: bool = False
    ) -> torch.Tensor:
        block_input = x
        for resnet in self.resnets:
            x = resnet(x, feat_cache=feat_cache, feat_idx=feat_idx)
        if self.upsampler is not None:
            x = self.upsampler(x, feat_cache=feat_cache, feat_idx=feat_idx)
        if self.avg_shortcut is not None:
            x = add_dup_up(x, block_input, self.avg_shortcut, first_chunk)
        return x


class NativeDtypeUpsample(WanUpsample):
    """Nearest-neighbour upsampling in the input's dtype: values are copied, so float32 gives nothing more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Upsample.forward(self, x)


class BufferedDecoder3d(WanDecoder3d):
    """`WanDecoder3d` with its input convolution and its head (RMSNorm + SiLU, output convolution) buffered as the
    residual blocks are."""

    def forward(
        self, x: torch.Tensor, feat_cache: History, feat_idx: list[int], first_chunk: bool = False
    ) -> torch.Tensor:
        buffer = _history_buffer(x, self.conv_in, feat_cache, feat_idx[0])
        buffer[:, :, self.conv_in.history_frames :].copy_(x)
        x = _convolve_keeping_history(self.conv_in, buffer, feat_cache, feat_idx[0], with_bias=True)
        feat_idx[0] += 1
        x = self.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
        for up_block in self.up_blocks:
            x = up_block(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
        buffer = _history_buffer(x, self.conv_out, feat_cache, feat_idx[0])
        rms_norm_silu(x, self.norm_out, buffer[:, :, self.conv_out.history_frames :])
        feat_idx[0] += 1
        return _convolve_keeping_history(self.conv_out, buffer, feat_cache, feat_idx[0] - 1, with_bias=True)


SWAPS = {WanCausalConv3d: ImplicitPaddingCausalConv3d, WanResidualBlock: BufferedResidualBlock,
         WanResidualUpBlock: FusedResidualUpBlock, WanUpsample: NativeDtypeUpsample,
         WanDecoder3d: BufferedDecoder3d}  # fmt: skip


def prepare_decoder(vae: AutoencoderKLWan, memory_format: torch.memory_format) -> None:
    """Switches the decoder's modules to the classes above (weights unchanged; a prepared decoder stays as it is) and
    its convolution weights to `memory_format`. The encoder keeps diffusers' modules."""
    if not vae.config.is_residual:
        raise ValueError("the fused decode takes the Wan 2.2 VAE's residual up blocks (is_residual)")
    for module in vae.decoder.modules():
        if type(module) in SWAPS:
            patches.swap_module_class(module, SWAPS[type(module)])
        if isinstance(module, (nn.Conv3d, nn.Conv2d)):
            layout = memory_format
            if module.weight.dim() == 4 and memory_format == torch.channels_last_3d:
                layout = torch.channels_last
            module.weight.data = module.weight.data.contiguous(memory_format=layout)


def decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Video `[B, 3, T, H, W]` in [-1, 1] of latents `[B, C, T', H', W']` in the VAE's dtype (diffusers'
    `vae.decode(latents).sample`), by a decoder `prepare_decoder` switched."""
    batch, _, latent_frames, height, width = latents.shape
    x = vae.post_quant_conv(latents)
    frames_per_chunk = max(1, MAX_CHUNK_LATENT_VOXELS // (batch * height * width))
    chunks = [x[:, :, :1], *x[:, :, 1:].split(frames_per_chunk, dim=2)] if latent_frames > 1 else [x]
    history: History = defaultdict(lambda: None)
    # Each chunk's frames go straight into the video (no list of chunk outputs to concatenate, no unpatchified or
    # clamped copy of the whole video: at 720p and 189 frames each would be 2 GiB in float32).
    video, done = None, 0
    for i, chunk in enumerate(chunks):
        part = vae.decoder(chunk, feat_cache=history, feat_idx=[0], first_chunk=i == 0)
        if vae.config.patch_size is not None:
            part = unpatchify(part, patch_size=vae.config.patch_size)  # frame by frame: per chunk as whole
        if video is None:
            frames = 1 + (latent_frames - 1) * vae.config.scale_factor_temporal
            video = part.new_empty(*part.shape[:2], frames, *part.shape[3:])
        video[:, :, done : done + part.shape[2]] = part.clamp_(-1.0, 1.0)
        done += part.shape[2]
    if done != video.shape[2]:
        raise RuntimeError(f"the decoder made {done} frames of {latent_frames} latent frames, not {video.shape[2]}")
    return video
