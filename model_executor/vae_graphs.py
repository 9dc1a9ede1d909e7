"""The executor's VAE decode, replayed from CUDA graphs per latent batch shape.

Diffusers' `AutoencoderKLWan.decode` runs its causal decoder one latent frame at a time, a few hundred small
kernels per frame: for the short clips of action modes its host launches take longer than its kernels (the
serving profile in docs/benchmarks.md: 1.81 s of host for 1.49 s of GPU over 16 policy clips). `VaeDecoder`
decodes a batch shape eagerly the first time it is seen, captures it in a CUDA graph the second time, and replays
that graph from then on (short clips only: `MAX_GRAPH_LATENT_ELEMENTS`). Graphs share one memory pool: a replay's
output is valid until the next decode, which the executor's own use (pixels computed right after each decode)
respects. On the CPU, with `--enforce-eager` or with `COSMOS3_DISABLE_VAE_GRAPHS=1`, every decode is eager.

The decoder's causal 3-D convolutions pad in space inside the convolution (`ImplicitPaddingCausalConv3d`) rather
than copying a zero-padded input first, and each RMSNorm + SiLU is one kernel (`vae_kernels.RMSNormSiLU`): in a
profile of the bf16 decode of 8 policy clips the convolutions took 47 % of the GPU time, copies, concatenations,
pads and elementwise passes 38 %. On CUDA the convolutions take channels-last weights and inputs
(`bench/vae_decode.py` times the variants). cuDNN's autotuner is left off: it tunes every new batch shape again,
and a server sees many.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResidualBlock

from cosmos3_serve.model_executor.generator import capture_graph
from cosmos3_serve.model_executor.vae_kernels import RMSNormSiLU

CAPTURE_AT_SIGHTING = 2  # the first decode of a shape is eager (lazy initialisation), the second captures
MAX_GRAPHS = 16  # batch shapes kept as graphs; decodes of further shapes stay eager
# Batches of at most this many latent elements are graphed (the policy clip: 48 x 5 x 11 x 20 = 52,800 per clip):
# their host launches cost as much as their kernels. Longer videos are GPU-bound, and a graph would keep its
# static output (over 50 pixel values per latent element) for good.
MAX_GRAPH_LATENT_ELEMENTS = 1 << 20


class ImplicitPaddingCausalConv3d(WanCausalConv3d):
    """Diffusers' causal 3-D convolution (zero padding: width and height on both sides, time before the input, where
    the cached frames of the previous chunk go first), with the spatial zero padding left to the convolution: the
    same sums without a padded copy of every input. `_padding` is diffusers' (W, W, H, H, T before, T after)."""

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        pad_w, _, pad_h, _, pad_t, _ = self._padding
        if cache_x is not None and pad_t > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            pad_t -= cache_x.shape[2]
        if pad_t > 0:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, pad_h, pad_w), self.dilation, self.groups)


def fuse_norms_and_silu(decoder: torch.nn.Module) -> None:
    """Each RMSNorm that a SiLU follows (twice per residual block, once in the head) becomes `RMSNormSiLU`, and
    those SiLUs identities: the modules' only uses of their `nonlinearity`. A decoder fused before (a copy of the
    executor's VAE) stays as it is."""
    for block in [decoder, *(m for m in decoder.modules() if isinstance(m, WanResidualBlock))]:
        for name in ("norm1", "norm2", "norm_out"):
            norm = getattr(block, name, None)
            if norm is not None and not isinstance(norm, RMSNormSiLU):
                setattr(block, name, RMSNormSiLU(norm))
        block.nonlinearity = torch.nn.Identity()


class CapturedDecode:
    """`vae.decode` of one latent batch shape as a CUDA graph over a static input buffer."""

    def __init__(self, vae: AutoencoderKLWan, latents: torch.Tensor, pool: tuple[int, int]) -> None:
        self.latents = latents.clone()
        self.graph, self.video = capture_graph(lambda: vae.decode(self.latents).sample, pool)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        self.latents.copy_(latents)
        self.graph.replay()
        return self.video


class VaeDecoder:
    """Decodes latents `[B, C, T', H', W']` (the VAE's dtype) to video `[B, 3, T, H, W]` in [-1, 1]; with CUDA graphs
    unless `use_graphs` is off (the server's `--enforce-eager`)."""

    def __init__(self, vae: AutoencoderKLWan, use_graphs: bool = True) -> None:
        self.vae = vae
        self.device = next(vae.parameters()).device
        self.use_graphs = (use_graphs and self.device.type == "cuda"
                           and os.environ.get("COSMOS3_DISABLE_VAE_GRAPHS", "0") != "1")  # fmt: skip
        self.sightings: dict[tuple[int, ...], int] = {}
        self.graphs: dict[tuple[int, ...], CapturedDecode] = {}
        for conv in (m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d)):
            if type(conv) is WanCausalConv3d:
                conv.__class__ = ImplicitPaddingCausalConv3d
            if self.device.type == "cuda":
                conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        fuse_norms_and_silu(vae.decoder)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            latents = latents.contiguous(memory_format=torch.channels_last_3d)
        shape = tuple(latents.shape)
        if not self.use_graphs:
            return self.vae.decode(latents).sample
        if shape in self.graphs:
            return self.graphs[shape](latents)
        self.sightings[shape] = self.sightings.get(shape, 0) + 1
        if (self.sightings[shape] < CAPTURE_AT_SIGHTING or len(self.graphs) >= MAX_GRAPHS
                or latents.numel() > MAX_GRAPH_LATENT_ELEMENTS):  # fmt: skip
            return self.vae.decode(latents).sample
        self.graphs[shape] = CapturedDecode(self.vae, latents, self.pool)
        return self.graphs[shape](latents)
