"""Text -> image and text -> video on the generator tower, conditioned on the reasoner's exported prompt K/V.

`DiffusionExecutor` is the worker-side half of the generator sidecar (`worker_extension` puts it in vLLM's
worker; `generation_client` drives it). Requests are denoised together: every step is one packed generator
forward over every sequence (request x CFG branch) in flight, whatever their resolutions, frame counts and step
counts, followed by each request's guidance combine and flow-matching scheduler step (the checkpoint's own
scheduler, one copy per request). A finished or cancelled request leaves the batch at the next step and its K/V
are released. The reasoner does not run during denoising. Initial noise, positions, patching and scheduling
follow diffusers' `Cosmos3OmniPipeline`, so for the same seed the latents equal the reference's.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import diffusers
from diffusers import AutoencoderKLWan
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from cosmos3_serve.model_executor import kv_export
from cosmos3_serve.model_executor.generator import (
    Cosmos3GeneratorTower,
    GeneratorConfig,
    GeneratorSequence,
    PackedBatch,
    iter_transformer_weights,
)
from cosmos3_serve.sampling.conditioning import condition_mask, conditioning_clip
from cosmos3_serve.sampling.prompts import (
    PromptSpec,
)

@dataclass(frozen=True, eq=False)
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    num_frames: int = 1  # 4k + 1; 1 is an image
    height: int = 720
    width: int = 1280
    fps: float = 24.0
    num_inference_steps: int = 35
    guidance_scale: float = 6.0
    seed: int = 0
    image: Image.Image | None = None  # image -> video: the first frame
    video: list[Image.Image] | None = None  # video -> video: leading frames
    condition_frame_indexes: tuple[int, ...] = (0, 1)  # latent frames kept clean in video -> video
    # Reason-then-generate (off by default): the reasoner first answers the conditional prompt (up to
    # `reasoning_max_tokens`, greedy), and the generator is conditioned on prompt + answer.
    reason_first: bool = False
    reasoning_max_tokens: int = 256

    def invalid_field(self) -> tuple[str, str] | None:
        """(field, message) for the first invalid field, or None."""
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            return "num_frames", f"must be 4k + 1 (1, 5, 9, ...), got {self.num_frames}"
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                return name, f"must be a positive multiple of 16, got {value}"
        if self.num_inference_steps < 1:
            return "num_inference_steps", f"must be >= 1, got {self.num_inference_steps}"
        if self.fps <= 0:
            return "fps", f"must be > 0, got {self.fps}"
        if self.image is not None and self.video is not None:
            return "video", "give either an image (image -> video) or a video (video -> video), not both"
        if (self.image is not None or self.video is not None) and self.num_frames == 1:
            return "num_frames", "image / video conditioning generates a video: num_frames must be > 1"
        return None

    @property
    def spec(self) -> PromptSpec:
        return PromptSpec(num_frames=self.num_frames, height=self.height, width=self.width, fps=self.fps)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0


def load_scheduler(checkpoint: Path):
    """The checkpoint's flow-matching scheduler: UniPC multistep, or Euler for distilled checkpoints."""
    class_name = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, class_name).from_pretrained(checkpoint, subfolder="scheduler")


def vision_positions(
    config: GeneratorConfig, grid_thw: tuple[int, int, int], und_len: int, fps: float, temporal_compression: int
) -> torch.Tensor:
    """mRoPE positions `[3, T*H*W]` of the generator tokens that follow a prompt of `und_len` tokens."""
    grid_t, grid_h, grid_w = grid_thw
    offset = und_len + config.unified_3d_mrope_temporal_modality_margin
    frames = torch.arange(grid_t, dtype=torch.float32)
    if config.enable_fps_modulation and grid_t > 1:  # time in units of the base frame rate
        t = frames / (fps / temporal_compression) * (config.base_fps / temporal_compression) + offset
    else:
        t = frames + int(offset)
    h = torch.arange(grid_h, dtype=torch.float32)
    w = torch.arange(grid_w, dtype=torch.float32)
    if not config.unified_3d_mrope_reset_spatial_ids:
        h, w = h + int(offset), w + int(offset)
    return torch.stack(
        [
            t.view(-1, 1, 1).expand(grid_t, grid_h, grid_w).flatten(),
            h.view(1, -1, 1).expand(grid_t, grid_h, grid_w).flatten(),
            w.view(1, 1, -1).expand(grid_t, grid_h, grid_w).flatten(),
        ]
    )


