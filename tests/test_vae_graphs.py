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

from cosmos3_serve.model_executor.vae_decoder import ImplicitPaddingCausalConv3d
from cosmos3_serve.model_executor.vae_graphs import VaeDecoder
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


@pytest.mark.parametrize("latent_frames", [1, 2, 5])
def test_vae_decoder_equals_diffusers_decode(tiny_checkpoint: Path, monkeypatch, latent_frames: int) -> None:
    """The decode by chunks of several latent frames (`MAX_CHUNK_LATENT_VOXELS`: here 5 latent frames take a chunk
    of 3 and one of 1 after the first) with the buffered modules, against diffusers' frame by frame."""
    from cosmos3_serve.model_executor import vae_decoder

    reference = AutoencoderKLWan.from_pretrained(tiny_checkpoint, subfolder="vae").eval()
    decoder = VaeDecoder(copy.deepcopy(reference))
    swapped = {type(m) for m in decoder.vae.decoder.modules()} & set(vae_decoder.SWAPS.values())
    assert swapped == set(vae_decoder.SWAPS.values())
    again = VaeDecoder(copy.deepcopy(decoder.vae))  # a copy of a prepared VAE (the executor's, in another precision)
    assert [type(m) for m in again.vae.decoder.modules()] == [type(m) for m in decoder.vae.decoder.modules()]
    torch.manual_seed(0)
    latents = torch.randn(2, reference.config.z_dim, latent_frames, 4, 6)
    monkeypatch.setattr(vae_decoder, "MAX_CHUNK_LATENT_VOXELS", 2 * 3 * 4 * 6)
    with torch.no_grad():
        expected = reference.decode(latents).sample
    torch.testing.assert_close(decoder(latents), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again(latents), expected, rtol=1e-4, atol=1e-5)


def test_vae_kernels_under_triton_interpreter() -> None:
    run_interpreted(__name__, "check_vae_kernels")


def test_fused_decode_under_triton_interpreter() -> None:
    run_interpreted(__name__, "check_fused_decode")


def _assert_bf16_close(ours: torch.Tensor, expected: torch.Tensor, steps: int, scale: float = 1.0) -> None:
    """Within `steps` bf16 steps (2**-7 of a value at most) of values up to `scale` (Triton's interpreter truncates
    where it converts to bf16: a step each time)."""
    torch.testing.assert_close(ours.float(), expected.float(), rtol=steps * 2**-7, atol=steps * 2**-7 * scale)


