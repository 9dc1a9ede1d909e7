"""Request and response bodies of the generation routes, and their mapping onto `GenerationRequest`.

Front doors lead to the same engine: `POST /v1/video/generate` (ours, every mode, here), `POST
/v1/images/generations` (OpenAI's images shape, text -> image, here), `POST /v1/infer` (NIM's, `nim_protocol`) and
`/v1/videos` (OpenAI's Videos API, `openai_videos`). Bodies of our and NIM's routes forbid unknown fields; OpenAI's
images route ignores them, as OpenAI's API does.
"""

from __future__ import annotations

import base64
import binascii
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig
from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.sampling.actions import ACTION_MODES
from cosmos3_serve.sampling.schedulers import invalid_schedule, load_scheduler

Mode = Literal[
    "text2image", "text2video", "image2video", "video2video", "forward_dynamics", "policy", "inverse_dynamics"
]
MEDIA_MODES: tuple[str, ...] = ("text2image", "text2video", "image2video", "video2video")
RESOLUTIONS: dict[str, tuple[int, int]] = {"480p": (480, 832), "720p": (720, 1280)}  # (height, width)
DEFAULT_VIDEO_FRAMES = 93
MAX_STEPS = 1000  # and a schedule that repeats a timestep is refused (`invalid_schedule`)
MAX_FPS = 240.0  # of an output video's metadata (the MP4 encoder's time base)
MAX_GUIDANCE_SCALE = 100.0  # past it, guided velocities overflow into non-finite latents
MAX_FLOW_SHIFT = 100.0
MAX_ACTION_CHUNK = 1024
MAX_IMAGE_PIXELS = 4096 * 4096  # of a conditioning image or video frame (it is resized to the output's size)
MAX_CLIP_PIXELS = 189 * 1280 * 720  # of the frames of a conditioning video that are decoded: a 720p reference video


