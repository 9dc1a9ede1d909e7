"""OpenAI's Videos API on our generation jobs: `POST /v1/videos` (JSON or multipart, as the `openai` SDK sends it),
`POST /v1/videos/sync` (the media itself), `GET /v1/videos` (cursor pages), `GET /v1/videos/{id}`, `GET
/v1/videos/{id}/content` (`variant` video, thumbnail or actions) and `DELETE /v1/videos/{id}`.

A video is a job of `GenerationService`, the same one `/v1/video/generate/{id}` shows. OpenAI's fields map onto
ours: `size` is WIDTHxHEIGHT, `seconds` the clip's length at `fps` (frames 4k + 1), `input_reference` an image (first
frame: image2video) or a video (leading frames: video2video), uploaded or as a data URL; every other knob of
`/v1/video/generate` is an extra field (`extra_body` in the SDK).
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Literal

from cosmos3_serve.server.job_store import StoredJob
from cosmos3_serve.server.jobs import Job, JobStatus
from cosmos3_serve.server.protocol import (
    MAX_ACTION_CHUNK,
    MAX_FLOW_SHIFT,
    MAX_FPS,
    MAX_GUIDANCE_SCALE,
    MAX_STEPS,
    FieldError,
    Mode,
    VideoGenerateBody,
    decode_base64,
    error_field,
    from_video_body,
)
from cosmos3_serve.server.routes import (
    check_model,
    checkpoint_info,
    finished_output,
    input_limits,
    job_or_404,
    output_json,
    service_of,
    wait_unless_disconnected,
)
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

router = APIRouter()
STATUSES = {JobStatus.QUEUED: "queued", JobStatus.RUNNING: "in_progress", JobStatus.SUCCEEDED: "completed",
            JobStatus.FAILED: "failed", JobStatus.CANCELLED: "failed"}  # fmt: skip
JSON_FORM_FIELDS = ("actions", "input_reference")  # multipart carries them as JSON text
MAX_LIST_LIMIT = 100


class VideosCreateBody(BaseModel):
    """`POST /v1/videos`: OpenAI's fields, then ours (extra fields of OpenAI's request)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = ""
    model: str | None = None
    seconds: float | None = Field(None, gt=0, description="clip length at fps; default: 93 frames")
    size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 16 (default 1280x720)")
    input_reference: str | dict[str, str] | None = Field(
        None, description="an image or video: a data URL, base64, or {'image_url': data URL}; or a multipart file")
    mode: Mode | None = None
    negative_prompt: str | None = None
    num_frames: int | None = Field(None, ge=1)
    fps: float = Field(24.0, gt=0, le=MAX_FPS)
    num_inference_steps: int = Field(35, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(6.0, ge=0.0, le=MAX_GUIDANCE_SCALE)
    flow_shift: float | None = Field(None, gt=0, le=MAX_FLOW_SHIFT)
    seed: int | None = Field(None, ge=0, lt=2**63)
    action_domain: str | None = None
    action_chunk_size: int | None = Field(None, ge=1, le=MAX_ACTION_CHUNK)
    actions: list[list[float]] | None = None
    action_resolution_tier: Literal[256, 480, 704, 720] = 480


def frames_of(seconds: float, fps: float) -> int:
    """The 4k + 1 frames nearest to `seconds` of video at `fps` (at least 5)."""
    return 4 * max(1, round(seconds * fps / 4)) + 1


def _reference_kind(data: bytes) -> str:
    """"image" or "video", from the bytes' header."""
    try:
        Image.open(io.BytesIO(data))
    except OSError:
        return "video"
    return "image"


def _reference_bytes(value: str | dict[str, str], field: str = "input_reference") -> bytes:
    if isinstance(value, dict):
        if "file_id" in value:
            raise FieldError(field, "file_id references are not served here; send the file or a data URL")
        if "image_url" not in value:
            raise FieldError(field, "give a file, a data URL, or {'image_url': data URL}")
        value = value["image_url"]
    if not value.startswith("data:") and "://" in value:
        raise FieldError(field, "remote URLs are not fetched; send the file or a data URL")
    return decode_base64(value, field)


async def parse_create(request: Request) -> tuple[VideosCreateBody, bytes | None]:
    """The body of a create request, JSON or a form (multipart, as the SDK sends it), and the bytes of its reference
    (if any)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        fields: dict[str, Any] = {}
        reference = None
        for name, value in form.multi_items():
            if hasattr(value, "read"):  # an uploaded file
                if name != "input_reference":
                    raise FieldError(name, "only input_reference may be a file")
                reference = await value.read()
            elif name in JSON_FORM_FIELDS and value.strip().startswith(("[", "{")):
                try:
                    fields[name] = json.loads(value)
                except json.JSONDecodeError:
                    raise FieldError(name, "is not valid JSON") from None
            else:
                fields[name] = value
    else:
        try:
            fields = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FieldError("body", "is neither JSON nor multipart/form-data") from None
        if not isinstance(fields, dict):
            raise FieldError("body", "must be a JSON object")
        reference = None
    try:
        body = VideosCreateBody.model_validate(fields)
    except ValidationError as error:
        raise FieldError(*error_field(error.errors()[0])) from None
    if body.input_reference is not None:
        if reference is not None:
            raise FieldError("input_reference", "give it once: as a file or as a data URL")
        reference = _reference_bytes(body.input_reference)
    return body, reference


def to_generation(body: VideosCreateBody, reference: bytes | None, request: Request):
    """(mode, GenerationRequest) of a create request, validated like `/v1/video/generate`'s."""
    width = height = None
    if body.size is not None:
        try:
            width, height = (int(side) for side in body.size.lower().split("x"))
        except ValueError:
            raise FieldError("size", f"must be WIDTHxHEIGHT, got {body.size!r}") from None
    if body.seconds is not None and body.num_frames is not None:
        raise FieldError("seconds", "give seconds or num_frames, not both")
    num_frames = frames_of(body.seconds, body.fps) if body.seconds is not None else body.num_frames
    media = {}
    if reference is not None:
        media[_reference_kind(reference)] = base64.b64encode(reference).decode()
    fields = body.model_dump(exclude={"seconds", "size", "input_reference", "num_frames", "model"})
    try:
        video_body = VideoGenerateBody(**fields, **media, num_frames=num_frames, height=height, width=width)
    except ValidationError as error:
        first = error.errors()[0]
        field = {"height": "size", "width": "size", "num_frames": "seconds"}.get(str(first["loc"][0]), "body")
        raise FieldError(field, first["msg"]) from None
    try:
        return from_video_body(video_body, checkpoint_info(request), input_limits(request))
    except FieldError as error:
        renamed = {"image": "input_reference", "video": "input_reference", "height": "size", "width": "size"}
        raise FieldError(renamed.get(error.field, error.field), error.message) from None


def video_object(job: Job | StoredJob, request: Request, with_actions: bool = False) -> dict[str, Any]:
    """The job as OpenAI's `Video` object."""
    state = request.app.state.cosmos3
    params = job.params
    status = STATUSES[job.status]
    finished = job.finished_at
    video = {
        "id": job.id, "object": "video", "model": state.model_name, "status": status,
        "progress": int(100 * job.steps_done / max(job.steps_total, 1)) if status != "completed" else 100,
        "created_at": int(job.created),
        "completed_at": int(finished) if status == "completed" and finished is not None else None,
        "expires_at": int(finished + state.settings.result_ttl_s) if finished is not None else None,
        "prompt": None if params is None else params.prompt,
        "size": None if params is None else f"{params.width}x{params.height}",
        "seconds": None if params is None else f"{(params.num_frames - 1) / params.fps:g}",
        "remixed_from_video_id": None, "error": None,
    }  # fmt: skip
    if job.status is JobStatus.FAILED:
        video["error"] = {"code": "generation_failed", "message": job.error}
    elif job.status is JobStatus.CANCELLED:
        video["error"] = {"code": "cancelled", "message": job.error or "the job was cancelled"}
    if with_actions and job.status is JobStatus.SUCCEEDED and job.output.actions is not None:
        video["actions"] = job.output.actions
    return video


@router.post("/v1/videos")
async def create_video(request: Request) -> dict:
    """Start a generation job; answers its `Video` object (status `queued`) at once."""
    body, reference = await parse_create(request)
    check_model(request, body.model)
    mode, generation = to_generation(body, reference, request)
    job = service_of(request).submit(generation, mode)
    return video_object(job, request)


@router.post("/v1/videos/sync", responses={200: {"content": {"video/mp4": {}, "image/png": {}}}})
async def create_video_sync(request: Request) -> Response:
    """Generate and answer the MP4 (a PNG for one frame) itself; JSON with `actions` for the action modes."""
    body, reference = await parse_create(request)
    check_model(request, body.model)
    mode, generation = to_generation(body, reference, request)
    service = service_of(request)
    job = await wait_unless_disconnected(service, service.submit(generation, mode), request)
    output = finished_output(job)
    service.forget(job)
    headers = {"X-Cosmos3-Job-Id": job.id, "X-Cosmos3-Seed": str(output.seed)}
    if output.actions is not None:
        return JSONResponse({"id": job.id, "seed": output.seed, **output_json(output)}, headers=headers)
    return Response(output.content, media_type=output.media_type, headers=headers)


@router.get("/v1/videos")
async def list_videos(request: Request, after: str | None = None,
                      limit: int = Query(20, ge=1, le=MAX_LIST_LIMIT),
                      order: Literal["asc", "desc"] = "desc") -> dict:  # fmt: skip
    """The stored jobs by creation time, a page at a time (`after`: the last id of the previous page)."""
    service = request.app.state.cosmos3.service
    try:
        ids, has_more = service.store.list_ids(after, limit, ascending=order == "asc")
    except KeyError:
        raise FieldError("after", f"no video {after!r}") from None
    data = [video_object(job, request) for job in (service.find(i) for i in ids) if job is not None]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}  # fmt: skip