def check_vae_kernels(device: str = "cpu") -> None:
    """`vae_kernels` against the PyTorch passes they replace, on channels-last-3d activations: float32 to float32
    rounding. bf16: the adds exactly on a GPU (each rounds once, as PyTorch's); RMSNorm + SiLU within two bf16 steps
    of diffusers' bf16 passes (they round after each step, as the kernel does; a rounding flipped by another
    reduction order can move the next ones) and no further from the float32 result than diffusers' passes are.
    Under Triton's interpreter, which truncates where it converts to bf16, within a few steps."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import DupUp3D, WanRMS_norm

    from cosmos3_serve.model_executor.vae_kernels import add_bias_and_residual, add_dup_up, rms_norm_silu

    def channels_last(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(device, dtype).contiguous(memory_format=torch.channels_last_3d)

    torch.manual_seed(0)
    for channels, bias in [(96, False), (256, True), (384, False)]:
        norm = WanRMS_norm(channels, images=False, bias=bias)
        with torch.no_grad():
            norm.gamma.normal_(1.0, 0.3)
            if bias:
                norm.bias.normal_(0.0, 0.3)
        x, in_bias = 3 * torch.randn(2, channels, 3, 5, 7), torch.randn(channels)
        for dtype in (torch.float32, torch.bfloat16):
            norm_d, x_d = copy.deepcopy(norm).to(device, dtype), channels_last(x, dtype)
            in_bias_d = in_bias.to(device, dtype)
            with torch.no_grad():
                expected = F.silu(norm_d(x_d + in_bias_d.view(1, -1, 1, 1, 1)))
                exact = F.silu(norm.to(device)(x_d.float() + in_bias_d.float().view(1, -1, 1, 1, 1)))
            buffer = channels_last(torch.full((2, channels, 5, 5, 7), 7.0), dtype)  # two frames of history first
            rms_norm_silu(x_d, norm_d, buffer[:, :, 2:], in_bias_d)
            ours = buffer[:, :, 2:]
            assert (buffer[:, :, :2] == 7.0).all()
            if dtype == torch.float32:
                torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
            elif device == "cpu":
                _assert_bf16_close(ours, expected, steps=8)
            else:
                _assert_bf16_close(ours, expected, steps=2)
                error_ours = (ours.float() - exact).norm() / exact.norm()
                error_diffusers = (expected.float() - exact).norm() / exact.norm()
                assert error_ours <= 1.05 * error_diffusers, (channels, bias, error_ours, error_diffusers)

    for dtype in (torch.float32, torch.bfloat16):
        hidden, residual = (channels_last(torch.randn(2, 40, 3, 5, 7), dtype) for _ in range(2))
        bias, residual_bias = torch.randn(40, device=device, dtype=dtype), torch.randn(40, device=device, dtype=dtype)
        for with_residual_bias in (False, True):
            rb = residual_bias if with_residual_bias else None
            ours = add_bias_and_residual(hidden, bias, residual, rb)
            shortcut = residual if rb is None else residual + rb.view(1, -1, 1, 1, 1)
            expected = (hidden + bias.view(1, -1, 1, 1, 1)) + shortcut
            assert ours.is_contiguous(memory_format=torch.channels_last_3d)
            if dtype == torch.bfloat16 and device == "cpu":  # the rounded partial sums reach |hidden + bias|
                scale = (hidden.abs().max() + bias.abs().max() + residual.abs().max() + residual_bias.abs().max())
                _assert_bf16_close(ours, expected, steps=3, scale=float(scale))
            else:
                torch.testing.assert_close(ours, expected, rtol=0, atol=0)

        for in_dim, out_dim, factor_t in [(16, 8, 2), (8, 8, 1), (12, 6, 2)]:
            shortcut = DupUp3D(in_dim, out_dim, factor_t=factor_t, factor_s=2)
            source = channels_last(torch.randn(2, in_dim, 3, 4, 5), dtype)
            for first_chunk in (False, True):
                frames = 3 * factor_t - (factor_t - 1 if first_chunk else 0)
                x = channels_last(torch.randn(2, out_dim, frames, 8, 10), dtype)
                expected = x + shortcut(source, first_chunk=first_chunk)
                ours = add_dup_up(x.clone(memory_format=torch.channels_last_3d), source, shortcut, first_chunk)
                if dtype == torch.bfloat16 and device == "cpu":
                    _assert_bf16_close(ours, expected, steps=1, scale=float(x.abs().max() + source.abs().max()))
                else:
                    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def check_fused_decode() -> None:
    """Under Triton's interpreter (CPU tensors take the kernels, channels-last): `VaeDecoder`'s float32 decode of
    five latent frames of a random Wan 2.2-shaped VAE, every fused pass through its kernel, against diffusers'."""
    from cosmos3_serve.model_executor import vae_kernels

    torch.manual_seed(0)
    reference = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=48, in_channels=12, out_channels=12,
                                 is_residual=True, patch_size=2, scale_factor_spatial=16).eval()  # fmt: skip
    with torch.no_grad():
        for module in reference.decoder.modules():
            if hasattr(module, "gamma"):
                module.gamma.normal_(1.0, 0.3)
    latents = torch.randn(2, 48, 5, 4, 6)
    with torch.no_grad():
        expected = reference.decode(latents).sample
    decisions, uses_kernels = [], vae_kernels._uses_kernels
    vae_kernels._uses_kernels = lambda *tensors, **kw: decisions.append(uses_kernels(*tensors, **kw)) or decisions[-1]
    ours = VaeDecoder(copy.deepcopy(reference))(latents)
    assert len(decisions) > 20 and all(decisions), decisions
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
