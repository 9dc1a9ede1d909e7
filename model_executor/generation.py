"""Generation on the generator tower, conditioned on the reasoner's exported prompt K/V: text / image / video ->
image / video, and the action modes (forward dynamics, policy, inverse dynamics: `sampling.actions`).

`DiffusionExecutor` is the worker-side half of the generator sidecar (`worker_extension` puts it in vLLM's
worker; `generation_client` drives it). Requests are denoised together: every step is one packed generator
forward over every sequence (request x CFG branch) in flight, whatever their modes, resolutions, frame counts and
step counts, followed by each request's guidance combine and flow-matching scheduler step (the checkpoint's own
scheduler, one copy per request and one more for its action tokens; UniPC steps as `sampling.flow_unipc` computes
them, without host syncs). A finished or cancelled request leaves the batch at the next step and its K/V are
released. The reasoner does not run during denoising. Initial noise, positions, patching and scheduling follow
diffusers' `Cosmos3OmniPipeline`, so for the same seed the latents and actions equal the reference's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import diffusers
from diffusers import AutoencoderKLWan
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch.profiler import record_function

from cosmos3_serve.model_executor import kv_export
from cosmos3_serve.model_executor.generator import (
    GRAPH_MAX_TOKENS,
    CapturedForward,
    Cosmos3GeneratorTower,
    ForwardGraphs,
    GeneratorConfig,
    GeneratorSequence,
    PackedBatch,
    batch_signature,
    iter_transformer_weights,
)
from cosmos3_serve.model_executor.results import GenerationOutput, PendingResults
from cosmos3_serve.model_executor.vae_graphs import VaeDecoder
from cosmos3_serve.sampling.actions import (
    ACTION_MODES,
    EMBODIMENT_ACTION_DIMS,
    EMBODIMENT_DOMAIN_IDS,
    FORWARD_DYNAMICS,
    INVERSE_DYNAMICS,
    RESOLUTION_BINS,
    VIEW_POINT_FRAMING,
    canvas_size,
)
from cosmos3_serve.sampling.conditioning import (
    action_conditioning_clip,
    action_source_size,
    condition_mask,
    conditioning_clip,
)
from cosmos3_serve.sampling.flow_unipc import device_scheduler
from cosmos3_serve.sampling.prompts import PromptSpec

logger = logging.getLogger(__name__)

# Generator tokens per denoising step (`DiffusionExecutor.next_batch`). On an H200 the Nano tower's eager forward
# keeps the GPU busy from about 2,000 tokens on, where its GEMMs already run near their peak (docs/benchmarks.md).
DEFAULT_MAX_BATCH_TOKENS = 2048


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
    flow_shift: float | None = None  # shift of the flow-matching schedule; None keeps the checkpoint's
    seed: int = 0
    image: Image.Image | None = None  # image -> video: the first frame
    video: list[Image.Image] | None = None  # video -> video: leading frames
    condition_frame_indexes: tuple[int, ...] = (0, 1)  # latent frames kept clean in video -> video
    # Reason-then-generate (off by default): the reasoner first answers the conditional prompt (up to
    # `reasoning_max_tokens`, greedy), and the generator is conditioned on prompt + answer.
    reason_first: bool = False
    reasoning_max_tokens: int = 256
    # Action modes (`sampling.actions`, checkpoints with an action head). The clip is `action_chunk_size + 1` frames
    # on a canvas of `action_resolution_tier` (`num_frames`, `height` and `width` are not read); `image` or `video`
    # is the conditioning clip (only its first frame conditions forward dynamics and policy), a video for inverse
    # dynamics. The prompt describes the action; the negative prompt goes in without templates.
    action_mode: str | None = None  # "forward_dynamics", "policy" or "inverse_dynamics"
    action_domain: str | None = None  # the embodiment, e.g. "bridge_orig_lerobot"
    action_chunk_size: int | None = None  # action steps; the clip has one frame more
    actions: np.ndarray | None = None  # forward dynamics: [T, raw_action_dim]; a shorter T repeats the last row
    action_resolution_tier: int = 480  # 256, 480, 704 or 720
    action_view_point: str | None = "ego_view"  # framing sentence of the caption; None leaves it out

    def invalid_field(self) -> tuple[str, str] | None:
        """(field, message) for the first invalid field, or None."""
        if self.num_inference_steps < 1:
            return "num_inference_steps", f"must be >= 1, got {self.num_inference_steps}"
        if self.fps <= 0:
            return "fps", f"must be > 0, got {self.fps}"
        if self.flow_shift is not None and self.flow_shift <= 0:
            return "flow_shift", f"must be > 0, got {self.flow_shift}"
        if self.image is not None and self.video is not None:
            return "video", "give either an image (image -> video) or a video (video -> video), not both"
        return self._invalid_action_field() if self.action_mode is not None else self._invalid_media_field()

    def _invalid_media_field(self) -> tuple[str, str] | None:
        for name in ("action_domain", "action_chunk_size", "actions"):
            if getattr(self, name) is not None:
                return name, f"needs an action_mode ({', '.join(ACTION_MODES)})"
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            return "num_frames", f"must be 4k + 1 (1, 5, 9, ...), got {self.num_frames}"
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                return name, f"must be a positive multiple of 16, got {value}"
        if (self.image is not None or self.video is not None) and self.num_frames == 1:
            return "num_frames", "image / video conditioning generates a video: num_frames must be > 1"
        return None

    def _invalid_action_field(self) -> tuple[str, str] | None:
        if self.action_mode not in ACTION_MODES:
            return "action_mode", f"must be one of {', '.join(ACTION_MODES)}, got {self.action_mode!r}"
        if self.action_domain not in EMBODIMENT_ACTION_DIMS:
            return "action_domain", (f"must be an embodiment with a fixed action width "
                                     f"({', '.join(sorted(EMBODIMENT_ACTION_DIMS))}), got {self.action_domain!r}")  # fmt: skip
        if self.action_chunk_size is None or self.action_chunk_size < 1:
            return "action_chunk_size", f"must be >= 1 for an action mode, got {self.action_chunk_size}"
        if self.action_resolution_tier not in RESOLUTION_BINS:
            return "action_resolution_tier", (f"must be one of {', '.join(map(str, RESOLUTION_BINS))}, "
                                              f"got {self.action_resolution_tier}")  # fmt: skip
        if self.action_view_point is not None and self.action_view_point not in VIEW_POINT_FRAMING:
            return "action_view_point", (f"must be one of {', '.join(VIEW_POINT_FRAMING)} (or none), "
                                         f"got {self.action_view_point!r}")  # fmt: skip
        if self.reason_first:
            return "reason_first", "is not available in action modes"
        if self.action_mode == INVERSE_DYNAMICS and self.video is None:
            return "video", "inverse_dynamics needs the video whose actions it infers"
        if self.image is None and self.video is None:
            return "image", f"{self.action_mode} needs a conditioning image (or video)"
        frames = self.action_frames
        if any(frame.size != frames[0].size for frame in frames):
            return "video", "the frames of an action clip must all have the same size"
        if min(frames[0].size) < 16:
            return "video" if self.video is not None else "image", f"must be at least 16x16, got {frames[0].size}"
        return self._invalid_given_actions()

    def _invalid_given_actions(self) -> tuple[str, str] | None:
        if self.action_mode != FORWARD_DYNAMICS:
            return None if self.actions is None else ("actions", "only forward_dynamics takes actions")
        width = EMBODIMENT_ACTION_DIMS[self.action_domain]
        if self.actions is None:
            return "actions", f"forward_dynamics needs actions [T, {width}]"
        actions = np.asarray(self.actions)
        if actions.ndim != 2 or actions.shape[0] < 1 or actions.shape[1] != width:
            return "actions", f"must be [T >= 1, {width}] for {self.action_domain!r}, got shape {list(actions.shape)}"
        if not np.isfinite(actions).all():
            return "actions", "must be finite"
        return None

    def unfit_field(self, config: GeneratorConfig) -> tuple[str, str] | None:
        """(field, message) when a checkpoint of this generator config cannot serve the request (its action head)."""
        if self.action_mode is None:
            return None
        if config.action_dim is None:
            return "action_mode", "this checkpoint has no action head"
        width, domain = EMBODIMENT_ACTION_DIMS[self.action_domain], EMBODIMENT_DOMAIN_IDS[self.action_domain]
        if width > config.action_dim or domain >= config.num_embodiment_domains:
            return "action_domain", (f"{self.action_domain!r} (domain {domain}, {width} wide) does not fit this "
                                     f"checkpoint's action head ({config.num_embodiment_domains} domains, "
                                     f"{config.action_dim} wide)")  # fmt: skip
        return None

    def validate(self, config: GeneratorConfig) -> None:
        """Raise ValueError naming the first field that is invalid or that this checkpoint cannot serve."""
        invalid = self.invalid_field() or self.unfit_field(config)
        if invalid is not None:
            raise ValueError(f"{invalid[0]}: {invalid[1]}")

    @property
    def action_frames(self) -> list[Image.Image]:
        """The conditioning clip of an action mode (an image is a clip of one frame)."""
        return self.video if self.video is not None else [self.image]

    @property
    def action_canvas(self) -> tuple[int, int]:
        """(height, width) of an action mode's canvas."""
        return canvas_size(action_source_size(self.action_frames), self.action_resolution_tier)

    @property
    def spec(self) -> PromptSpec:
        if self.action_mode is not None:
            height, width = self.action_canvas
            return PromptSpec(num_frames=self.action_chunk_size + 1, height=height, width=width, fps=self.fps)
        return PromptSpec(num_frames=self.num_frames, height=self.height, width=self.width, fps=self.fps)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0