@router.get("/v1/videos/{video_id}")
async def retrieve_video(video_id: str, request: Request) -> dict:
    """A job as OpenAI's `Video` object; the action modes' `actions` once completed."""
    return video_object(job_or_404(request, video_id), request, with_actions=True)


@router.get("/v1/videos/{video_id}/content",
            responses={200: {"content": {"video/mp4": {}, "image/png": {}, "application/json": {}}}})  # fmt: skip
async def video_content(video_id: str, request: Request,
                        variant: Literal["video", "thumbnail", "actions"] = "video") -> Response:  # fmt: skip
    """A completed job's MP4 (`video`), its first frame as PNG (`thumbnail`) or its actions as JSON (`actions`)."""
    output = finished_output(job_or_404(request, video_id))
    if variant == "actions" or (variant == "video" and output.content is None):
        if output.actions is None:
            raise HTTPException(404, f"video {video_id!r} made no actions")
        return JSONResponse({"actions": output.actions})
    if output.content is None:
        raise HTTPException(404, f"video {video_id!r} made no video (an inverse-dynamics job: variant=actions)")
    if variant == "thumbnail":
        return Response(first_frame_png(output.content, output.media_type), media_type="image/png")
    return Response(output.content, media_type=output.media_type)


def first_frame_png(content: bytes, media_type: str) -> bytes:
    """The first frame of an MP4 (or the PNG itself) as PNG."""
    import av

    if media_type == "image/png":
        return content
    with av.open(io.BytesIO(content)) as container:
        frame = next(container.decode(container.streams.video[0]))
        out = io.BytesIO()
        frame.to_image().save(out, format="PNG")
    return out.getvalue()


@router.delete("/v1/videos/{video_id}")
async def delete_video(video_id: str, request: Request) -> dict:
    """Cancel the job if it still runs, then free its record and result: 404 from then on."""
    job = job_or_404(request, video_id)
    service = request.app.state.cosmos3.service
    if not job.status.final:
        await service.cancel(job)
    service.delete(job.id)
    return {"id": job.id, "object": "video.deleted", "deleted": True}
