"""A generation job as the API shows it: its status, progress events and output."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.server.encoding import mp4_bytes, png_bytes


class JobStatus(str, enum.Enum):
    QUEUED = "queued"  # waiting for room in the generator, or its prompts being prefilled
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass
class JobOutput:
    content: bytes | None  # PNG for one frame, else MP4; None for a mode without video (inverse dynamics)
    media_type: str | None
    seed: int
    actions: list[list[float]] | None = None  # [chunk, action width] of policy and inverse dynamics


@dataclass(frozen=True)
class JobParams:
    """What a job was asked for, as kept with it in the store (the OpenAI video object shows it)."""

    prompt: str
    width: int
    height: int
    num_frames: int
    fps: float

    @classmethod
    def of(cls, request: GenerationRequest) -> JobParams:
        return cls(request.prompt, request.width, request.height, request.num_frames, request.fps)


@dataclass
class Job:
    id: str
    mode: str
    request: GenerationRequest
    created: float = field(default_factory=time.time)
    status: JobStatus = JobStatus.QUEUED
    steps_done: int = 0
    output: JobOutput | None = None
    error: str | None = None
    error_status: int = 500  # the HTTP status of a failure: 503 where retrying elsewhere may succeed
    finished_at: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds (`metrics.PHASE_SECONDS`)
    first_step_at: float | None = None
    prompts: list[list[int]] = field(default_factory=list, repr=False)  # token ids of its prompts, once known
    state_bytes: int = 0  # what it holds on the device from its prefill to its result (`RequestCost.state_bytes`)
    memory_wait_since: float | None = None  # when it began to wait for room in the state budget
    decode_video: bool = True  # False: the actions only (a robot's policy step); the video is never decoded
    _events: list[asyncio.Queue] = field(default_factory=list, repr=False)

    @property
    def steps_total(self) -> int:
        return self.request.num_inference_steps

    @property
    def params(self) -> JobParams:
        return JobParams.of(self.request)

    def snapshot(self) -> dict[str, Any]:
        """The job as the API shows it."""
        return job_snapshot(self.id, self.mode, self.status.value, self.steps_done, self.steps_total, self.created,
                            self.finished_at, self.request.seed, self.error)  # fmt: skip

    def publish(self) -> None:
        for queue in self._events:
            queue.put_nowait(self.snapshot())

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Snapshots from now until the job is final (the first one at once)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._events.append(queue)
        try:
            snapshot = self.snapshot()
            while True:
                yield snapshot
                if JobStatus(snapshot["status"]).final:
                    return
                snapshot = await queue.get()
        finally:
            self._events.remove(queue)


def job_snapshot(job_id: str, mode: str, status: str, steps_done: int, steps_total: int, created: float,
                 finished_at: float | None, seed: int | None, error: str | None) -> dict[str, Any]:  # fmt: skip
    """A job as the API shows it, whether in flight (`Job`) or read back from the store (`StoredJob`)."""
    return {"id": job_id, "object": "video.generation", "mode": mode, "status": status, "steps_done": steps_done,
            "steps_total": steps_total, "progress": steps_done / steps_total, "created": int(created),
            "finished_at": None if finished_at is None else int(finished_at), "seed": seed, "error": error}  # fmt: skip


def job_output(job: Job, frames: np.ndarray | None, actions: np.ndarray | None) -> JobOutput:
    """The job's result as the API returns it: PNG for one frame, H.264 MP4 at the request's fps, actions.
    ValueError when the actions are not finite (JSON cannot carry them, and they are no answer)."""
    if actions is not None and not np.isfinite(actions).all():
        raise ValueError("the generated actions are not finite: the denoising diverged")
    content, media_type = None, None
    if frames is not None:
        if frames.shape[0] == 1:
            content, media_type = png_bytes(frames[0]), "image/png"
        else:
            content, media_type = mp4_bytes(frames, job.request.fps), "video/mp4"
    actions = None if actions is None else actions.tolist()
    return JobOutput(content=content, media_type=media_type, seed=job.request.seed, actions=actions)
