"""Fused elementwise kernels of the VAE decoder, for channels-last-3d activations.

In a profile of diffusers' bf16 decode of 8 policy clips (`bench/vae_decode.py --profile`, docs/benchmarks.md) the
convolutions took 49 % of the GPU time and the passes between them most of the rest: copies (the causal
convolutions' concatenations of cached frames, their clones and pads, the shortcut's channel repeat and
permutation) 26 %, RMSNorm + SiLU (eight passes) 15 %, the convolutions' bias adds and the residual adds 9 %. Each
function here is one read and one write of the activations, rounding to their dtype after each step as those passes
do: in float32 they equal diffusers up to float32 rounding, in bf16 up to a rounding flipped here and there by
another summation order.

- `rms_norm_silu`: silu(RMSNorm(x + bias)) written into a caller's tensor (the time-padded input buffer of the next
  causal convolution, `vae_decoder.py`), where diffusers adds the bias, normalises, activates and concatenates.
- `add_bias_and_residual`: a residual block's output, conv2 + bias + (shortcut conv + its bias, or the input).
- `add_dup_up`: an up block's output plus its parameter-free shortcut (`DupUp3D`: a channel repeat, then a
  depth-to-space into time, height and width) read straight from the block's input.

Triton runs them on CUDA, and on the CPU under Triton's interpreter (the tests); elsewhere the same sums run as
PyTorch ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import DupUp3D, WanRMS_norm
from vllm.triton_utils import tl, triton

NORMALIZE_EPS = 1e-12  # F.normalize's
BLOCK_ELEMENTS = 4096  # values per program of the row kernels


def kernels_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on `device`: CUDA, or the CPU under Triton's interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _uses_kernels(*tensors: torch.Tensor, any_item_stride: bool = False) -> bool:
    """Whether the kernels take these `[B, C, T, H, W]` tensors: on a device where they run, channels-last-3d (with
    `any_item_stride`, each batch item rows of C contiguous values at any batch stride, as a slice of a time-padded
    buffer is)."""
    def laid_out(t: torch.Tensor) -> bool:
        if any_item_stride:
            return t.shape[0] > 0 and t.permute(0, 2, 3, 4, 1)[0].is_contiguous()
        return t.is_contiguous(memory_format=torch.channels_last_3d)

    return all(kernels_run_on(t.device) and t.dim() == 5 and laid_out(t) for t in tensors)


@dataclass(frozen=True)
class RowBlocks:
    """How a row kernel covers `[B, C, T, H, W]` activations: rows of C values (one per voxel), BLOCK_R rows of
    BLOCK_C (C padded to a power of two) per program, about BLOCK_ELEMENTS values each."""

    num_rows: int
    block_r: int
    block_c: int

    @classmethod
    def of(cls, x: torch.Tensor) -> RowBlocks:
        block_c = triton.next_power_of_2(x.shape[1])
        return cls(x.numel() // x.shape[1], max(1, BLOCK_ELEMENTS // block_c), block_c)

    @property
    def grid(self) -> tuple[int]:
        return (triton.cdiv(self.num_rows, self.block_r),)


@triton.jit
def _rms_norm_silu_kernel(
    x_ptr, out_ptr, gamma_ptr, norm_bias_ptr, in_bias_ptr, num_rows, rows_per_item, x_item_stride, out_item_stride,
    channels, scale, eps, HAS_NORM_BIAS: tl.constexpr, HAS_IN_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows of `channels` contiguous values (voxels of channels-last activations; the batch items at their
    own strides): silu(gain * scale * y / max(|y|, eps) + bias) of y = x + in_bias, rounded after each step."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < num_rows) & (cols < channels)
    item, row = rows // rows_per_item, rows % rows_per_item
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + item * x_item_stride + row * channels + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_IN_BIAS:  # a convolution's bias, added to its output as PyTorch does: rounded
        x = (x + tl.load(in_bias_ptr + cols, mask=cols < channels, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1))[:, None], eps)  # float32, as diffusers normalises
    y = (x / norm).to(dtype).to(tl.float32)
    y = (y * scale).to(dtype).to(tl.float32)
    y = (y * tl.load(gamma_ptr + cols, mask=cols < channels, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    if HAS_NORM_BIAS:
        y = (y + tl.load(norm_bias_ptr + cols, mask=cols < channels, other=0.0).to(tl.float32)).to(dtype)
        y = y.to(tl.float32)
    tl.store(out_ptr + item * out_item_stride + row * channels + cols, (y / (1.0 + tl.exp(-y))).to(dtype), mask=mask)


def rms_norm_silu(x: torch.Tensor, norm: WanRMS_norm, out: torch.Tensor, in_bias: torch.Tensor | None = None) -> None:
    """`out = silu(norm(x + in_bias))` of `[B, C, T, H, W]` activations (channel-first `WanRMS_norm`); `out` may be a
    view, e.g. the frames after a causal convolution's history in its input buffer."""
    if not norm.channel_first:
        raise ValueError("rms_norm_silu normalises over the channels of channel-first activations")
    if not _uses_kernels(x, out, any_item_stride=True):
        y = x if in_bias is None else x + in_bias.view(1, -1, 1, 1, 1)
        out.copy_(F.silu(norm(y)))
        return
    _, channels, frames, height, width = x.shape
    has_norm_bias, blocks = isinstance(norm.bias, torch.Tensor), RowBlocks.of(x)
    _rms_norm_silu_kernel[blocks.grid](
        x, out, norm.gamma, norm.bias if has_norm_bias else norm.gamma, norm.gamma if in_bias is None else in_bias,
        blocks.num_rows, frames * height * width, x.stride(0), out.stride(0), channels, float(norm.scale),
        NORMALIZE_EPS, HAS_NORM_BIAS=has_norm_bias, HAS_IN_BIAS=in_bias is not None, BLOCK_R=blocks.block_r,
        BLOCK_C=blocks.block_c,
    )  # fmt: skip