def patchify(latents_cthw: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, T, H, W] -> [T * ceil(H/p) * ceil(W/p), p * p * C]; H and W are zero-padded to multiples of p."""
    c, t, h, w = latents_cthw.shape
    x = F.pad(latents_cthw, (0, -w % patch, 0, -h % patch))
    x = x.reshape(c, t, x.shape[2] // patch, patch, x.shape[3] // patch, patch)
    return torch.einsum("cthpwq->thwpqc", x).reshape(-1, patch * patch * c)


def unpatchify(tokens: torch.Tensor, shape_cthw: tuple[int, int, int, int], patch: int) -> torch.Tensor:
    """Inverse of `patchify`, cropping the padding."""
    c, t, h, w = shape_cthw
    hp, wp = -(-h // patch), -(-w // patch)
    x = tokens.reshape(t, hp, wp, patch, patch, c)
    return torch.einsum("thwpqc->cthpwq", x).reshape(c, t, hp * patch, wp * patch)[:, :, :h, :w]


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
    step: int = 0

    @property
    def finished(self) -> bool:
        return self.step >= len(self.timesteps)


class DiffusionExecutor:
    """The generator sidecar inside a vLLM worker: tower, VAE, scheduler template and the requests in flight.

    It lives next to the reasoner's model runner (same process, device and tensor-parallel group), so a request
    enters with the keys under which `kv_export` stored its prompts' K/V and nothing crosses a process boundary.
    Every `step()` is one packed forward over all requests in flight; a request that finishes waits in
    `finished` until the driver takes it. The driver (`generation_client`) talks to it through
    `worker_extension.Cosmos3WorkerExtension`."""

    def __init__(self, checkpoint: str | Path, vllm_config, device: torch.device):
        from vllm.config import CompilationConfig, set_current_vllm_config
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        checkpoint = Path(checkpoint)
        self.config = GeneratorConfig.from_checkpoint(checkpoint)
        self.device, self.dtype = torch.device(device), vllm_config.model_config.dtype
        # The tower runs eagerly: build it with vLLM's fused kernels (norms, SiLU), whatever the engine compiles.
        tower_config = copy.copy(vllm_config)
        tower_config.compilation_config = CompilationConfig(custom_ops=["all"])
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:  # vLLM's layers read these settings and allocate in the default dtype
            with set_current_vllm_config(tower_config), self.device:
                tower = Cosmos3GeneratorTower(self.config)
        finally:
            torch.set_default_dtype(default_dtype)
        tower.load_weights(iter_transformer_weights(checkpoint))
        process_weights_after_loading(tower, vllm_config.model_config, self.device)  # quantization, CPU packing
        self.tower = tower.eval()
        self.vae = AutoencoderKLWan.from_pretrained(checkpoint, subfolder="vae").to(self.device).eval()
        self.scheduler = load_scheduler(checkpoint)
        self.active: list[DenoisingState] = []
        self.finished: dict[str, torch.Tensor] = {}  # request id -> final latents, until taken
        self._packed: PackedBatch | None = None  # layout of `active`, rebuilt when membership changes

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int, int]:
        vae = self.vae.config
        latent_t = (request.num_frames - 1) // vae.scale_factor_temporal + 1
        return (1, vae.z_dim, latent_t, request.height // vae.scale_factor_spatial,
                request.width // vae.scale_factor_spatial)  # fmt: skip

    @torch.no_grad()
    def admit(self, request_id: str, request: GenerationRequest, prompt_kvs: list[kv_export.PromptKV]) -> None:
        """Add a request whose prompts (conditional, then unconditional with CFG) were prefilled as `prompt_kvs`."""
        if request_id in self or len(prompt_kvs) != (2 if request.uses_cfg else 1):
            raise ValueError(f"request {request_id!r}: already admitted, or wrong number of prompt K/V")
        kvs = [kv.to(self.device) for kv in prompt_kvs]
        self.active.append(self._initial_state(request_id, request, kvs))
        self._packed = None

    def cancel(self, request_id: str) -> bool:
        """Drop a request (in flight or finished); its K/V and latents are released. False if unknown."""
        found = [state for state in self.active if state.request_id == request_id]
        for state in found:
            self.active.remove(state)
            self._packed = None
        return bool(found) or self.finished.pop(request_id, None) is not None

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.finished or any(state.request_id == request_id for state in self.active)

    @torch.no_grad()
    def step(self) -> list[tuple[str, int, int]]:
        """One packed forward and scheduler step for every request in flight: (request id, steps done, total)."""
        if not self.active:
            return []
        self._step(self.active)
        progress = []
        for state in list(self.active):
            progress.append((state.request_id, state.step, len(state.timesteps)))
            if state.finished:
                self.active.remove(state)
                self.finished[state.request_id] = state.latents
                self._packed = None
        return progress

    def take(self, request_id: str) -> torch.Tensor:
        """The final latents `[1, z_dim, T, H/16, W/16]` of a finished request (normalised, as the reference)."""
        return self.finished.pop(request_id)

    def _initial_state(self, request_id: str, request: GenerationRequest, kvs: list[kv_export.PromptKV]) -> DenoisingState:
        shape = self.latent_shape(request)
        patch = self.config.latent_patch_size
        grid = (shape[2], -(-shape[3] // patch), -(-shape[4] // patch))
        tokens = grid[0] * grid[1] * grid[2]
        temporal = self.vae.config.scale_factor_temporal
        positions = torch.cat([vision_positions(self.config, grid, kv.num_tokens, request.fps, temporal) for kv in kvs],
                              dim=1)  # fmt: skip
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        generator = torch.Generator().manual_seed(request.seed)
        mask = condition_mask(shape[2], request.image is not None, request.video is not None,
                              request.condition_frame_indexes).to(self.device)  # fmt: skip
        # Latents and noise stay float32 whatever the tower's precision, as in the reference.
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        frame_mask = mask.view(-1, 1, 1)
        latents = noise
        if mask.any():  # only conditioned requests need the VAE encoder (the reference encodes zeros otherwise)
            clean = self.encode(conditioning_clip(request.num_frames, request.height, request.width, request.image,
                                                  request.video, request.condition_frame_indexes))  # fmt: skip
            latents = frame_mask * clean + (1.0 - frame_mask) * noise
        noisy = (mask == 0).repeat_interleave(grid[1] * grid[2]).repeat(len(kvs))
        return DenoisingState(
            request_id=request_id,
            request=request,
            sequences=[GeneratorSequence(tokens, kv) for kv in kvs],
            positions_3n=positions.to(self.device),
            latents=latents,
            frame_mask=mask,
            noisy=noisy,
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
        )

    @torch.no_grad()
    def encode(self, clip: torch.Tensor) -> torch.Tensor:
        """Normalised latents of a `[1, 3, T, H, W]` clip in [-1, 1] (the VAE's distribution mode)."""
        vae = self.vae.config
        mean = torch.tensor(vae.latents_mean, device=self.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.latents_std, device=self.device).view(1, -1, 1, 1, 1)
        raw = self.vae.encode(clip.to(self.device, self.vae.dtype)).latent_dist.mode()
        return ((raw - mean) / std).float()

    def _packed_batch(self, active: list[DenoisingState]) -> PackedBatch:
        if self._packed is None:
            positions = torch.cat([state.positions_3n for state in active], dim=1)
            sequences = [seq for state in active for seq in state.sequences]
            self._packed = self.tower.pack(positions, sequences)
        return self._packed

    def _step(self, active: list[DenoisingState]) -> None:
        """One packed generator forward for every sequence of every active request, then each request's step."""
        patch = self.config.latent_patch_size
        tokens, timesteps = [], []
        for state in active:
            patches = patchify(state.latents[0].to(self.dtype), patch)
            t = state.timesteps[state.step].item()
            for _ in state.sequences:
                tokens.append(patches)
                timesteps.append(torch.full((patches.shape[0],), t, device=self.device))
        noisy = torch.cat([state.noisy for state in active])
        velocity = self.tower(torch.cat(tokens), torch.cat(timesteps), noisy, self._packed_batch(active)).float()

        offset = 0
        for state in active:
            n = state.sequences[0].num_tokens
            branches = [unpatchify(velocity[offset + i * n : offset + (i + 1) * n], state.latents.shape[1:], patch)
                        for i in range(len(state.sequences))]  # fmt: skip
            offset += n * len(state.sequences)
            keep = (1.0 - state.frame_mask).view(1, -1, 1, 1)  # clean conditioning frames get no velocity
            branches = [branch * keep for branch in branches]
            guided = branches[0]
            if state.request.uses_cfg:
                guided = branches[1] + state.request.guidance_scale * (branches[0] - branches[1])
            t = state.timesteps[state.step]
            state.latents = state.scheduler.step(guided[None, None], t, state.latents[None], return_dict=False)[0]
            state.latents = state.latents.squeeze(0)
            state.step += 1

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 frames `[T, H, W, 3]` from normalised latents."""
        vae = self.vae.config
        mean = torch.tensor(vae.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
        video = self.vae.decode(latents.to(self.vae.dtype) * std + mean).sample  # [1, 3, T, H, W] in [-1, 1]
        frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return frames.permute(1, 2, 3, 0)
