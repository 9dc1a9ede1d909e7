"""The generator's device memory, measured at startup as vLLM's profile run measures the reasoner's.

Before vLLM sizes its KV cache, the worker loads the generator and runs it once at the largest sizes the deployment
admits (`GeneratorSettings`): one tower forward over the largest request's tokens (both CFG branches, prompts of
`max_prompt_tokens`), one VAE decode of its video and one VAE encode of its longest conditioning clip, each peak
measured by the caching allocator. The reservation is the weights, the largest of those peaks (they follow one
another on the generator's stream), the CUDA-graph pools that outlive a step (the tower's graphs up to
`GRAPH_MAX_TOKENS` and the VAE decode's short-clip graphs with their outputs) and the state budget of the requests
in flight; `patches.reserve_generator_memory` takes it from what vLLM would give its KV cache. On the CPU nothing is
measured: the weights are counted, and the launcher sizes vLLM's KV cache from the host's free memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from cosmos3_serve.model_executor.admission import GeneratorSettings, LatentGeometry, RequestCost
from cosmos3_serve.model_executor.diffusion_executor import DiffusionExecutor
from cosmos3_serve.model_executor.generator import GRAPH_MAX_TOKENS, GeneratorSequence
from cosmos3_serve.model_executor.kv_export import PromptKV
from cosmos3_serve.model_executor.vae_graphs import MAX_GRAPH_LATENT_ELEMENTS, MAX_GRAPHS
from cosmos3_serve.model_executor.vae_io import latent_shape

logger = logging.getLogger(__name__)

# Share of the measured total added for the allocator's fragmentation between requests of different shapes.
FRAGMENTATION_MARGIN = 0.05


@dataclass(frozen=True)
class GeneratorMemory:
    """Bytes of the generator's reservation (0 where not measured)."""

    weights: int  # tower and VAE
    forward_peak: int  # activations of one step of the largest request
    decode_peak: int  # VAE decode of its video, output frames included
    encode_peak: int  # VAE encode of its conditioning clip
    graph_pools: int  # CUDA graphs: the tower's up to GRAPH_MAX_TOKENS, the VAE's short clips and their outputs
    state_budget: int  # requests in flight: prompt K/V, latents

    @property
    def total(self) -> int:
        measured = self.weights + max(self.forward_peak, self.decode_peak, self.encode_peak) + self.graph_pools
        return int(measured * (1 + FRAGMENTATION_MARGIN)) + self.state_budget

    def report(self) -> dict[str, float]:
        """GiB of each part and of the total (for `/v1/metadata`)."""
        return {**{name: round(value / 2**30, 3) for name, value in asdict(self).items()},
                "total": round(self.total / 2**30, 3)}  # fmt: skip


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@torch.no_grad()
def measure(executor: DiffusionExecutor, settings: GeneratorSettings) -> GeneratorMemory:
    """The reservation of `executor` for `settings` (on CUDA: measured; its caches emptied afterwards)."""
    weights = parameter_bytes(executor.tower) + parameter_bytes(executor.codec.vae)
    if executor.device.type != "cuda":
        return GeneratorMemory(weights, 0, 0, 0, 0, settings.state_budget_bytes)
    width, height, frames = settings.max_shape
    largest = settings.largest_request()
    tokens = RequestCost.of(largest, _geometry(executor)).tokens
    latents = torch.zeros(latent_shape(executor.codec.config, largest), device=executor.device)
    clip = torch.zeros(1, 3, frames, height, width)
    phases = {
        f"tower forward of {tokens} tokens": _forward(executor, tokens, settings.max_prompt_tokens),
        "graphed tower forward": _forward(executor, min(GRAPH_MAX_TOKENS, tokens), settings.max_prompt_tokens),
        f"VAE decode of {frames} frames": lambda: executor.codec.decode_by_shape({"largest": latents}),
        f"VAE encode of {frames} frames": lambda: executor.codec.encode_by_shape({"largest": clip}),
    }
    peaks = []
    for phase, run in phases.items():
        try:
            peaks.append(_peak(run))
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                f"the generator's largest admitted request ({width}x{height}, {frames} frames, with guidance) does "
                f"not fit on this device beside the reasoner ({phase}: {str(error).splitlines()[0]}): lower "
                "--generation-max-shape or add GPUs (--tensor-parallel-size)"
            ) from None
        logger.info("generator memory: %s peaks at %.2f GiB", phase, peaks[-1] / 2**30)
    forward, graphed_forward, decode, encode = peaks
    graph_output = MAX_GRAPH_LATENT_ELEMENTS * _pixels_per_latent_element(executor) * executor.codec.vae.dtype.itemsize
    memory = GeneratorMemory(weights=weights, forward_peak=forward, decode_peak=decode, encode_peak=encode,
                             graph_pools=graphed_forward + MAX_GRAPHS * graph_output,
                             state_budget=settings.state_budget_bytes)  # fmt: skip
    logger.info("generator memory (GiB): %s", memory.report())
    return memory


def _geometry(executor: DiffusionExecutor) -> LatentGeometry:
    vae = executor.codec.config
    return LatentGeometry(z_dim=vae.z_dim, spatial=vae.scale_factor_spatial, temporal=vae.scale_factor_temporal,
                          patch=executor.config.latent_patch_size, action_dim=executor.config.action_dim or 0)  # fmt: skip


def _pixels_per_latent_element(executor: DiffusionExecutor) -> int:
    """Decoded values per latent element: 3 channels x the VAE's compression, over its latent channels."""
    vae = executor.codec.config
    return -(-3 * vae.scale_factor_temporal * vae.scale_factor_spatial**2 // vae.z_dim)


def _forward(executor: DiffusionExecutor, tokens: int, prompt_tokens: int) -> Callable[[], None]:
    """One tower forward of two sequences of `tokens / 2` latent tokens each after prompts of `prompt_tokens`: its
    inputs, including the prompts' K/V (held by the state budget), are made before the returned call measures."""
    config, device = executor.config, executor.device
    kv_shape = (config.num_hidden_layers, 2, prompt_tokens, executor.tower.layers[0].attn.num_kv_heads, config.head_dim)
    sequences = [GeneratorSequence(n, PromptKV(torch.zeros(kv_shape, dtype=executor.dtype, device=device)))
                 for n in (tokens // 2, tokens - tokens // 2)]  # fmt: skip
    patches = torch.zeros(tokens, config.patch_latent_dim, dtype=executor.dtype, device=device)
    timesteps, noisy = torch.zeros(tokens, device=device), torch.ones(tokens, dtype=torch.bool, device=device)

    @torch.no_grad()
    def run() -> None:
        batch = executor.tower.pack(torch.zeros(3, tokens, device=device), sequences)
        executor.tower(patches, timesteps, noisy, batch)

    return run


def _peak(run: Callable[[], object]) -> int:
    """Bytes the caching allocator held at most while `run()` ran, beyond what it held before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    torch.cuda.empty_cache()
    return peak
