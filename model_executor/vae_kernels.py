"""The VAE decoder's RMSNorm + SiLU in one kernel.

Diffusers' `WanRMS_norm` followed by SiLU (every residual block twice, and the decoder's head) is eight passes over
the activations in bf16: a cast to float32, the norm, the division, the cast back, the scale, the gain, the bias
(0.0, still a pass) and the SiLU. In a profile of the bf16 decode of policy clips such elementwise kernels and
copies took 38 % of the GPU time (docs/benchmarks.md). `RMSNormSiLU` reads each activation once and writes it once,
rounding to the activations' dtype after each step as those passes do, so in float32 it equals them up to float32
rounding and in bf16 up to a bf16 rounding here and there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
from torch import nn
from vllm.triton_utils import tl, triton

NORMALIZE_EPS = 1e-12  # F.normalize's


@triton.jit
def _rms_norm_silu_kernel(
    x_ptr, out_ptr, gamma_ptr, bias_ptr, num_rows, channels, scale, eps,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows of `channels` contiguous values (a channels-last activation's voxels): silu(gain * scale *
    x / max(|x|, eps) + bias), rounded to the output's dtype after each step."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < num_rows) & (cols < channels)
    offsets = rows * channels + cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1))[:, None], eps).to(dtype).to(tl.float32)
    y = (x / norm).to(dtype).to(tl.float32)
    y = (y * scale).to(dtype).to(tl.float32)
    y = (y * tl.load(gamma_ptr + cols, mask=cols < channels, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    if HAS_BIAS:
        y = (y + tl.load(bias_ptr + cols, mask=cols < channels, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    tl.store(out_ptr + offsets, (y / (1.0 + tl.exp(-y))).to(dtype), mask=mask)


def rms_norm_silu_channels_last(x: torch.Tensor, norm: WanRMS_norm) -> torch.Tensor:
    """`silu(norm(x))` of a `[B, C, T, H, W]` activation in channels-last-3d memory, in the same memory format."""
    channels = x.shape[1]
    out = torch.empty_like(x)
    assert out.stride() == x.stride()
    has_bias = isinstance(norm.bias, torch.Tensor)
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, 4096 // block_c)
    num_rows = x.numel() // channels
    _rms_norm_silu_kernel[(triton.cdiv(num_rows, block_r),)](
        x, out, norm.gamma, norm.bias if has_bias else norm.gamma, num_rows, channels, float(norm.scale),
        NORMALIZE_EPS, HAS_BIAS=has_bias, BLOCK_R=block_r, BLOCK_C=block_c,
    )  # fmt: skip
    return out


class RMSNormSiLU(nn.Module):
    """A channel-first `WanRMS_norm` and the SiLU after it: one kernel for channels-last-3d activations on CUDA,
    else the two modules as diffusers runs them."""

    def __init__(self, norm: WanRMS_norm) -> None:
        super().__init__()
        if not norm.channel_first:
            raise ValueError("RMSNormSiLU normalises over the channels of channel-first activations")
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return rms_norm_silu_channels_last(x, self.norm)
        return F.silu(self.norm(x))