def load_scheduler(checkpoint: Path):
    """The checkpoint's flow-matching scheduler: UniPC multistep, or Euler for distilled checkpoints."""
    class_name = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, class_name).from_pretrained(checkpoint, subfolder="scheduler")


def scheduler_with_shift(template, flow_shift: float | None):
    """A fresh copy of the scheduler `template`, its flow shift replaced when `flow_shift` is given (UniPC calls
    it `flow_shift`, Euler `shift`)."""
    if flow_shift is None:
        return copy.deepcopy(template)
    key = "flow_shift" if "flow_shift" in template.config else "shift"
    return type(template).from_config(template.config, **{key: flow_shift})


def repeated_timesteps(scheduler, num_inference_steps: int) -> str | None:
    """Why `scheduler` (timesteps set) cannot run: a schedule of integer timesteps that repeats one (many steps at a
    large flow shift) makes diffusers' multistep solver fail on its last step. None when it can."""
    distinct = len(torch.unique(scheduler.timesteps))
    if distinct == len(scheduler.timesteps):
        return None
    return (f"the flow schedule has only {distinct} distinct timesteps at {num_inference_steps} steps; "
            f"ask for at most {distinct} steps or a smaller flow_shift")


def invalid_schedule(template, request: GenerationRequest) -> tuple[str, str] | None:
    """(field, message) when the schedule of `request` built from the scheduler `template` cannot run."""
    scheduler = scheduler_with_shift(template, request.flow_shift)
    scheduler.set_timesteps(request.num_inference_steps)
    problem = repeated_timesteps(scheduler, request.num_inference_steps)
    return None if problem is None else ("num_inference_steps", problem)


