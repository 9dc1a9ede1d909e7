"""A request in flight on the generator: its sequences (one per CFG branch) over its prompts' K/V, its latents and
actions, its own copies of the checkpoint's scheduler, and how it starts.

Initial noise, positions, patching and scheduling follow diffusers' `Cosmos3OmniPipeline`, so for the same seed
the latents and actions equal the reference's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig
from cosmos3_serve.model_executor.generator import GeneratorSequence
from cosmos3_serve.model_executor.kv_export import PromptKV
from cosmos3_serve.model_executor.positions import action_positions, vision_positions
from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.model_executor.results import GenerationOutput
from cosmos3_serve.model_executor.vae_io import latent_shape
from cosmos3_serve.sampling.actions import EMBODIMENT_ACTION_DIMS, EMBODIMENT_DOMAIN_IDS, FORWARD_DYNAMICS, INVERSE_DYNAMICS
from cosmos3_serve.sampling.conditioning import condition_mask
from cosmos3_serve.sampling.flow_unipc import device_scheduler
from cosmos3_serve.sampling.schedulers import repeated_timesteps, scheduler_with_shift


@dataclass
class ActionChunk:
    """The action tokens of an action-mode request and their own copy of the request's scheduler (its multistep
    history is per modality, as in the reference)."""

    latents: torch.Tensor  # [chunk, action_dim] float32; columns from raw_dim on stay 0
    generated: bool  # denoised (policy, inverse dynamics), or given and kept clean (forward dynamics)
    domain: int  # row of the domain-aware action heads
    raw_dim: int  # the embodiment's action width
    scheduler: Any

    def step(self, velocity_ta: torch.Tensor, t: torch.Tensor) -> None:
        velocity = torch.zeros_like(self.latents)
        velocity[:, : self.raw_dim] = velocity_ta[:, : self.raw_dim]
        self.latents = self.scheduler.step(velocity[None], t, self.latents[None], return_dict=False)[0][0]
        self.latents[:, self.raw_dim :] = 0


@dataclass
class DenoisingState:
    """A request in flight: its sequences (one per CFG branch), latents and scheduler."""

    request_id: str
    request: GenerationRequest
    sequences: list[GeneratorSequence]
    positions_3n: torch.Tensor  # positions of all its sequences' tokens, in sequence order
    latents: torch.Tensor  # [1, C, T, H, W] float32
    frame_mask: torch.Tensor  # [T] 1 for clean conditioning latent frames
    noisy: torch.Tensor  # [sequences * tokens] bool, the tokens that get a timestep embedding
    scheduler: Any
    timesteps: torch.Tensor
    actions: ActionChunk | None = None
    step: int = 0

    @property
    def finished(self) -> bool:
        return self.step >= len(self.timesteps)

    @property
    def num_tokens(self) -> int:
        """Generator tokens of one step: all its sequences'."""
        return sum(seq.num_tokens for seq in self.sequences)

    def output(self) -> GenerationOutput:
        """No video in inverse dynamics; the generated actions, cropped to the embodiment's width."""
        video = None if self.request.action_mode == INVERSE_DYNAMICS else self.latents
        actions = None
        if self.actions is not None and self.actions.generated:
            actions = self.actions.latents[:, : self.actions.raw_dim]
        return GenerationOutput(video, actions)