@triton.jit
def _add_bias_and_residual_kernel(
    x_ptr, bias_ptr, residual_ptr, residual_bias_ptr, out_ptr, num_rows, channels,
    HAS_RESIDUAL_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """(x + bias) + (residual [+ residual_bias]) over BLOCK_R contiguous rows of `channels`, rounded per add."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < num_rows) & (cols < channels)
    offsets = rows * channels + cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    x = (x + tl.load(bias_ptr + cols, mask=cols < channels).to(tl.float32)).to(dtype).to(tl.float32)
    residual = tl.load(residual_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_RESIDUAL_BIAS:
        residual_bias = tl.load(residual_bias_ptr + cols, mask=cols < channels).to(tl.float32)
        residual = (residual + residual_bias).to(dtype).to(tl.float32)
    tl.store(out_ptr + offsets, (x + residual).to(dtype), mask=mask)


def add_bias_and_residual(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, residual_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`(x + bias) + (residual + residual_bias)` of `[B, C, T, H, W]` activations and `[C]` biases, in x's layout."""
    if not _uses_kernels(x):
        shortcut = residual if residual_bias is None else residual + residual_bias.view(1, -1, 1, 1, 1)
        return (x + bias.view(1, -1, 1, 1, 1)) + shortcut
    residual = residual.contiguous(memory_format=torch.channels_last_3d)  # a copy only if in the other layout
    out, blocks = torch.empty_like(x), RowBlocks.of(x)
    _add_bias_and_residual_kernel[blocks.grid](
        x, bias, residual, bias if residual_bias is None else residual_bias, out, blocks.num_rows, x.shape[1],
        HAS_RESIDUAL_BIAS=residual_bias is not None, BLOCK_R=blocks.block_r, BLOCK_C=blocks.block_c,
    )  # fmt: skip
    return out


@triton.jit
def _add_dup_up_kernel(
    x_ptr, source_ptr, num_rows, frames, height, width, channels, source_frames, source_height, source_width,
    source_channels, repeats, frame_offset, FACTOR_T: tl.constexpr, FACTOR_S: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """x += DupUp3D(source) in place, BLOCK_R output voxels of `channels` at a time: output channel c of voxel
    (t, h, w) reads source channel (c * F + k) // repeats at voxel (t', h', w') = (t + frame_offset, h, w) // factors,
    k being the voxel's place in its FACTOR_T x FACTOR_S x FACTOR_S cell (F its size)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < num_rows) & (cols < channels)
    w = rows % width
    h = (rows // width) % height
    t = (rows // (width * height)) % frames + frame_offset
    item = rows // (width * height * frames)
    cell = (t % FACTOR_T) * FACTOR_S * FACTOR_S + (h % FACTOR_S) * FACTOR_S + w % FACTOR_S
    source_row = ((item * source_frames + t // FACTOR_T) * source_height + h // FACTOR_S) * source_width + w // FACTOR_S
    source_channel = (cols * (FACTOR_T * FACTOR_S * FACTOR_S) + cell) // repeats
    shortcut = tl.load(source_ptr + source_row * source_channels + source_channel, mask=mask).to(tl.float32)
    x = tl.load(x_ptr + rows * channels + cols, mask=mask).to(tl.float32)
    tl.store(x_ptr + rows * channels + cols, (x + shortcut).to(x_ptr.dtype.element_ty), mask=mask)


def add_dup_up(x: torch.Tensor, source: torch.Tensor, shortcut: DupUp3D, first_chunk: bool) -> torch.Tensor:
    """`x + shortcut(source, first_chunk)` of `[B, C, T, H, W]` activations; x's memory is reused where the kernel
    runs (the up block's own output, read by nothing else)."""
    if not _uses_kernels(x):
        return x + shortcut(source, first_chunk=first_chunk)
    source = source.contiguous(memory_format=torch.channels_last_3d)  # a copy only if in the other layout
    _, channels, frames, height, width = x.shape
    blocks = RowBlocks.of(x)
    _add_dup_up_kernel[blocks.grid](
        x, source, blocks.num_rows, frames, height, width, channels, *source.shape[2:], source.shape[1],
        shortcut.repeats, shortcut.factor_t - 1 if first_chunk else 0, FACTOR_T=shortcut.factor_t,
        FACTOR_S=shortcut.factor_s, BLOCK_R=blocks.block_r, BLOCK_C=blocks.block_c,
    )  # fmt: skip
    return x
