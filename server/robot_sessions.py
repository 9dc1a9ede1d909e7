"""Robot policy in a closed loop: `WS /v1/robot/session`, one persistent connection per robot.

The robot first sends its session (`{"type": "start", ...}`: instruction, embodiment, chunk size, steps, output size,
`actions_only`), then an observation whenever it needs the next action chunk (`{"type": "observation", "id": ...,
"image" | "video": data URL}`). Each observation is one policy job of `GenerationService`: it joins the generator's
step batches with every other job (other robots, videos, images), and with `actions_only` (the default) its video is
never decoded. The answer: `{"type": "actions", "id", "job_id", "actions", "seed", "latency_ms"}` (+ `b64_video`
without `actions_only`). Observations may overlap; answers carry their `id`. A bad message gets `{"type": "error",
"id", "code", "param", "message"}` and the connection stays; closing it cancels the robot's jobs in flight.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, Literal

from cosmos3_serve.server.generation_service import GenerationService, Overloaded, RequestTooLarge
from cosmos3_serve.server.jobs import Job, JobStatus
from cosmos3_serve.server.protocol import (
    MAX_ACTION_CHUNK,
    MAX_FPS,
    MAX_GUIDANCE_SCALE,
    MAX_STEPS,
    FieldError,
    ModeUnavailable,
    VideoGenerateBody,
    error_field,
    from_video_body,
)
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

router = APIRouter()


class SessionStart(BaseModel):
    """The robot's settings, for every observation of the session."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["start"]
    prompt: str = Field(..., min_length=1, description="the instruction")
    negative_prompt: str | None = None
    action_domain: str
    action_chunk_size: int = Field(..., ge=1, le=MAX_ACTION_CHUNK)
    action_resolution_tier: Literal[256, 480, 704, 720] = 480
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    fps: float = Field(24.0, gt=0, le=MAX_FPS)
    num_inference_steps: int = Field(35, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(6.0, ge=0.0, le=MAX_GUIDANCE_SCALE)
    actions_only: bool = Field(True, description="skip the predicted video's decode; answer the actions only")


class Observation(BaseModel):
    """What the robot sees now: its camera frame (`image`) or its last frames (`video`, MP4), as data URLs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["observation"]
    id: str = Field(..., min_length=1, max_length=128)
    image: str | None = None
    video: str | None = None
    prompt: str | None = Field(None, min_length=1, description="a new instruction, from this observation on")
    seed: int | None = Field(None, ge=0, lt=2**63)


class RobotSession:
    """One robot's connection: its settings, its jobs in flight, and the answers it is sent (one writer at a time)."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        state = websocket.app.state.cosmos3
        self.state = state
        self.start: SessionStart | None = None
        self.jobs: dict[str, Job] = {}  # observation id -> its job in flight
        self.tasks: set[asyncio.Task] = set()
        self.send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.websocket.send_json(message)

    async def error(self, observation_id: str | None, code: int, param: str | None, message: str) -> None:
        await self.send({"type": "error", "id": observation_id, "code": code, "param": param, "message": message})

    async def receive(self, raw: str) -> None:
        try:
            message = json.loads(raw)
        except json.JSONDecodeError:
            return await self.error(None, 400, "message", "is not JSON")
        if not isinstance(message, dict):
            return await self.error(None, 400, "message", "must be a JSON object")
        kind = message.get("type")
        if kind == "start":
            try:
                self.start = SessionStart.model_validate(message)
            except ValidationError as error:
                return await self.error(None, 422, *error_field(error.errors()[0], "message"))
            return await self.send({"type": "started", "actions_only": self.start.actions_only})
        if kind != "observation":
            return await self.error(message.get("id"), 422, "type", "must be 'start' or 'observation'")
        if self.start is None:
            return await self.error(message.get("id"), 409, "type", "send the session's 'start' message first")
        try:
            observation = Observation.model_validate(message)
        except ValidationError as error:
            return await self.error(message.get("id"), 422, *error_field(error.errors()[0], "message"))
        if observation.id in self.jobs:
            return await self.error(observation.id, 409, "id", "an observation with this id is still running")
        task = asyncio.create_task(self.act(observation))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def act(self, observation: Observation) -> None:
        """One policy job for `observation`, answered with its actions (or an error)."""
        received = time.perf_counter()
        service: GenerationService = self.state.service
        if not service.ready or not self.state.lifecycle.accepting:
            return await self.error(observation.id, 503, None, "the server is loading or draining; retry")
        start = self.start
        body = VideoGenerateBody(
            mode="policy", prompt=observation.prompt or start.prompt, negative_prompt=start.negative_prompt,
            image=observation.image, video=observation.video, height=start.height, width=start.width, fps=start.fps,
            num_inference_steps=start.num_inference_steps, guidance_scale=start.guidance_scale, seed=observation.seed,
            action_domain=start.action_domain, action_chunk_size=start.action_chunk_size,
            action_resolution_tier=start.action_resolution_tier,
        )  # fmt: skip
        try:
            mode, request = from_video_body(body, self.state.checkpoint_info, self.state.settings.input_limits)
            job = service.submit(request, mode, decode_video=not start.actions_only)
        except FieldError as error:
            return await self.error(observation.id, 422, error.field, error.message)
        except ModeUnavailable as error:
            return await self.error(observation.id, 400, "mode", str(error))
        except RequestTooLarge as error:
            return await self.error(observation.id, 413, error.field, str(error))
        except Overloaded as error:
            return await self.error(observation.id, 429, None, f"{error}; retry in {error.retry_after_s} s")
        self.jobs[observation.id] = job
        try:
            await service.wait(job)
        finally:
            self.jobs.pop(observation.id, None)
        if job.status is not JobStatus.SUCCEEDED:
            return await self.error(observation.id, job.error_status if job.status is JobStatus.FAILED else 409,
                                    None, f"policy job {job.id} {job.status.value}: {job.error}")  # fmt: skip
        output = job.output
        service.forget(job)
        answer = {"type": "actions", "id": observation.id, "job_id": job.id, "actions": output.actions,
                  "seed": output.seed, "latency_ms": round((time.perf_counter() - received) * 1e3, 1)}  # fmt: skip
        if output.content is not None:
            answer["b64_video"] = base64.b64encode(output.content).decode()
        await self.send(answer)

    async def close(self) -> None:
        """The robot went away: its jobs in flight are cancelled."""
        for task in list(self.tasks):
            task.cancel()
        for job in list(self.jobs.values()):
            await self.state.service.cancel(job)


@router.websocket("/v1/robot/session")
async def robot_session(websocket: WebSocket) -> None:
    """A robot's persistent connection for policy steps (see the module's description)."""
    await websocket.accept()
    session = RobotSession(websocket)
    try:
        while True:
            await session.receive(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()
