"""What a generation request costs the generator, and whether a deployment can ever hold it.

A request's cost is known from its fields and its prompts' token counts before any work: the generator tokens of
one forward (every CFG branch: the step's activations grow with them), and the bytes it holds on the device while
it waits and denoises (its prompts' K/V, its latents and the scheduler's history of them). The deployment's
`GeneratorSettings` bound both: the worker measures the activations of the largest request it admits at startup
and reserves them beside vLLM's KV cache (`generator_memory`), and the drivers admit requests into the generator
only while the bytes held fit the state budget; the rest wait in the queue. A request over a bound can never run:
it is refused at once, naming the bound. Imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.sampling.actions import action_source_size, content_size

# Float32 copies of a request's latents on the device while it denoises: the latents, the scheduler's sample and
# its history of model outputs (UniPC keeps solver_order of them), the guided velocity and the branches' velocities.
LATENT_STATE_COPIES = 8
ADDITIONAL_CONFIG_KEY = "cosmos3_generator"
# Generator tokens per denoising step (`DiffusionExecutor.next_batch`): from about this many on, a step's GEMMs run
# near their peak (docs/benchmarks.md), so a larger batch only makes its requests wait for each other.
DEFAULT_MAX_BATCH_TOKENS = 2048
# Prompt tokens of one CFG branch of a typical generation request (the pipeline's templates included), for the
# capacity a deployment reports.
TYPICAL_PROMPT_TOKENS = 512
# (width, height, frames) of the generation requests whose capacity a deployment reports, besides its largest.
CAPACITY_SHAPES = {"image_1280x720": (1280, 720, 1), "video_832x480x93": (832, 480, 93)}


@dataclass(frozen=True)
class LatentGeometry:
    """The checkpoint's numbers that turn pixels into generator tokens (`vae/`, `transformer/config.json`)."""

    z_dim: int
    spatial: int  # pixels per latent, in height and width
    temporal: int  # frames per latent frame after the first
    patch: int  # latents per token, in height and width
    action_dim: int  # width of the action head's tokens (0 without one)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> LatentGeometry:
        vae = json.loads((Path(checkpoint) / "vae" / "config.json").read_text())
        transformer = json.loads((Path(checkpoint) / "transformer" / "config.json").read_text())
        return cls(z_dim=vae["z_dim"], spatial=vae["scale_factor_spatial"], temporal=vae["scale_factor_temporal"],
                   patch=transformer["latent_patch_size"],
                   action_dim=transformer["action_dim"] if transformer.get("action_gen") else 0)  # fmt: skip