class FieldError(ValueError):
    """A request field is invalid: answered with 422 naming `field`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def error_field(error: dict[str, Any], default: str = "body") -> tuple[str, str]:
    """(field, message) of one pydantic validation error: its dotted path without `body`, and "unknown field" for
    a field the model forbids."""
    field = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or default
    return field, "unknown field" if error.get("type") == "extra_forbidden" else error.get("msg", "invalid")


class ModeUnavailable(ValueError):
    """The checkpoint cannot serve this mode: answered with 400."""


@dataclass(frozen=True)
class InputLimits:
    """The deployment's bounds on a request's inputs, checked before any work: denoising steps
    (`--max-inference-steps`), and conditioning media from their headers, before any pixel is decoded
    (`--max-input-pixels`, `--max-clip-pixels`)."""

    max_image_pixels: int = MAX_IMAGE_PIXELS  # of an image, or of one video frame
    max_clip_pixels: int = MAX_CLIP_PIXELS  # of a video's decoded frames together
    max_inference_steps: int = MAX_STEPS

    def check_steps(self, steps: int, field: str = "num_inference_steps") -> None:
        if steps > self.max_inference_steps:
            raise FieldError(field, f"{steps} steps; this deployment runs at most {self.max_inference_steps} "
                                    "(--max-inference-steps)")  # fmt: skip


@dataclass(frozen=True)
class CheckpointInfo:
    """What request validation needs of the served checkpoint: its generator config and scheduler template."""

    generator: GeneratorConfig
    scheduler: Any

    @classmethod
    def load(cls, checkpoint: Path) -> CheckpointInfo:
        return cls(GeneratorConfig.from_checkpoint(checkpoint), load_scheduler(checkpoint))

    def modes(self) -> list[str]:
        """The generation modes of the checkpoint: the action modes need its action head."""
        return list(MEDIA_MODES) + (list(ACTION_MODES) if self.generator.action_dim is not None else [])


class VideoGenerateBody(BaseModel):
    """`POST /v1/video/generate`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    mode: Mode | None = Field(None, description="default: implied by the inputs (image, video, num_frames)")
    prompt: str = Field("", description="required except for inverse_dynamics")
    negative_prompt: str | None = None
    image: str | None = Field(None, description="first frame (image2video): a data URL or base64 PNG / JPEG")
    video: str | None = Field(None, description="leading frames (video2video): a data URL or base64 MP4")
    resolution: Literal["480p", "720p"] | None = Field(None, description="or give height and width")
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    num_frames: int | None = Field(None, ge=1, description=f"4k + 1; 1 is an image (default {DEFAULT_VIDEO_FRAMES})")
    fps: float = Field(24.0, gt=0, le=MAX_FPS)
    num_inference_steps: int = Field(35, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(6.0, ge=0.0, le=MAX_GUIDANCE_SCALE)
    flow_shift: float | None = Field(None, gt=0, le=MAX_FLOW_SHIFT,
                                     description="shift of the flow schedule (default: the checkpoint's)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="default: random (returned with the result)")
    reason_first: bool = Field(False, description="let the reasoner answer the prompt first and condition on it")
    reasoning_max_tokens: int = Field(256, ge=1, le=8192)
    action_domain: str | None = Field(None, description="action modes: the embodiment, e.g. bridge_orig_lerobot")
    action_chunk_size: int | None = Field(None, ge=1, le=MAX_ACTION_CHUNK,
                                          description="action modes: steps (clip frames - 1)")  # fmt: skip
    actions: list[list[float]] | None = Field(None, description="forward_dynamics: [T, action width] of the domain")
    action_resolution_tier: Literal[256, 480, 704, 720] = 480
    action_view_point: str | None = "ego_view"
    response: Literal["sync", "async"] = Field("sync", description="sync: the media; async: a job id at once")
    response_format: Literal["binary", "b64_json"] = Field("binary", description="sync only: raw bytes or JSON")


class ImagesGenerationsBody(BaseModel):
    """`POST /v1/images/generations` (OpenAI); extras through `extra_body`."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(..., min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=8)
    size: str = Field("1024x1024", description="WIDTHxHEIGHT, multiples of 16")
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str | None = None
    num_inference_steps: int = Field(35, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(6.0, ge=0.0, le=MAX_GUIDANCE_SCALE)
    seed: int | None = Field(None, ge=0, lt=2**63)


def decode_base64(value: str, field: str) -> bytes:
    """Bytes of a data URL (`data:<type>;base64,...`) or of bare base64."""
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not a base64 data URL or base64 string") from None


def decode_image(value: str, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image, refused from its header (before its pixels are decoded) when it has more than `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(decode_base64(value, field)))
        if image.width * image.height > max_pixels:
            raise FieldError(field, f"has {image.width}x{image.height} pixels; at most {max_pixels:,} are accepted")
        return image.convert("RGB")
    except (OSError, Image.DecompressionBombError):
        raise FieldError(field, "is not a PNG / JPEG / WebP image") from None


def decode_video(value: str, field: str, frames_used: int, limits: InputLimits = InputLimits()) -> list[Image.Image]:
    """The video's first `frames_used` frames (the request reads no more). Its frame size from the stream's header,
    and the frames to decode times that size, are checked against `limits` before a frame is decoded."""
    import av

    try:
        with av.open(io.BytesIO(decode_base64(value, field))) as container:
            stream = container.streams.video[0]
            pixels = stream.codec_context.width * stream.codec_context.height
            if pixels > limits.max_image_pixels:
                raise FieldError(field, f"has {stream.codec_context.width}x{stream.codec_context.height} frames; at "
                                        f"most {limits.max_image_pixels:,} pixels per frame are accepted")  # fmt: skip
            frames_to_decode = min(frames_used, stream.frames) if stream.frames > 0 else frames_used
            if frames_to_decode * pixels > limits.max_clip_pixels:
                raise FieldError(field, f"{frames_to_decode} frames of {pixels:,} pixels are read from it; at most "
                                        f"{limits.max_clip_pixels:,} pixels of a clip are accepted (fewer or "
                                        "smaller frames)")  # fmt: skip
            frames = []
            for frame in container.decode(stream):
                if frame.width * frame.height > limits.max_image_pixels:  # a size change mid-stream
                    raise FieldError(field, "changes its frame size beyond the accepted pixels per frame")
                frames.append(frame.to_image())
                if len(frames) == frames_used:
                    break
    except (av.error.FFmpegError, IndexError, ValueError) as error:
        if isinstance(error, FieldError):
            raise
        raise FieldError(field, "is not a decodable video (MP4 / WebM)") from None
    if not frames:
        raise FieldError(field, "has no frames")
    return frames


def _size(resolution: str | None, height: int | None, width: int | None, default: tuple[int, int]) -> tuple[int, int]:
    if resolution is not None and (height is not None or width is not None):
        raise FieldError("resolution", "give either resolution or height and width, not both")
    if (height is None) != (width is None):
        raise FieldError("height" if height is None else "width", "give both height and width")
    if resolution is not None:
        return RESOLUTIONS[resolution]
    return (height, width) if height is not None else default


def _mode(mode: str | None, image: str | None, video: str | None, num_frames: int | None) -> str:
    implied = "image2video" if image else "video2video" if video else "text2image" if num_frames == 1 else "text2video"
    if mode is None:
        return implied
    if mode in ("image2video", "video2video") and implied != mode:
        raise FieldError("image" if mode == "image2video" else "video", f"is required for mode {mode}")
    if mode in ("text2image", "text2video") and (image or video):
        raise FieldError("image" if image else "video", f"is not used by mode {mode}")
    return mode


def _checked(request: GenerationRequest, checkpoint: CheckpointInfo) -> GenerationRequest:
    """`request` if the checkpoint can serve it; FieldError / ModeUnavailable naming why not."""
    invalid = request.invalid_field() or invalid_schedule(checkpoint.scheduler, request)
    if invalid is not None:
        raise FieldError(*invalid)
    unfit = request.unfit_field(checkpoint.generator)
    if unfit is not None:
        field, message = unfit
        if field == "action_mode":
            raise ModeUnavailable(f"mode {request.action_mode}: {message}")
        raise FieldError(field, message)
    return request


def random_seed() -> int:
    return random.randrange(2**31)


def from_video_body(body: VideoGenerateBody, checkpoint: CheckpointInfo,
                    limits: InputLimits = InputLimits()) -> tuple[str, GenerationRequest]:  # fmt: skip
    mode = _mode(body.mode, body.image, body.video, body.num_frames)
    limits.check_steps(body.num_inference_steps)
    if mode != "inverse_dynamics" and not body.prompt:
        raise FieldError("prompt", f"is required for mode {mode}")
    num_frames = body.num_frames or (1 if mode == "text2image" else DEFAULT_VIDEO_FRAMES)
    if mode == "text2image" and num_frames != 1:
        raise FieldError("num_frames", "must be 1 for text2image")
    height, width = _size(body.resolution, body.height, body.width, RESOLUTIONS["720p"])
    action = mode in ACTION_MODES
    # An action clip has a frame per action step and one more; a video -> video clip at most the output's frames.
    frames_used = (body.action_chunk_size or MAX_ACTION_CHUNK) + 1 if action else num_frames
    if not action and (body.action_domain or body.action_chunk_size or body.actions is not None):
        field = "action_domain" if body.action_domain else "action_chunk_size" if body.action_chunk_size else "actions"
        raise FieldError(field, f"is only used by the action modes ({', '.join(ACTION_MODES)})")
    request = GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, num_frames=num_frames, height=height, width=width,
        fps=body.fps, num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
        flow_shift=body.flow_shift, seed=random_seed() if body.seed is None else body.seed,
        image=decode_image(body.image, "image", limits.max_image_pixels) if body.image else None,
        video=decode_video(body.video, "video", frames_used, limits) if body.video else None,
        reason_first=body.reason_first, reasoning_max_tokens=body.reasoning_max_tokens,
        action_mode=mode if action else None,
        action_domain=body.action_domain if action else None,
        action_chunk_size=body.action_chunk_size if action else None,
        actions=None if body.actions is None else np.asarray(body.actions, dtype=np.float32),
        action_resolution_tier=body.action_resolution_tier, action_view_point=body.action_view_point,
    )  # fmt: skip
    return mode, _checked(request, checkpoint)


def from_images_body(body: ImagesGenerationsBody, checkpoint: CheckpointInfo,
                     limits: InputLimits = InputLimits()) -> list[GenerationRequest]:  # fmt: skip
    limits.check_steps(body.num_inference_steps)
    try:
        width, height = (int(side) for side in body.size.lower().split("x"))
    except ValueError:
        raise FieldError("size", f"must be WIDTHxHEIGHT, got {body.size!r}") from None
    seed = random_seed() if body.seed is None else body.seed
    requests = [
        GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, num_frames=1, height=height,
                          width=width, num_inference_steps=body.num_inference_steps,
                          guidance_scale=body.guidance_scale, seed=seed + i)  # fmt: skip
        for i in range(body.n)
    ]
    for request in requests:
        invalid = request.invalid_field() or invalid_schedule(checkpoint.scheduler, request)
        if invalid is not None:
            raise FieldError("size", invalid[1]) if invalid[0] in ("height", "width") else FieldError(*invalid)
    return requests
