"""NVIDIA's Cosmos 3 NIM request for `POST /v1/infer`, and its answer.

The Cosmos 3 names: `model_mode` (text2image, text2video, image2video, video2video, forward_dynamics, policy,
inverse_dynamics), `input_reference` (the image or video, base64 or a data URL), `num_inference_steps`,
`num_frames`, `flow_shift`, `resolution` (a tier, `256` / `480` / `720`, with an aspect suffix such as `_16_9` or
`_1_1`), `action_params` (domain_name, action_chunk_size, action, raw_action_dim, image_size, action_fps). Types are
strict and unknown fields 422, as NIM's. The older Cosmos NIM names stay accepted as aliases: `text2world`,
`image2world`, `video2world`, `image`, `video`, `frames`, `steps`, `prompt_upsampling`, `480p` / `720p` and the
top-level action fields. The answer: `b64_image` or `b64_video`, and `action` (`data`, `shape`, `dtype`,
`raw_action_dim`, `action_mode`, `domain_id`) for the action modes; `actions` (the bare list) for older clients.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from cosmos3_serve.sampling.actions import ACTION_MODES, EMBODIMENT_ACTION_DIMS, EMBODIMENT_DOMAIN_IDS
from cosmos3_serve.server.protocol import (
    MAX_ACTION_CHUNK,
    MAX_FLOW_SHIFT,
    MAX_FPS,
    MAX_GUIDANCE_SCALE,
    MAX_STEPS,
    FieldError,
    VideoGenerateBody,
)
from pydantic import BaseModel, ConfigDict, Field

LEGACY_MODES = {"text2world": "text2video", "image2world": "image2video", "video2world": "video2video"}
TIER_SIZES = {"256": (256, 448), "480": (480, 832), "720": (720, 1280)}  # (height, width) of a tier at 16:9
RESOLUTION_PATTERN = re.compile(r"^(256|480|720)(?:_(16_9|1_1|9_16|4_3|3_4))?$")
LEGACY_RESOLUTIONS = ("480p", "720p")
IMAGE_REFERENCE_MODES = ("image2video", "forward_dynamics", "policy")


class ActionParams(BaseModel):
    """`action_params` of the action modes."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    domain_name: str
    action_chunk_size: int = Field(..., ge=1, le=MAX_ACTION_CHUNK)
    action: list[list[float]] | None = Field(None, description="forward_dynamics: [T, raw_action_dim]")
    raw_action_dim: int | None = Field(None, ge=1)
    action_space: Literal["joint_pos"] = "joint_pos"
    image_size: Literal["256", "480", "704", "720"] = "480"
    action_fps: float | None = Field(None, ge=1.0, le=60.0)


