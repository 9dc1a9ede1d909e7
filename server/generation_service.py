"""The generator sidecar behind the HTTP API: jobs, one step loop for all of them, progress.

A job's prompts are prefilled by the async engine as generation contexts (concurrently with the step loop and
with chat traffic); then the job is admitted into the diffusion executor that lives in vLLM's worker
(`worker_extension`). One loop drives the executor: every `cosmos3_tick` call denoises the admitted jobs by one
step, so jobs that arrive while others run join the batch at the next step. A finished job's frames come back
once, are encoded (PNG / MP4) off the event loop and kept until the client fetches them (or `result_ttl_s`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from cosmos3_serve.model_executor import kv_export
from cosmos3_serve.model_executor.generation import GenerationRequest
from cosmos3_serve.model_executor.generation_client import GenerationPrompts, GenerationResult, new_export_keys
from cosmos3_serve.model_executor.worker_extension import request_to_payload
from cosmos3_serve.server import metrics
from cosmos3_serve.server.encoding import mp4_bytes, png_bytes

logger = logging.getLogger(__name__)


class JobStatus(str, enum.Enum):
    QUEUED = "queued"  # prompts being prefilled, not yet in the batch
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
    finished_at: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds (`metrics.PHASE_SECONDS`)
    first_step_at: float | None = None
    _events: list[asyncio.Queue] = field(default_factory=list, repr=False)

    @property
    def steps_total(self) -> int:
        return self.request.num_inference_steps

    def snapshot(self) -> dict[str, Any]:
        """The job as the API shows it."""
        return {
            "id": self.id,
            "object": "video.generation",
            "mode": self.mode,
            "status": self.status.value,
            "steps_done": self.steps_done,
            "steps_total": self.steps_total,
            "progress": self.steps_done / self.steps_total,
            "created": int(self.created),
            "finished_at": None if self.finished_at is None else int(self.finished_at),
            "seed": self.request.seed,
            "error": self.error,
        }

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


def job_output(job: Job, result: GenerationResult) -> JobOutput:
    """The job's result as the API returns it: PNG for one frame, H.264 MP4 at the request's fps, actions."""
    content, media_type = None, None
    if result.video is not None:
        frames = result.video.numpy()
        if frames.shape[0] == 1:
            content, media_type = png_bytes(frames[0]), "image/png"
        else:
            content, media_type = mp4_bytes(frames, job.request.fps), "video/mp4"
    actions = None if result.actions is None else result.actions.tolist()
    return JobOutput(content=content, media_type=media_type, seed=job.request.seed, actions=actions)


class Overloaded(Exception):
    """Too many jobs waiting or running; the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many generation jobs in flight; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class GenerationService:
    """Jobs over the diffusion executor of an async vLLM engine built with `generation_engine_args()`."""

    def __init__(self, engine_client, checkpoint: Path, max_jobs: int = 64, result_ttl_s: float = 3600.0) -> None:
        self.engine = engine_client
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint / "text_tokenizer")
        self.prompts = GenerationPrompts(self.tokenizer)
        self.max_jobs, self.result_ttl_s = max_jobs, result_ttl_s
        self.jobs: dict[str, Job] = {}
        self.ready = False
        self.generator_info: dict[str, Any] = {}
        self._admitted: dict[str, Job] = {}  # in the executor (stepping, or waiting for a place in its batch)
        self._admissions: list[tuple[Job, list[str]]] = []  # prefilled, waiting for the step loop to admit them
        self._cancellations: list[str] = []  # admitted jobs cancelled since the last tick
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    async def start(self, warmup: GenerationRequest | None = None, max_batch_tokens: int | None = None,
                    vae_dtype: str = "float32") -> None:  # fmt: skip
        """Load the generator in the worker (steps of at most `max_batch_tokens` generator tokens, the executor's
        default if None; the VAE in `vae_dtype`), start the step loop, run `warmup` through it, then be ready."""
        options = {"vae_dtype": vae_dtype}
        if max_batch_tokens is not None:
            options["max_batch_tokens"] = max_batch_tokens
        self.generator_info = await self._rpc("cosmos3_load_generator", **options)
        self._loop_task = asyncio.create_task(self._step_loop())
        if warmup is not None:
            job = self.submit(warmup, mode="warmup")
            await self.wait(job)
            self.jobs.pop(job.id, None)
            if job.status is not JobStatus.SUCCEEDED:
                raise RuntimeError(f"warm-up generation failed: {job.error}")
        self.ready = True

    async def stop(self) -> None:
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                task.cancel()

    # ---- jobs -------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, mode: str) -> Job:
        self._forget_expired()
        in_flight = sum(1 for job in self.jobs.values() if not job.status.final)
        if in_flight >= self.max_jobs:
            metrics.REJECTED.labels(mode=mode).inc()
            raise Overloaded(retry_after_s=max(1, int(self._typical_job_s())))
        job = Job(id=f"gen-{uuid.uuid4().hex}", mode=mode, request=request)
        self.jobs[job.id] = job
        metrics.QUEUE_DEPTH.inc()
        self._spawn(self._admit(job))
        return job

    async def wait(self, job: Job) -> Job:
        async for _ in job.events():
            pass
        return job

    async def cancel(self, job: Job) -> None:
        """Cancel a job: it leaves the batch before the next step and its K/V and latents are released."""
        if job.status.final:
            return
        if self._admitted.pop(job.id, None) is not None:
            self._cancellations.append(job.id)  # the executor drops it at the next tick
            self._wake.set()
        self._finish(job, JobStatus.CANCELLED)

    def forget(self, job: Job) -> None:
        """Drop a final job and its output (a sync response has delivered it)."""
        if job.status.final:
            self.jobs.pop(job.id, None)

    def _forget_expired(self) -> None:
        now = time.time()
        for job_id in [j.id for j in self.jobs.values() if j.finished_at and now - j.finished_at > self.result_ttl_s]:
            del self.jobs[job_id]

    def _typical_job_s(self) -> float:
        done = [j.finished_at - j.created for j in self.jobs.values() if j.status is JobStatus.SUCCEEDED]
        return sum(done) / len(done) if done else 10.0

    # ---- admission: prompts through the reasoner once ---------------------------------------------------

    async def _admit(self, job: Job) -> None:
        """Prefill the job's prompts, then queue it for the step loop, which admits what has queued in one call."""
        try:
            reasoning = await self._reason(job) if job.request.reason_first else None
            prompts = self.prompts.context(job.request, reasoning)
            keys = new_export_keys(len(prompts))
            await asyncio.gather(*(self._prefill(ids, key) for ids, key in zip(prompts, keys)))
        except Exception as exc:  # noqa: BLE001 - a failed job must not take the service down
            self._finish(job, JobStatus.FAILED, error=f"admission failed: {exc}")
            return
        job.phases["prefill"] = time.time() - job.created
        self._admissions.append((job, keys))
        self._wake.set()

    async def _prefill(self, prompt_token_ids: list[int], key: str) -> None:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, extra_args=kv_export.generation_context_args(key))
        final = None
        async for output in self.engine.generate({"prompt_token_ids": prompt_token_ids}, params, request_id=key):
            final = output
        cached = final.num_cached_tokens or 0
        metrics.PROMPT_KV_TOKENS.labels(source="prefix_cache").inc(cached)
        metrics.PROMPT_KV_TOKENS.labels(source="computed").inc(len(prompt_token_ids) - cached)

    async def _reason(self, job: Job) -> list[int]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=job.request.reasoning_max_tokens,
                                stop_token_ids=[self.tokenizer.eos_token_id])  # fmt: skip
        final = None
        chat = self.prompts.reasoning_chat(job.request)
        async for output in self.engine.generate({"prompt_token_ids": chat}, params, request_id=f"{job.id}-reason"):
            final = output
        return self.prompts.answer(list(final.outputs[0].token_ids))

    # ---- the step loop ----------------------------------------------------------------------------------

    async def _step_loop(self) -> None:
        """One `cosmos3_tick` per denoising step: it admits what has been prefilled since the last one, drops what
        was cancelled, steps the batch and returns what finished (decoded)."""
        while True:
            if not (self._admitted or self._admissions or self._cancellations):
                self._wake.clear()
                await self._wake.wait()
                continue
            queued, self._admissions = self._admissions, []
            cancel, self._cancellations = self._cancellations, []
            forget = [key for job, keys in queued if job.status.final for key in keys]  # cancelled while prefilling
            admit = {job.id: (job, keys) for job, keys in queued if not job.status.final}
            entries = [(job.id, request_to_payload(job.request), keys) for job, keys in admit.values()]
            for job, _ in admit.values():
                self._admitted[job.id] = job
            started = time.perf_counter()
            try:
                tick = await self._rpc("cosmos3_tick", entries, cancel, forget, True)
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                for job in list(self._admitted.values()):
                    self._drop(job, error=f"denoising failed: {exc}")
                continue
            metrics.STEP_SECONDS.observe(time.perf_counter() - started)
            if tick["progress"]:
                metrics.BATCH_SIZE.observe(len(tick["progress"]))
            self._admitted_by(tick["errors"], [job for job, _ in admit.values()])
            self._progress(tick["progress"])
            finished = [self._admitted.pop(job_id) for job_id in tick["results"] if job_id in self._admitted]
            for job in finished:
                job.phases["decode"] = tick["decode_s"][job.id]
            if finished:
                self._spawn(self._encode(finished, tick["results"]))

    def _admitted_by(self, errors: dict[str, str], jobs: list[Job]) -> None:
        """Jobs of a tick's admission: failed where the executor refused them, else running."""
        for job in jobs:
            if job.id in errors:
                self._admitted.pop(job.id, None)
                self._finish(job, JobStatus.FAILED, error=f"admission failed: {errors[job.id]}")
            elif job.status.final:  # cancelled during the tick: the next one drops it
                self._cancellations.append(job.id)
            else:
                metrics.QUEUE_DEPTH.dec()
                job.status = JobStatus.RUNNING
                job.publish()

    def _progress(self, progress: list[tuple[str, int, int]]) -> None:
        now = time.time()
        for job_id, done, _ in progress:
            job = self._admitted.get(job_id)
            if job is None:
                continue
            if job.first_step_at is None:
                job.first_step_at = now
                job.phases["queue"] = now - job.created - job.phases.get("prefill", 0.0)
            job.steps_done = done
            job.publish()

    async def _encode(self, jobs: list[Job], payloads: dict[str, dict[str, Any]]) -> None:
        """Encode the jobs that finished in one tick, each off the event loop (the encoders release the GIL)."""
        now = time.time()
        for job in jobs:
            job.phases["denoise"] = now - (job.first_step_at or now)
        encodings = [asyncio.to_thread(job_output, job, GenerationResult.from_payload(payloads[job.id])) for job in jobs]
        outputs = await asyncio.gather(*encodings, return_exceptions=True)
        for job, output in zip(jobs, outputs):
            if isinstance(output, Exception):
                self._finish(job, JobStatus.FAILED, error=f"encoding failed: {output}")
                continue
            job.output = output
            job.phases["encode"] = time.time() - now
            self._finish(job, JobStatus.SUCCEEDED)

    def _drop(self, job: Job, error: str) -> None:
        """Fail an admitted job; the next tick drops it from the executor."""
        self._admitted.pop(job.id, None)
        self._cancellations.append(job.id)
        self._finish(job, JobStatus.FAILED, error=error)

    def _finish(self, job: Job, status: JobStatus, error: str | None = None) -> None:
        if job.status.final:  # e.g. cancelled before its admission failed
            return
        if job.status is JobStatus.QUEUED:
            metrics.QUEUE_DEPTH.dec()
        job.status, job.error, job.finished_at = status, error, time.time()
        metrics.REQUESTS.labels(mode=job.mode, status=status.value).inc()
        if status is JobStatus.SUCCEEDED:
            metrics.LATENCY.labels(mode=job.mode).observe(job.finished_at - job.created)
            for phase, seconds in job.phases.items():
                metrics.PHASE_SECONDS.labels(mode=job.mode, phase=phase).observe(seconds)
        phases = ", ".join(f"{phase} {seconds:.3f}" for phase, seconds in job.phases.items())
        logger.info("%s %s %s: %.3f s from %.3f (%s)%s", job.mode, job.id, status.value, job.finished_at - job.created,
                    job.created, phases or "no phases", f": {error}" if error else "")  # fmt: skip
        job.publish()

    async def _rpc(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return (await self.engine.collective_rpc(method, args=args, kwargs=kwargs or None))[0]

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