def vision_positions(
    config: GeneratorConfig, grid_thw: tuple[int, int, int], und_len: int, fps: float, temporal_compression: int
) -> torch.Tensor:
    """mRoPE positions `[3, T*H*W]` of the latent patches that follow a prompt of `und_len` tokens."""
    offset = und_len + config.unified_3d_mrope_temporal_modality_margin
    times = step_times(config, grid_thw[0], offset, fps, temporal_compression, temporal_compression)
    return _grid_positions(config, times, grid_thw[1], grid_thw[2], offset)


def action_positions(
    config: GeneratorConfig, chunk_size: int, und_len: int, fps: float, temporal_compression: int
) -> torch.Tensor:
    """mRoPE positions `[3, chunk_size]` of an action chunk after a prompt of `und_len` tokens: one source frame per
    action, action k at the time of the frame it leads to (k + 1), on the latent frames' time scale."""
    offset = und_len + config.unified_3d_mrope_temporal_modality_margin
    times = step_times(config, chunk_size, offset, fps, 1, temporal_compression, first=1)
    return _grid_positions(config, times, 1, 1, offset)


def step_times(
    config: GeneratorConfig, steps: int, offset: int, fps: float, frames_per_step: int, base_frames_per_step: int,
    first: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Temporal positions `[steps]` of steps spanning `frames_per_step` source frames each, from step `first`.

    With fps modulation (and more than one step) time is measured in steps of `base_frames_per_step` frames at
    the base frame rate, else it counts steps."""
    indexes = torch.arange(steps, dtype=torch.float32) + first
    if config.enable_fps_modulation and steps > 1:
        return indexes / (fps / frames_per_step) * (config.base_fps / base_frames_per_step) + offset
    return indexes + int(offset)


def _grid_positions(config: GeneratorConfig, times_t: torch.Tensor, grid_h: int, grid_w: int, offset: int) -> torch.Tensor:
    """`[3, T*H*W]` positions of a T x H x W token grid at temporal positions `times_t`."""
    grid_t = times_t.shape[0]
    h = torch.arange(grid_h, dtype=torch.float32)
    w = torch.arange(grid_w, dtype=torch.float32)
    if not config.unified_3d_mrope_reset_spatial_ids:
        h, w = h + int(offset), w + int(offset)
    return torch.stack(
        [
            times_t.view(-1, 1, 1).expand(grid_t, grid_h, grid_w).flatten(),
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
class ConditioningClip:
    """Pixels the VAE encodes for a request's clean latent frames.

    The VAE is causal in time (its first latent frame sees the first pixel frame, each later one four more), so
    clean frames that lead the clip need only the pixel frames up to the last of them: an image-conditioned video
    or a policy request encodes one frame, not the whole clip; the rest of the latents are noise anyway."""

    pixels: torch.Tensor  # [1, 3, T, H, W] in [-1, 1], T = 1 + temporal * (clean latent frames - 1)
    latent_frames: int  # latent frames of the whole clip
    content_hw: tuple[int, int]  # latent (height, width) to keep: an action canvas' content, without its padding

    def latents(self, encoded: torch.Tensor) -> torch.Tensor:
        """`[1, C, latent_frames, h, w]` of the encoded prefix: the content kept, zeros after the encoded frames."""
        content = encoded[:, :, :, : self.content_hw[0], : self.content_hw[1]]
        return F.pad(content, (0, 0, 0, 0, 0, self.latent_frames - content.shape[2]))


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


# Names of the profiler ranges around the executor's work (`torch.profiler.record_function`): a trace of the worker
# (`cosmos3-serve serve --profile-dir`) shows each denoising step and each VAE batch as one range, on the host and,
# on CUDA, over the GPU kernels it launched.
PROFILE_RANGES = {"denoise": "cosmos3::denoise_step", "encode": "cosmos3::vae_encode", "decode": "cosmos3::vae_decode",
                  "admit": "cosmos3::admit", "capture": "cosmos3::graph_capture"}  # admit holds the VAE encode
# A batch whose signature (its sequences' token counts) was captured before replays that CUDA graph from its first
# step (`ForwardGraphs`). Else it runs its first step eagerly; at its second it is captured (`CapturedForward`:
# recorded, not run) and replayed from then on, if it has at least GRAPH_MIN_REPLAYS steps left, that one included.
# A capture costs about one eager forward of host time and no GPU time, a replay saves the host's launches of one (up
# to half of a small batch's step: docs/benchmarks.md): a 4-step policy batch of a new signature is one eager step, a
# capture and three replays, and four replays from then on.
GRAPH_MIN_REPLAYS = 3


@dataclass
class BatchPlan:
    """What the executor keeps of the batch it stepped last, for as long as the same requests step together: their
    packed layout (rotary tables, attention over their prompt K/V) and their forward's CUDA graph, if it has one
    (then the layout is the graph's)."""

    states: list[DenoisingState]
    layout: PackedBatch
    graph: CapturedForward | None = None
    eager_steps: int = 0

    def serves(self, batch: list[DenoisingState]) -> bool:
        """Whether `batch` is the same requests, in the same order."""
        return len(self.states) == len(batch) and all(a is b for a, b in zip(self.states, batch))


class DiffusionExecutor:
    """The generator sidecar inside a vLLM worker: tower, VAE, scheduler template and the requests in flight.

    It lives next to the reasoner's model runner (same process, device and tensor-parallel group), so a request
    enters with the keys under which `kv_export` stored its prompts' K/V and nothing crosses a process boundary.
    Every `step()` is one packed forward over all requests in flight; a request that finishes waits in
    `finished` until the driver takes it. The driver (`generation_client`) talks to it through
    `worker_extension.Cosmos3WorkerExtension`."""

    def __init__(self, checkpoint: str | Path, vllm_config, device: torch.device,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, vae_dtype: torch.dtype = torch.float32):  # fmt: skip
        from vllm.config import CompilationConfig, set_current_vllm_config
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        checkpoint = Path(checkpoint)
        self.config = GeneratorConfig.from_checkpoint(checkpoint)
        self.device, self.dtype = torch.device(device), vllm_config.model_config.dtype
        # The tower is not compiled (eager, or a CUDA graph of eager kernels): build it with vLLM's fused kernels
        # (norms, SiLU), whatever the engine compiles.
        tower_config = copy.copy(vllm_config)
        tower_config.compilation_config = CompilationConfig(custom_ops=["all"])
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:  # vLLM's layers read these settings and allocate in the default dtype
            with set_current_vllm_config(tower_config), self.device:
                tower = Cosmos3GeneratorTower(self.config, vllm_config.quant_config)
        finally:
            torch.set_default_dtype(default_dtype)
        if vllm_config.load_config.load_format == "dummy":  # configs-only checkpoints (benchmarks): random weights
            from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

            DummyModelLoader(vllm_config.load_config).load_weights(tower, vllm_config.model_config)
            vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(checkpoint, subfolder="vae"))
        else:
            tower.load_weights(iter_transformer_weights(checkpoint))
            vae = AutoencoderKLWan.from_pretrained(checkpoint, subfolder="vae")
        process_weights_after_loading(tower, vllm_config.model_config, self.device)  # quantization, CPU packing
        self.tower = tower.eval()
        self.vae = vae.to(self.device, vae_dtype).eval()  # float32 by default, whatever the towers' precision
        self.vae_decoder = VaeDecoder(self.vae, use_graphs=not vllm_config.model_config.enforce_eager)
        self.scheduler = load_scheduler(checkpoint)
        self.active: list[DenoisingState] = []
        self.finished: dict[str, GenerationOutput] = {}  # request id -> result, until taken
        self.pending: list[PendingResults] = []  # taken results on their way to the host (`collect`), oldest first
        self._normalization: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # `_latent_normalization`
        self.max_batch_tokens = max_batch_tokens
        self._plan: BatchPlan | None = None  # of the batch stepped last
        self.use_cuda_graphs = self.device.type == "cuda" and not vllm_config.model_config.enforce_eager
        self.forward_graphs = ForwardGraphs()

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int, int]:
        vae = self.vae.config
        latent_t = (request.num_frames - 1) // vae.scale_factor_temporal + 1
        return (1, vae.z_dim, latent_t, request.height // vae.scale_factor_spatial,
                request.width // vae.scale_factor_spatial)  # fmt: skip

    @torch.no_grad()
    def admit(self, entries: list[tuple[str, GenerationRequest, list[kv_export.PromptKV]]]) -> dict[str, str]:
        """Add requests whose prompts (conditional, then unconditional with CFG) were prefilled as their prompt K/V.
        Conditioning clips of the same shape go through the VAE encoder in one batch. Returns an error message per
        request that could not be admitted (the others are admitted)."""
        with record_function(PROFILE_RANGES["admit"]):
            return self._admit(entries)

    def _admit(self, entries: list[tuple[str, GenerationRequest, list[kv_export.PromptKV]]]) -> dict[str, str]:
        errors, admissible = {}, []
        for request_id, request, prompt_kvs in entries:
            try:
                if request_id in self or len(prompt_kvs) != (2 if request.uses_cfg else 1):
                    raise ValueError(f"request {request_id!r}: already admitted, or wrong number of prompt K/V")
                request.validate(self.config)
                admissible.append((request_id, request, [kv.to(self.device) for kv in prompt_kvs]))
            except ValueError as exc:
                errors[request_id] = str(exc)
        clips = {request_id: self._conditioning_clip(request) for request_id, request, _ in admissible}
        encoded = self._encode_by_shape({i: clip.pixels for i, clip in clips.items() if clip is not None})
        clean = {request_id: clips[request_id].latents(latents) for request_id, latents in encoded.items()}
        for request_id, request, kvs in admissible:
            try:
                self.active.append(self._initial_state(request_id, request, kvs, clean.get(request_id)))
            except ValueError as exc:
                errors[request_id] = str(exc)
        return errors

    def cancel(self, request_id: str) -> bool:
        """Drop a request (in flight or finished); its K/V and latents are released. False if unknown."""
        found = [state for state in self.active if state.request_id == request_id]
        for state in found:
            self.active.remove(state)
        in_transit = [pending for pending in self.pending if pending.outputs.pop(request_id, None) is not None]
        return bool(found or in_transit) or self.finished.pop(request_id, None) is not None

    def __contains__(self, request_id: str) -> bool:
        return (request_id in self.finished or any(state.request_id == request_id for state in self.active)
                or any(request_id in pending.outputs for pending in self.pending))  # fmt: skip

    @torch.no_grad()
    def step(self) -> list[tuple[str, int, int]]:
        """One packed forward and scheduler step for the next batch (`next_batch`): (request id, steps done, total)
        of each request in it."""
        batch = self.next_batch()
        progress = []
        if batch:
            queued = self._mark_stream()
            with record_function(PROFILE_RANGES["denoise"]):
                self._step(batch)
            if queued is not None:  # one step in flight: the work before it is done when this returns
                queued.synchronize()
        for state in batch:
            progress.append((state.request_id, state.step, len(state.timesteps)))
            if state.finished:
                self.active.remove(state)
                self.finished[state.request_id] = state.output()
        if not self.active:  # idle: release the last batch's layout (its prompt K/V; a graph's stays for reuse)
            self._plan = None
        return progress

    def _mark_stream(self) -> torch.cuda.Event | None:
        """An event after the work queued so far on the device (None on the CPU, where nothing is queued)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def next_batch(self) -> list[DenoisingState]:
        """The requests in flight, in arrival order, up to `max_batch_tokens` generator tokens (at least one).

        Beyond a few thousand tokens a step's GEMMs run at their peak: a bigger batch only makes every request in it
        wait for the others' work (the throughput stays), so later arrivals wait for a place in the batch instead.
        """
        batch, tokens = [], 0
        for state in self.active:
            if batch and tokens + state.num_tokens > self.max_batch_tokens:
                break
            batch.append(state)
            tokens += state.num_tokens
        return batch

    @torch.no_grad()
    def take(self, request_ids: list[str], decode: bool) -> dict[str, GenerationOutput]:
        """The results of finished requests, forgotten here: video latents (normalised, as the reference), or uint8
        frames `[T, H, W, 3]` with `decode` (videos of the same shape decoded in one VAE batch), and / or actions."""
        outputs = {request_id: self.finished.pop(request_id) for request_id in request_ids}
        if decode:
            frames = self._decode_by_shape({i: o.video for i, o in outputs.items() if o.video is not None})
            outputs = {i: dataclasses.replace(o, video=frames.get(i)) for i, o in outputs.items()}
        return outputs

    def collect(self, request_ids: list[str], decode: bool) -> None:
        """`take` the results of finished requests without waiting for the device: their decode and their copies to
        the host are queued behind the step that finished them, and `ready_results` hands them out once done."""
        self.pending.append(PendingResults.launch(lambda: self.take(request_ids, decode), self.device))

    def ready_results(self, wait: bool) -> tuple[dict[str, GenerationOutput], dict[str, float]]:
        """The collected results that have reached the host, all of them with `wait`: (request id -> output on the
        host, request id -> seconds of its VAE decode batch on the device)."""
        outputs, decode_s = {}, {}
        while self.pending and (wait or self.pending[0].ready):
            pending = self.pending.pop(0)
            pending.wait()
            outputs.update(pending.outputs)
            decode_s.update(dict.fromkeys(pending.outputs, pending.decode_s))
        return outputs, decode_s

    def _initial_state(self, request_id: str, request: GenerationRequest, kvs: list[kv_export.PromptKV],
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
        temporal = self.vae.config.scale_factor_temporal
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

    def _conditioning_clip(self, request: GenerationRequest) -> ConditioningClip | None:
        """What the VAE encodes for the request's clean latent frames; None when it has none (the reference encodes
        zeros there and uses none of it)."""
        temporal, spatial = self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial
        if request.action_mode is None:
            shape = self.latent_shape(request)
            mask = condition_mask(shape[2], request.image is not None, request.video is not None,
                                  request.condition_frame_indexes)  # fmt: skip
            if not mask.any():
                return None
            pixel_frames = 1 + temporal * int(mask.nonzero().max())  # up to the last clean latent frame
            pixels = conditioning_clip(pixel_frames, request.height, request.width, request.image, request.video,
                                       request.condition_frame_indexes)  # fmt: skip
            return ConditioningClip(pixels, shape[2], shape[3:])
        latent_frames = request.action_chunk_size // temporal + 1  # of the clip's action_chunk_size + 1 frames
        clean_frames = latent_frames if request.action_mode == INVERSE_DYNAMICS else 1  # every frame / the first
        pixel_frames = 1 + temporal * (clean_frames - 1)
        pixels, (content_h, content_w) = action_conditioning_clip(request.action_frames, pixel_frames,
                                                                  request.action_canvas)  # fmt: skip
        return ConditioningClip(pixels, latent_frames, (max(content_h // spatial, 1), max(content_w // spatial, 1)))

    def _video_latents(
        self, request: GenerationRequest, generator: torch.Generator, clean: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial latents `[1, C, T, H, W]` of a text / image / video -> image / video request, and its `[T]` mask of
        clean conditioning frames."""
        shape = self.latent_shape(request)
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

    def _encode_by_shape(self, clips: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalised latents `[1, C, T', H', W']` of `[1, 3, T, H, W]` clips in [-1, 1] (the VAE's distribution
        mode); clips of one shape share one encoder call, its batch padded to a power of two (`_padded_batch`)."""
        mean, inv_std = self._latent_normalization()
        latents = {}
        for ids, batch in _batches_by_shape(clips):
            with record_function(PROFILE_RANGES["encode"]):
                padded = _padded_batch(batch.to(self.device, self.vae.dtype, non_blocking=True))
                raw = self.vae.encode(padded).latent_dist.mode()[: len(ids)]
            latents.update(zip(ids, ((raw - mean) * inv_std).float().split(1)))
        return latents

    def _latent_normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std) of the VAE's latent channels, `[1, C, 1, 1, 1]` in the VAE's dtype, computed as the
        reference pipeline computes them for its VAE; once per dtype (a copy to the device waits for queued work)."""
        dtype = self.vae.dtype
        if dtype not in self._normalization:
            vae = self.vae.config
            mean = torch.tensor(vae.latents_mean, dtype=dtype, device=self.device).view(1, -1, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(vae.latents_std, dtype=dtype, device=self.device).view(1, -1, 1, 1, 1)
            self._normalization[dtype] = (mean, inv_std)
        return self._normalization[dtype]

    def _batch_plan(self, active: list[DenoisingState]) -> BatchPlan:
        """The plan of `active`: the last one if the same requests step together again, else a new layout (the last
        plan's released first), in the graph of its signature if one was captured."""
        if self._plan is None or not self._plan.serves(active):
            self._plan = None
            positions = torch.cat([state.positions_3n for state in active], dim=1)
            sequences = [seq for state in active for seq in state.sequences]
            graph = self.forward_graphs.get(batch_signature(sequences)) if self.use_cuda_graphs else None
            layout = self.tower.pack(positions, sequences, into=None if graph is None else graph.batch)
            self._plan = BatchPlan(list(active), layout, graph)
        return self._plan

    def _forward(
        self,
        active: list[DenoisingState],
        patches_vp: torch.Tensor,
        timesteps_n: torch.Tensor,
        noisy_n: torch.Tensor,
        actions_na: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tower's forward of the batch: a replay of the graph of its signature; without one, eager at its first
        step, then a replay of its CUDA graph, captured at its second step if it has GRAPH_MIN_REPLAYS steps left and
        at most GRAPH_MAX_TOKENS tokens; else eager. The outputs of a replay are the graph's buffers: consumed before
        the next step."""
        plan = self._batch_plan(active)
        steps_left = min(len(state.timesteps) - state.step for state in active)
        if (plan.graph is None and plan.eager_steps > 0 and self.use_cuda_graphs
                and noisy_n.shape[0] <= GRAPH_MAX_TOKENS and steps_left >= GRAPH_MIN_REPLAYS):  # fmt: skip
            try:
                with record_function(PROFILE_RANGES["capture"]):
                    plan.graph = self.forward_graphs.capture(self.tower, plan.layout, patches_vp, timesteps_n, noisy_n,
                                                             actions_na)  # fmt: skip
            except RuntimeError as error:  # an op that cannot be captured: stay eager from now on
                logger.warning("generator CUDA graph capture failed, running eagerly: %s", error)
                self.use_cuda_graphs = False
        if plan.graph is not None:
            return plan.graph(patches_vp, timesteps_n, noisy_n, actions_na)
        plan.eager_steps += 1
        return self.tower(patches_vp, timesteps_n, noisy_n, plan.layout, actions_na)

    def _step(self, active: list[DenoisingState]) -> None:
        """One packed generator forward for every sequence of every active request, then each request's step."""
        patch = self.config.latent_patch_size
        patches, actions, timesteps = [], [], []
        for state in active:
            state_patches = patchify(state.latents[0].to(self.dtype), patch)
            t = state.timesteps[state.step]  # stays on the device: no host sync in the step loop
            for seq in state.sequences:
                patches.append(state_patches)
                if state.actions is not None:
                    actions.append(state.actions.latents.to(self.dtype))
                timesteps.append(t.expand(seq.num_tokens))
        noisy = torch.cat([state.noisy for state in active])
        video_velocity, action_velocity = self._forward(active, torch.cat(patches), torch.cat(timesteps), noisy,
                                                        torch.cat(actions) if actions else None)  # fmt: skip
        patch_offset = action_offset = 0
        for state in active:
            n, branches = state.sequences[0].num_vision_tokens, len(state.sequences)
            velocity = [unpatchify(video_velocity[patch_offset + i * n : patch_offset + (i + 1) * n].float(),
                                   state.latents.shape[1:], patch) for i in range(branches)]  # fmt: skip
            patch_offset += n * branches
            keep = (1.0 - state.frame_mask).view(1, -1, 1, 1)  # clean conditioning frames get no velocity
            guided = _guided(state.request, [branch * keep for branch in velocity])
            t = state.timesteps[state.step]
            state.latents = state.scheduler.step(guided[None, None], t, state.latents[None], return_dict=False)[0][0]
            if state.actions is not None:
                chunk = state.actions.latents.shape[0]
                if state.actions.generated:  # given actions get no velocity and no step
                    velocity = [action_velocity[action_offset + i * chunk : action_offset + (i + 1) * chunk].float()
                                for i in range(branches)]  # fmt: skip
                    state.actions.step(_guided(state.request, velocity), t)
                action_offset += chunk * branches
            state.step += 1

    def _decode_by_shape(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """uint8 frames `[T, H, W, 3]` of normalised latents `[1, C, T', H', W']`; latents of one shape share one
        decoder call."""
        mean, inv_std = self._latent_normalization()
        frames = {}
        for ids, batch in _batches_by_shape(latents):
            with record_function(PROFILE_RANGES["decode"]):
                video = self.vae_decoder(batch.to(self.vae.dtype) / inv_std + mean)  # [B, 3, T, H, W] in [-1, 1]
            pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            frames.update(zip(ids, pixels.permute(0, 2, 3, 4, 1).unbind(0)))
        return frames


def _batches_by_shape(tensors: dict[str, torch.Tensor]) -> list[tuple[list[str], torch.Tensor]]:
    """`[1, ...]` tensors grouped by shape: (their keys, the group concatenated on dim 0)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, tensor in tensors.items():
        groups.setdefault(tuple(tensor.shape), []).append(key)
    return [(keys, torch.cat([tensors[key] for key in keys])) for keys in groups.values()]


def _padded_batch(batch: torch.Tensor) -> torch.Tensor:
    """`batch` with its last item repeated up to a power of two. cuDNN plans each convolution anew for every input
    shape it has not seen (about 0.1 s of host for the VAE encoder, while the GPU waits); a burst of requests would
    otherwise bring a new batch size nearly every time, and the powers of two are few."""
    missing = (1 << (batch.shape[0] - 1).bit_length()) - batch.shape[0]
    return torch.cat([batch, batch[-1:].expand(missing, *batch.shape[1:])]) if missing else batch


def _guided(request: GenerationRequest, branches: list[torch.Tensor]) -> torch.Tensor:
    """Classifier-free guidance of (conditional[, unconditional]) velocities."""
    if not request.uses_cfg:
        return branches[0]
    return branches[1] + request.guidance_scale * (branches[0] - branches[1])