class NimInferBody(BaseModel):
    """`POST /v1/infer`."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model_mode: Literal["text2image", "text2video", "image2video", "video2video", "forward_dynamics", "policy",
                        "inverse_dynamics", "text2world", "image2world", "video2world"]  # fmt: skip
    prompt: str | None = Field(None, max_length=20_000)
    negative_prompt: str | None = Field(None, max_length=20_000)
    input_reference: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    guidance_scale: float = Field(6.0, ge=0.0, le=MAX_GUIDANCE_SCALE)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    flow_shift: float | None = Field(None, gt=0, le=MAX_FLOW_SHIFT)
    resolution: str | None = None
    num_frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0, le=MAX_FPS)
    action_params: ActionParams | None = None
    # older Cosmos NIM names
    image: str | None = None
    video: str | None = None
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    frames: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    prompt_upsampling: bool = False
    action_domain: str | None = None
    action_chunk_size: int | None = Field(None, ge=1, le=MAX_ACTION_CHUNK)
    actions: list[list[float]] | None = None
    action_resolution_tier: Literal[256, 480, 704, 720] | None = None


def resolution_size(resolution: str) -> tuple[int, int]:
    """(height, width) of a Cosmos 3 NIM resolution: the tier's 16:9 size, or its area at another aspect, in
    multiples of 16."""
    found = RESOLUTION_PATTERN.match(resolution)
    if found is None:
        raise FieldError("resolution", "must be 256, 480 or 720, optionally with _16_9, _1_1, _9_16, _4_3 or _3_4 "
                                       f"(e.g. 720_16_9), got {resolution!r}")  # fmt: skip
    tier, aspect = found.group(1), found.group(2) or "16_9"
    if aspect == "16_9":
        return TIER_SIZES[tier]
    across, down = (int(side) for side in aspect.split("_"))
    height = math.sqrt(math.prod(TIER_SIZES[tier]) * down / across)
    return 16 * round(height / 16), 16 * round(height * across / down / 16)


def _one_of(body: NimInferBody, new: str, old: str) -> Any:
    new_value, old_value = getattr(body, new), getattr(body, old)
    if new_value is not None and old_value is not None:
        raise FieldError(old, f"is the older name of {new}; give one of them")
    return new_value if new_value is not None else old_value


def to_video_body(body: NimInferBody) -> VideoGenerateBody:
    """The same request in `/v1/video/generate`'s terms (validated there)."""
    mode = LEGACY_MODES.get(body.model_mode, body.model_mode)
    action = mode in ACTION_MODES
    image, video = body.image, body.video
    if body.input_reference is not None:
        if image is not None or video is not None:
            raise FieldError("input_reference", "give input_reference, or the older image / video, not both")
        if mode in ("text2image", "text2video"):
            raise FieldError("input_reference", f"is not used by {mode}")
        if mode in IMAGE_REFERENCE_MODES:
            image = body.input_reference
        else:
            video = body.input_reference
    height, width, resolution = body.height, body.width, None
    if body.resolution is not None:
        if action:
            raise FieldError("resolution", "is not used by the action modes (action_params.image_size sets it)")
        if body.resolution in LEGACY_RESOLUTIONS:
            resolution = body.resolution
        else:
            height, width = resolution_size(body.resolution)
    num_frames = _one_of(body, "num_frames", "frames")
    if action and num_frames is not None:
        raise FieldError("num_frames" if body.num_frames is not None else "frames",
                         "is not used by the action modes (action_params.action_chunk_size + 1 frames)")  # fmt: skip
    fields: dict[str, Any] = {}
    if body.action_params is not None:
        if not action:
            raise FieldError("action_params", f"is only used by the action modes ({', '.join(ACTION_MODES)})")
        if body.action_domain is not None or body.action_chunk_size is not None or body.actions is not None:
            raise FieldError("action_params", "give action_params, or the older top-level action fields, not both")
        params = body.action_params
        width_of_domain = EMBODIMENT_ACTION_DIMS.get(params.domain_name)
        if params.raw_action_dim is not None and params.raw_action_dim != width_of_domain:
            raise FieldError("action_params.raw_action_dim", f"{params.domain_name}'s actions are {width_of_domain} "
                                                             f"wide, not {params.raw_action_dim}")  # fmt: skip
        fields.update(action_domain=params.domain_name, action_chunk_size=params.action_chunk_size,
                      actions=params.action, action_resolution_tier=int(params.image_size))  # fmt: skip
        if params.action_fps is not None and body.fps is None:
            fields["fps"] = params.action_fps
    elif action:
        fields.update(action_domain=body.action_domain, action_chunk_size=body.action_chunk_size, actions=body.actions)
        if body.action_resolution_tier is not None:
            fields["action_resolution_tier"] = body.action_resolution_tier
    if body.fps is not None:
        fields["fps"] = body.fps
    steps = _one_of(body, "num_inference_steps", "steps")
    if steps is not None:
        fields["num_inference_steps"] = steps
    return VideoGenerateBody(
        mode=mode, prompt=body.prompt or "", negative_prompt=body.negative_prompt, image=image, video=video,
        resolution=resolution, height=height, width=width, num_frames=num_frames, guidance_scale=body.guidance_scale,
        flow_shift=body.flow_shift, seed=body.seed, reason_first=body.prompt_upsampling, **fields,
    )  # fmt: skip


RENAMED_FIELDS = {"image": "input_reference", "video": "input_reference", "reason_first": "prompt_upsampling",
                  "action_domain": "action_params.domain_name", "action_chunk_size": "action_params.action_chunk_size", "actions": "action_params.action",
                  "action_resolution_tier": "action_params.image_size", "height": "resolution",
                  "width": "resolution"}  # fmt: skip


def field_name(body: NimInferBody, field: str) -> str:
    """`/v1/video/generate`'s field `field` as the request named it."""
    legacy = {"num_frames": "frames", "num_inference_steps": "steps"}
    if field in legacy and getattr(body, legacy[field]) is not None:
        return legacy[field]
    if field in ("image", "video") and getattr(body, field) is not None:
        return field
    if field.startswith("action") and body.action_params is None:
        return field
    if field in ("height", "width") and body.resolution is None:
        return field
    return RENAMED_FIELDS.get(field, field)


def action_answer(actions: list[list[float]], mode: str, domain: str) -> dict[str, Any]:
    """NIM's `action` object."""
    return {"data": actions, "shape": [len(actions), len(actions[0]) if actions else 0], "dtype": "float32",
            "raw_action_dim": EMBODIMENT_ACTION_DIMS.get(domain), "action_mode": mode,
            "domain_id": EMBODIMENT_DOMAIN_IDS.get(domain)}  # fmt: skip