@dataclass(frozen=True)
class StateFactory:
    """Builds the initial `DenoisingState` of admitted requests on one device."""

    config: GeneratorConfig
    vae_config: Any
    scheduler: Any  # the checkpoint's scheduler: every request steps its own copy
    device: torch.device

    def __call__(self, request_id: str, request: GenerationRequest, kvs: list[PromptKV],
                       clean: torch.Tensor | None) -> DenoisingState:  # fmt: skip
        """The request's state; `clean` holds the latents of its conditioning clip (`_conditioning_clip`), if any."""
        scheduler = scheduler_with_shift(self.scheduler, request.flow_shift)
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        problem = repeated_timesteps(scheduler, request.num_inference_steps)
        if problem is not None:
            raise ValueError(f"num_inference_steps: {problem}")
        # Latents and noise stay float32 whatever the tower's precision, as in the reference; the video's noise is
        # drawn first, then the actions'.
        generator = torch.Generator().manual_seed(request.seed)
        actions = None
        if request.action_mode is None:
            latents, mask = self._video_latents(request, generator, clean)
        else:
            latents, mask = self._action_clip_latents(request, generator, clean)
            actions = self._action_chunk(request, generator, device_scheduler(copy.deepcopy(scheduler)))
        patch = self.config.latent_patch_size
        grid = (latents.shape[2], -(-latents.shape[3] // patch), -(-latents.shape[4] // patch))
        temporal = self.vae_config.scale_factor_temporal
        noisy_patches = (mask == 0).repeat_interleave(grid[1] * grid[2])
        chunk, domain = (0, 0) if actions is None else (actions.latents.shape[0], actions.domain)
        noisy_actions = torch.full((chunk,), actions is not None and actions.generated, device=self.device)
        sequences, positions = [], []
        for kv in kvs:  # per sequence: latent patches, then action tokens
            positions += [vision_positions(self.config, grid, kv.num_tokens, request.fps, temporal),
                          action_positions(self.config, chunk, kv.num_tokens, request.fps, temporal)]  # fmt: skip
            sequences.append(GeneratorSequence(math.prod(grid), kv, num_action_tokens=chunk, action_domain=domain))
        return DenoisingState(
            request_id=request_id,
            request=request,
            sequences=sequences,
            positions_3n=torch.cat(positions, dim=1).to(self.device),
            latents=latents,
            frame_mask=mask,
            noisy=torch.cat([noisy_patches, noisy_actions] * len(kvs)),
            scheduler=device_scheduler(scheduler),
            timesteps=scheduler.timesteps,
            actions=actions,
        )


    def _video_latents(
        self, request: GenerationRequest, generator: torch.Generator, clean: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial latents `[1, C, T, H, W]` of a text / image / video -> image / video request, and its `[T]` mask of
        clean conditioning frames."""
        shape = latent_shape(self.vae_config, request)
        mask = condition_mask(shape[2], request.image is not None, request.video is not None,
                              request.condition_frame_indexes).to(self.device)  # fmt: skip
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        if clean is None or not mask.any():
            return noise, mask
        frame_mask = mask.view(-1, 1, 1)
        return frame_mask * clean + (1.0 - frame_mask) * noise, mask

    def _action_clip_latents(
        self, request: GenerationRequest, generator: torch.Generator, clean: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial latents of an action mode's clip (`clean`: its content's latents; the canvas' padding was encoded,
        then dropped): clean at the first latent frame (every frame in inverse dynamics), noise elsewhere."""
        mask = torch.zeros(clean.shape[2], device=self.device)
        mask[: clean.shape[2] if request.action_mode == INVERSE_DYNAMICS else 1] = 1.0
        noise = randn_tensor(clean.shape, generator=generator, device=self.device, dtype=torch.float32)
        frame_mask = mask.view(-1, 1, 1)
        return frame_mask * clean + (1.0 - frame_mask) * noise, mask

    def _action_chunk(self, request: GenerationRequest, generator: torch.Generator, scheduler) -> ActionChunk:
        """Initial action tokens, zero-padded to the head's width: the given actions in forward dynamics (a shorter
        sequence repeats its last action, a longer one is cut), noise otherwise."""
        chunk, raw_dim = request.action_chunk_size, EMBODIMENT_ACTION_DIMS[request.action_domain]
        noise = randn_tensor((chunk, self.config.action_dim), generator=generator, device=self.device,
                             dtype=torch.float32)  # fmt: skip
        generated = request.action_mode != FORWARD_DYNAMICS
        if generated:
            latents = noise
        else:
            given = torch.as_tensor(np.asarray(request.actions), dtype=torch.float32, device=self.device)
            latents = F.pad(given[torch.arange(chunk).clamp(max=given.shape[0] - 1)], (0, noise.shape[1] - raw_dim))
        latents[:, raw_dim:] = 0
        return ActionChunk(latents=latents, generated=generated, domain=EMBODIMENT_DOMAIN_IDS[request.action_domain],
                           raw_dim=raw_dim, scheduler=scheduler)  # fmt: skip


def guided(request: GenerationRequest, branches: list[torch.Tensor]) -> torch.Tensor:
    """Classifier-free guidance of (conditional[, unconditional]) velocities."""
    if not request.uses_cfg:
        return branches[0]
    return branches[1] + request.guidance_scale * (branches[0] - branches[1])