@dataclass(frozen=True)
class RequestCost:
    tokens: int  # generator tokens of one forward, every CFG branch
    latent_elements: int  # of its latents and actions
    pixels: int  # of its largest decoded video (frames x height x width)

    @classmethod
    def of(cls, request: GenerationRequest, geometry: LatentGeometry) -> RequestCost:
        if request.action_mode is not None:
            frames, actions = request.action_chunk_size + 1, request.action_chunk_size
            height, width = request.action_canvas
            source_hw = action_source_size([frame.size for frame in request.action_frames])
            content_h, content_w = content_size(source_hw, (height, width))
            latent_h, latent_w = max(content_h // geometry.spatial, 1), max(content_w // geometry.spatial, 1)
        else:
            frames, actions, height, width = request.num_frames, 0, request.height, request.width
            latent_h, latent_w = height // geometry.spatial, width // geometry.spatial
        latent_t = (frames - 1) // geometry.temporal + 1
        tokens = latent_t * -(-latent_h // geometry.patch) * -(-latent_w // geometry.patch) + actions
        branches = 2 if request.uses_cfg else 1
        return cls(tokens=branches * tokens,
                   latent_elements=geometry.z_dim * latent_t * latent_h * latent_w + actions * geometry.action_dim,
                   pixels=frames * height * width)  # fmt: skip

    def state_bytes(self, prompt_tokens: int, kv_bytes_per_token: int) -> int:
        """Bytes the request holds on the device from its prefill to its result: its prompts' K/V (all branches'
        `prompt_tokens`), and its latents and their copies."""
        return prompt_tokens * kv_bytes_per_token + LATENT_STATE_COPIES * 4 * self.latent_elements


@dataclass(frozen=True)
class GeneratorSettings:
    """The generator's side of a deployment, passed to vLLM's workers in `additional_config`."""

    max_batch_tokens: int  # generator tokens of one step; the largest request runs alone if it has more
    vae_dtype: str  # torch dtype name of the VAE
    max_shape: tuple[int, int, int]  # (width, height, frames) of the largest video the deployment admits
    max_prompt_tokens: int  # of one prompt (a CFG branch)
    state_budget_bytes: int  # device bytes of the requests admitted and prefilled (`RequestCost.state_bytes`)
    a16_steps: int | None = None  # FP8: first and last steps at 16-bit activations; None: the checkpoint's policy
    attention_precision: str = "bf16"  # the tower's attention inputs: "bf16" (the towers' dtype) or "fp8"
    parallel: str = "cfg=1,sp=1"  # `parallel_degrees.ParallelDegrees` over the tensor-parallel ranks

    def to_additional_config(self) -> dict:
        return {ADDITIONAL_CONFIG_KEY: asdict(self)}

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> GeneratorSettings | None:
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        return None if raw is None else cls(**{**raw, "max_shape": tuple(raw["max_shape"])})

    def largest_request(self) -> GenerationRequest:
        """The largest request the deployment admits: a video of `max_shape` with guidance (two branches)."""
        width, height, frames = self.max_shape
        return GenerationRequest("", num_frames=frames, height=height, width=width, guidance_scale=6.0)


@dataclass(frozen=True)
class GenerationLimits:
    """The bounds a request is checked against before any work (the worker's `cosmos3_start_generator` reports
    them)."""

    max_request_tokens: int
    max_shape: tuple[int, int, int]
    max_prompt_tokens: int
    state_budget_bytes: int
    kv_bytes_per_token: int  # of one prompt token, all layers, this deployment's K/V shard

    @classmethod
    def of(cls, settings: GeneratorSettings, geometry: LatentGeometry, kv_bytes_per_token: int) -> GenerationLimits:
        return cls(max_request_tokens=RequestCost.of(settings.largest_request(), geometry).tokens,
                   max_shape=settings.max_shape, max_prompt_tokens=settings.max_prompt_tokens,
                   state_budget_bytes=settings.state_budget_bytes, kv_bytes_per_token=kv_bytes_per_token)  # fmt: skip

    def refusal(self, request: GenerationRequest, cost: RequestCost) -> tuple[str, str] | None:
        """(field, message) when `request` can never run on this deployment: more generator tokens per step than its
        largest request (`--generation-max-shape`)."""
        if cost.tokens <= self.max_request_tokens:
            return None
        width, height, frames = self.max_shape
        field = "action_chunk_size" if request.action_mode is not None else "num_frames"
        return field, (f"this request needs {cost.tokens:,} generator tokens per step; this deployment admits at most "
                       f"{self.max_request_tokens:,}, a {width}x{height} video of {frames} frames with guidance "
                       f"(--generation-max-shape {width}x{height}x{frames})")  # fmt: skip

    def prompt_refusal(self, prompt_tokens: list[int], state_bytes: int) -> tuple[str, str] | None:
        """(field, message) when the request's prompts (`prompt_tokens` per branch), or all it holds on the device,
        exceed what the deployment reserved."""
        if max(prompt_tokens) > self.max_prompt_tokens:
            return "prompt", (f"{max(prompt_tokens):,} prompt tokens; this deployment admits at most "
                              f"{self.max_prompt_tokens:,} per prompt")  # fmt: skip
        if state_bytes > self.state_budget_bytes:
            return "prompt", (f"the request would hold {state_bytes / 2**20:,.0f} MiB on the device; this deployment "
                              f"keeps {self.state_budget_bytes / 2**20:,.0f} MiB for requests in flight")  # fmt: skip
        return None


def capacity(limits: GenerationLimits, geometry: LatentGeometry, kv_cache_tokens: int | None,
             max_model_len: int) -> dict[str, int | None]:  # fmt: skip
    """What one deployment holds at once: chat sequences of full context in vLLM's KV cache, and generation requests
    (with guidance, `TYPICAL_PROMPT_TOKENS` per prompt) in the generator's state budget, per reference shape: 0 where
    the deployment never admits that shape. Jobs past these numbers wait in the queue."""
    width, height, frames = limits.max_shape
    shapes = {f"video_{width}x{height}x{frames}": limits.max_shape, **CAPACITY_SHAPES}
    held: dict[str, int | None] = {
        "chat_sequences_at_max_model_len": None if kv_cache_tokens is None else kv_cache_tokens // max_model_len,
    }
    for name, (shape_w, shape_h, shape_frames) in shapes.items():
        request = GenerationRequest("", num_frames=shape_frames, height=shape_h, width=shape_w, guidance_scale=6.0)
        cost = RequestCost.of(request, geometry)
        state_bytes = cost.state_bytes(2 * TYPICAL_PROMPT_TOKENS, limits.kv_bytes_per_token)
        fits = cost.tokens <= limits.max_request_tokens
        held[f"generation_{name}"] = limits.state_budget_bytes // state_bytes if fits else 0
    return held
