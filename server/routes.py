"""Generation routes: `/v1/video/generate` (sync, async jobs, progress events, cancel), OpenAI's
`/v1/images/generations` and NIM's `/v1/infer`, all on one `GenerationService`."""

from __future__ import annotations

import asyncio
import base64
import json
import time

from cosmos3_serve.server import nim_protocol
from cosmos3_serve.server.generation_service import GenerationService
from cosmos3_serve.server.job_store import StoredJob
from cosmos3_serve.server.jobs import Job, JobStatus
from cosmos3_serve.server.nim_protocol import NimInferBody
from cosmos3_serve.server.protocol import (
    FieldError,
    ImagesGenerationsBody,
    InputLimits,
    VideoGenerateBody,
    from_images_body,
    from_video_body,
)
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

router = APIRouter()
DISCONNECT_POLL_S = 1.0


def checkpoint_info(request: Request):
    return request.app.state.cosmos3.checkpoint_info


def input_limits(request: Request) -> InputLimits:
    return request.app.state.cosmos3.settings.input_limits


def service_of(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.cosmos3.service
    if not service.ready:
        raise HTTPException(503, "the generator is still loading", headers={"Retry-After": "5"})
    return service


def check_model(request: Request, model: str | None) -> None:
    served = request.app.state.cosmos3.model_name
    if model is not None and model != served:
        raise HTTPException(404, f"model: {model!r} is not served here (this server serves {served!r})")


def job_or_404(request: Request, job_id: str) -> Job | StoredJob:
    job = request.app.state.cosmos3.service.find(job_id)
    if job is None:
        raise HTTPException(404, f"no generation job {job_id!r}")
    return job


async def wait_unless_disconnected(service: GenerationService, job: Job, request: Request) -> Job:
    """Wait for `job`; if the client goes away first, cancel it (nobody can fetch a sync result)."""
    waiting = asyncio.create_task(service.wait(job))
    while not waiting.done():
        await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if not waiting.done() and await request.is_disconnected():
            waiting.cancel()
            await service.cancel(job)
            break
    return job


def finished_output(job: Job):
    if job.status is JobStatus.SUCCEEDED:
        return job.output
    if job.status is JobStatus.FAILED:
        raise HTTPException(job.error_status, f"generation failed: {job.error}")
    if job.status is JobStatus.CANCELLED:
        raise HTTPException(409, f"generation job {job.id} was cancelled")
    raise HTTPException(409, f"generation job {job.id} is {job.status.value} ({job.steps_done}/{job.steps_total} steps)")


@router.post("/v1/video/generate", responses={200: {"content": {"video/mp4": {}, "image/png": {}}}, 202: {}})
async def video_generate(body: VideoGenerateBody, request: Request) -> Response:
    """Generate a video (or an image: `num_frames` 1). `response: "sync"` answers with the media (or base64 JSON
    with `response_format: "b64_json"`); `"async"` answers 202 with a job to poll, stream or cancel."""
    check_model(request, body.model)
    mode, generation = from_video_body(body, checkpoint_info(request), input_limits(request))
    service = service_of(request)
    job = service.submit(generation, mode)
    if body.response == "async":
        return JSONResponse(job.snapshot(), status_code=202, headers={"Location": f"/v1/video/generate/{job.id}"})
    output = finished_output(await wait_unless_disconnected(service, job, request))
    service.forget(job)
    headers = {"X-Cosmos3-Job-Id": job.id, "X-Cosmos3-Seed": str(output.seed)}
    if body.response_format == "b64_json" or output.actions is not None:  # actions only travel in JSON
        return JSONResponse({**job.snapshot(), **output_json(output)}, headers=headers)
    return Response(output.content, media_type=output.media_type, headers=headers)


def output_json(output) -> dict:
    """A job's output as JSON fields: `media_type` and `b64_json` when it made media, `actions` when it made
    actions."""
    fields: dict = {}
    if output.content is not None:
        fields.update(media_type=output.media_type, b64_json=base64.b64encode(output.content).decode())
    if output.actions is not None:
        fields["actions"] = output.actions
    return fields


@router.get("/v1/video/generate/{job_id}")
async def video_job(job_id: str, request: Request) -> dict:
    """Status of a job: queued / running / succeeded / failed / cancelled, steps done of total."""
    return job_or_404(request, job_id).snapshot()


@router.get("/v1/video/generate/{job_id}/content",
            responses={200: {"content": {"video/mp4": {}, "image/png": {}, "application/json": {}}}})  # fmt: skip
async def video_job_content(job_id: str, request: Request) -> Response:
    """The output of a succeeded job (409 while it runs): its media, or JSON when it made actions."""
    job = job_or_404(request, job_id)
    output = finished_output(job)
    headers = {"X-Cosmos3-Seed": str(output.seed)}
    if output.actions is not None:
        return JSONResponse(output_json(output), headers=headers)
    return Response(output.content, media_type=output.media_type, headers=headers)


@router.get("/v1/video/generate/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}})
async def video_job_events(job_id: str, request: Request) -> StreamingResponse:
    """Server-sent events: a `progress` event per denoising step, then one `done` event (the final status)."""
    job = job_or_404(request, job_id)

    async def stream():
        async for snapshot in job.events():
            kind = "done" if JobStatus(snapshot["status"]).final else "progress"
            yield f"event: {kind}\ndata: {json.dumps(snapshot)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.delete("/v1/video/generate/{job_id}")
async def video_job_cancel(job_id: str, request: Request) -> dict:
    """Cancel a job in flight (it leaves the batch before its next step and its memory is released), or delete a
    finished one (its record and result are freed; it is 404 from then on)."""
    job = job_or_404(request, job_id)
    service = request.app.state.cosmos3.service
    if job.status.final:
        service.delete(job.id)
        return {"id": job.id, "object": "video.generation.deleted", "deleted": True}
    await service.cancel(job)
    return job.snapshot()


@router.post("/v1/images/generations")
async def images_generations(body: ImagesGenerationsBody, request: Request) -> dict:
    """OpenAI's images API, text -> image: `n` images, denoised together in one batch."""
    check_model(request, body.model)
    generations = from_images_body(body, checkpoint_info(request), input_limits(request))
    service = service_of(request)
    jobs = [service.submit(generation, "text2image") for generation in generations]
    try:
        await asyncio.gather(*(wait_unless_disconnected(service, job, request) for job in jobs))
    finally:
        for job in jobs:
            await service.cancel(job)  # no-op for finished jobs
    data = []
    for job in jobs:
        output = finished_output(job)
        if body.response_format == "url":
            path = request.app.url_path_for("video_job_content", job_id=job.id)
            data.append({"url": request.app.state.cosmos3.settings.public_url + path, "seed": output.seed})
        else:
            data.append({"b64_json": base64.b64encode(output.content).decode(), "seed": output.seed})
            service.forget(job)
    return {"created": int(time.time()), "data": data}


@router.post("/v1/infer")
async def nim_infer(body: NimInferBody, request: Request) -> dict:
    """NIM's inference route, Cosmos 3 names (`nim_protocol`): `model_mode` text2image / text2video / image2video /
    video2video / forward_dynamics / policy / inverse_dynamics; the older Cosmos NIM names as aliases."""
    try:
        mode, generation = from_video_body(nim_protocol.to_video_body(body), checkpoint_info(request),
                                           input_limits(request))  # fmt: skip
    except FieldError as error:  # name the request's own fields
        raise FieldError(nim_protocol.field_name(body, error.field), error.message) from None
    service = service_of(request)
    job = await wait_unless_disconnected(service, service.submit(generation, mode), request)
    output = finished_output(job)
    service.forget(job)
    answer = {"id": job.id, "model_mode": body.model_mode, "seed": output.seed}
    if output.content is not None:
        media_field = "b64_image" if output.media_type == "image/png" else "b64_video"
        answer[media_field] = base64.b64encode(output.content).decode()
    if output.media_type != "image/png":
        answer["action"] = None
    if output.actions is not None:
        answer["action"] = nim_protocol.action_answer(output.actions, mode, generation.action_domain)
        answer["actions"] = output.actions
    return answer
