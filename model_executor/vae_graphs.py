"""The executor's VAE decode, replayed from CUDA graphs per latent batch shape.

Diffusers' `AutoencoderKLWan.decode` runs its causal decoder one latent frame at a time, a few hundred small
kernels per frame: for the short clips of action modes its host launches take longer than its kernels (the
serving profile in docs/benchmarks.md: 1.81 s of host for 1.49 s of GPU over 16 policy clips). `VaeDecoder`
decodes a batch shape eagerly the first time it is seen, captures it in a CUDA graph the second time, and replays
that graph from then on (short clips only: `MAX_GRAPH_LATENT_ELEMENTS`). Graphs share one memory pool: a replay's
output is valid until the next decode, which the executor's own use (pixels computed right after each decode)
respects. On the CPU, with `--enforce-eager` or with `COSMOS3_DISABLE_VAE_GRAPHS=1`, every decode is eager.

The decode itself is `vae_decoder.decode` (fewer passes over the activations than diffusers', the same sums), with
channels-last convolutions where its Triton kernels run (`bench/vae_decode.py` times the variants). cuDNN's
autotuner is left off: it tunes every new batch shape again, and a server sees many.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKLWan

from cosmos3_serve.model_executor import vae_decoder
from cosmos3_serve.model_executor.generator import capture_graph
from cosmos3_serve.model_executor.vae_kernels import kernels_run_on

CAPTURE_AT_SIGHTING = 2  # the first decode of a shape is eager (lazy initialisation), the second captures
MAX_GRAPHS = 16  # batch shapes kept as graphs; decodes of further shapes stay eager
# Batches of at most this many latent elements are graphed (the policy clip: 48 x 5 x 11 x 20 = 52,800 per clip):
# their host launches cost as much as their kernels. Longer videos are GPU-bound, and a graph would keep its
# static output (over 50 pixel values per latent element) for good.
MAX_GRAPH_LATENT_ELEMENTS = 1 << 20


class CapturedDecode:
    """`vae_decoder.decode` of one latent batch shape as a CUDA graph over a static input buffer."""

    def __init__(self, vae: AutoencoderKLWan, latents: torch.Tensor, pool: tuple[int, int]) -> None:
        self.latents = latents.clone()
        self.graph, self.video = capture_graph(lambda: vae_decoder.decode(vae, self.latents), pool)

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
        self.memory_format = torch.channels_last_3d if kernels_run_on(self.device) else torch.contiguous_format
        vae_decoder.prepare_decoder(vae, self.memory_format)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.contiguous(memory_format=self.memory_format)
        shape = tuple(latents.shape)
        if not self.use_graphs:
            return vae_decoder.decode(self.vae, latents)
        if shape in self.graphs:
            return self.graphs[shape](latents)
        self.sightings[shape] = self.sightings.get(shape, 0) + 1
        if (self.sightings[shape] < CAPTURE_AT_SIGHTING or len(self.graphs) >= MAX_GRAPHS
                or latents.numel() > MAX_GRAPH_LATENT_ELEMENTS):  # fmt: skip
            return vae_decoder.decode(self.vae, latents)
        self.graphs[shape] = CapturedDecode(self.vae, latents, self.pool)
        return self.graphs[shape](latents)
