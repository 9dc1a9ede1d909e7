"""`model_executor/vae_graphs.py` on the CPU: the causal convolution with implicit spatial padding against diffusers'
`WanCausalConv3d` (with and without cached frames, the cases the decoder's chunks take), and `VaeDecoder`'s decode
of the tiny checkpoint's VAE against diffusers' own. The CUDA graphs and channels-last layout: tests/gpu."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from cosmos3_serve.model_executor.vae_graphs import ImplicitPaddingCausalConv3d, VaeDecoder


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
    reference = AutoencoderKLWan.from_pretrained(tiny_checkpoint, subfolder="vae").eval()
    decoder = VaeDecoder(copy.deepcopy(reference))
    assert sum(isinstance(m, ImplicitPaddingCausalConv3d) for m in decoder.vae.decoder.modules()) > 0
    torch.manual_seed(0)
    latents = torch.randn(2, reference.config.z_dim, 3, 4, 6)
    with torch.no_grad():
        expected = reference.decode(latents).sample
    torch.testing.assert_close(decoder(latents), expected, rtol=1e-4, atol=1e-5)
