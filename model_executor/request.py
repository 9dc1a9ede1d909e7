"""A generation request as the generator serves it, and its validation.

`GenerationRequest` is the one request type of every generation mode (text / image / video -> image / video and
the action modes), from the HTTP API and the CLI to the executor in vLLM's worker. It imports no torch, vLLM or
Triton code, so the API process validates requests without loading model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cosmos3_serve.sampling.actions import (
    ACTION_MODES,
    EMBODIMENT_ACTION_DIMS,
    EMBODIMENT_DOMAIN_IDS,
    FORWARD_DYNAMICS,
    INVERSE_DYNAMICS,
    RESOLUTION_BINS,
    VIEW_POINT_FRAMING,
    action_source_size,
    canvas_size,
)
from cosmos3_serve.sampling.prompts import PromptSpec

if TYPE_CHECKING:
    from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig


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
        return canvas_size(action_source_size([frame.size for frame in self.action_frames]),
                           self.action_resolution_tier)  # fmt: skip

    @property
    def spec(self) -> PromptSpec:
        if self.action_mode is not None:
            height, width = self.action_canvas
            return PromptSpec(num_frames=self.action_chunk_size + 1, height=height, width=width, fps=self.fps)
        return PromptSpec(num_frames=self.num_frames, height=self.height, width=self.width, fps=self.fps)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0
