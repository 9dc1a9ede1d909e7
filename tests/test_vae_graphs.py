"""`model_executor/vae_graphs.py` on the CPU: the causal convolution with implicit spatial padding against diffusers'
`WanCausalConv3d` (with and without cached frames, the cases the decoder's chunks take), the fused RMSNorm + SiLU
kernel under Triton's interpreter against diffusers' `WanRMS_norm` and SiLU, and `VaeDecoder`'s decode of the tiny
checkpoint's VAE against diffusers' own. The CUDA graphs and channels-last layout: tests/gpu."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from cosmos3_serve.model_executor.vae_graphs import ImplicitPaddingCausalConv3d, VaeDecoder
from tests.triton_interpreter import run_interpreted


# the decoder's convolutions (3 x 3 x 3, time-only, 1 x 1 x 1, strided in time) and one padded unequally in H, W
CONVOLUTIONS = [(3, 1, 1), ((3, 1, 1), (1, 0, 0), 1), (1, 0, 1), ((3, 1, 1), (0, 0, 0), (2, 1, 1)),
                ((3, 5, 1), (1, 2, 0), 1)]


@pytest.mark.parametrize("kernel, padding, stride", CONVOLUTIONS)
@pytest.mark.parametrize("cached_frames", [None, 1, 2])
def test_implicit_padding_equals_diffusers_causal_conv(kernel, padding, stride, cached_frames: int | None) -> None:
    torch.manual_seed(0)
    reference = WanCausalConv3d(4, 6, kernel, stride=stride, padding=padding)
    ours = copy.deepcopy(reference)
    ours.__class__ = ImplicitPaddingCausalConv3d
    x = torch.randn(2, 4, 3, 5, 7)
    cache = None if cached_frames is None else torch.randn(2, 4, cached_frames, 5, 7)
    expected = reference(x, cache)
    torch.testing.assert_close(ours(x, cache), expected, rtol=1e-5, atol=1e-5)


def test_vae_decoder_equals_diffusers_decode(tiny_checkpoint: Path) -> None:
    from cosmos3_serve.model_executor.vae_kernels import RMSNormSiLU

    reference = AutoencoderKLWan.from_pretrained(tiny_checkpoint, subfolder="vae").eval()
    decoder = VaeDecoder(copy.deepcopy(reference))
    assert sum(isinstance(m, ImplicitPaddingCausalConv3d) for m in decoder.vae.decoder.modules()) > 0
    fused = sum(isinstance(m, RMSNormSiLU) for m in decoder.vae.decoder.modules())
    assert fused > 2  # the blocks' and the head's
    again = VaeDecoder(copy.deepcopy(decoder.vae))  # a copy of a fused VAE (the executor's, in another precision)
    assert sum(isinstance(m, RMSNormSiLU) for m in again.vae.decoder.modules()) == fused
    torch.manual_seed(0)
    latents = torch.randn(2, reference.config.z_dim, 3, 4, 6)
    with torch.no_grad():
        expected = reference.decode(latents).sample
    torch.testing.assert_close(decoder(latents), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again(latents), expected, rtol=1e-4, atol=1e-5)


def test_rms_norm_silu_kernel_under_triton_interpreter() -> None:
    run_interpreted(__name__, "check_rms_norm_silu_kernel")


def check_rms_norm_silu_kernel(device: str = "cpu") -> None:
    """The kernel against diffusers' `WanRMS_norm` then SiLU, on channels-last-3d activations of the decoder's widths:
    float32 to float32 rounding. bf16 on a GPU: within two bf16 steps of diffusers' bf16 passes (they round after
    each step, as the kernel does; a rounding flipped by another reduction order can move the next ones), and no
    further from diffusers' float32 result than diffusers' own bf16 passes are. Under Triton's interpreter, which
    truncates where it converts to bf16, within a few steps."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from cosmos3_serve.model_executor.vae_kernels import rms_norm_silu_channels_last

    torch.manual_seed(0)
    for channels, bias in [(96, False), (256, True), (384, False)]:
        norm = WanRMS_norm(channels, images=False, bias=bias)
        with torch.no_grad():
            norm.gamma.normal_(1.0, 0.3)
            if bias:
                norm.bias.normal_(0.0, 0.3)
        x = (3 * torch.randn(2, channels, 3, 5, 7)).contiguous(memory_format=torch.channels_last_3d)
        for dtype in (torch.float32, torch.bfloat16):
            norm_d = copy.deepcopy(norm).to(device, dtype)
            x_d = x.to(device, dtype).contiguous(memory_format=torch.channels_last_3d)
            with torch.no_grad():
                expected = F.silu(norm_d(x_d))
            ours = rms_norm_silu_channels_last(x_d, norm_d)
            assert ours.dtype == dtype and ours.stride() == x_d.stride()
            if dtype == torch.float32:
                torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
            elif device == "cpu":
                torch.testing.assert_close(ours.float(), expected.float(), rtol=2**-5, atol=2e-2)
            else:
                torch.testing.assert_close(ours.float(), expected.float(), rtol=2**-6, atol=2**-5)
                with torch.no_grad():
                    exact = F.silu(norm.to(device)(x_d.float()))
                error_ours = (ours.float() - exact).norm() / exact.norm()
                error_diffusers = (expected.float() - exact).norm() / exact.norm()
                assert error_ours <= 1.05 * error_diffusers, (channels, bias, error_ours, error_diffusers)
