"""The generator sidecar behind the HTTP API: jobs, their admission under the deployment's limits, progress.

A job is checked against the deployment's limits when it is submitted (a request that can never run is refused at
once), then waits until the requests in flight leave room in the generator's state budget; its prompts are then
prefilled by the async engine as generation contexts (concurrently with chat traffic) and it is admitted into the
generator loop in vLLM's worker (`generator_loop`), which denoises it with every other job in flight on its own
thread. The loop's events (progress, results) arrive on the service's event socket; a finished job's frames are
encoded (PNG / MP4) off the event loop and kept in the `JobStore` (bounded, across restarts). The protocol
itself is `DriverCore`'s, shared with the synchronous `Cosmos3Generator`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from cosmos3_serve.model_executor import kv_export
from cosmos3_serve.model_executor.admission import GenerationLimits, LatentGeometry, RequestCost, capacity
from cosmos3_serve.model_executor.event_channel import EventChannel
from cosmos3_serve.model_executor.generation_client import GenerationPrompts, new_export_keys
from cosmos3_serve.model_executor.generation_driver import DriverCore, Update
from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.model_executor.wire import request_to_payload
from cosmos3_serve.server import metrics
from cosmos3_serve.server.job_store import JobStore, StoredJob
from cosmos3_serve.server.jobs import Job, JobStatus, job_output

logger = logging.getLogger(__name__)
WARMUP_MODE = "warmup"  # the startup job: not stored, not counted


class Overloaded(Exception):
    """Too many jobs waiting or running; the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many generation jobs in flight; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class RequestTooLarge(ValueError):
    """The request can never run on this deployment: answered with 413 naming the limit's field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class GenerationService:
    """Jobs over the generator loop of an async vLLM engine built with `generation_engine_args(...)`."""

    def __init__(self, engine_client, checkpoint: Path, store: JobStore, max_jobs: int = 64,
                 job_id_prefix: str = "gen-") -> None:  # fmt: skip
        self.engine = engine_client
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint / "text_tokenizer")
        self.prompts = GenerationPrompts(self.tokenizer)
        # A token of a byte-level BPE vocabulary spells at most this many characters (Unicode normalisation may
        # merge up to two into one): a longer text has more tokens than a prompt may hold, known without tokenizing.
        self.chars_per_token_bound = 2 * max(len(token) for token in self.tokenizer.get_vocab())
        self.geometry = LatentGeometry.from_checkpoint(checkpoint)
        self.store, self.max_jobs, self.job_id_prefix = store, max_jobs, job_id_prefix
        self.jobs: dict[str, Job] = {}  # from submission until the store holds their final state
        self._delivered: set[str] = set()  # jobs whose result a synchronous response carried: not stored
        self._recent_job_s: collections.deque[float] = collections.deque(maxlen=32)
        self.ready = False
        self.failure: str | None = None  # why the generator loop stopped, once it has
        self.generator_info: dict[str, Any] = {}
        self.limits: GenerationLimits | None = None
        self.core: DriverCore | None = None
        self._waiting: list[Job] = []  # submitted, waiting for room in the state budget (first in, first out)
        self._following: dict[str, Job] = {}  # from their prefill to their result
        self._events: EventChannel | None = None
        self._flush_wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []

    async def start(self, warmup: GenerationRequest | None = None) -> None:
        """Start the generator loop in the worker (loaded and measured while vLLM started), then run `warmup`
        through it, then be ready."""
        self._events = EventChannel(asynchronous=True)
        self.generator_info = await self._rpc("cosmos3_start_generator", self._events.address)
        raw = self.generator_info["limits"]
        # A prompt's prefill computes one token within the engine's context, fitted to the KV cache at startup.
        max_prompt_tokens = min(raw["max_prompt_tokens"], self.engine.model_config.max_model_len - 1)
        self.limits = GenerationLimits(**{**raw, "max_shape": tuple(raw["max_shape"]),
                                          "max_prompt_tokens": max_prompt_tokens})  # fmt: skip
        self.generator_info["limits"] = {**raw, "max_prompt_tokens": max_prompt_tokens}
        self.core = DriverCore(self.limits.state_budget_bytes)
        self._loops = [asyncio.create_task(self._receive_events()), asyncio.create_task(self._flush_commands())]
        if warmup is not None:
            job = self.submit(warmup, mode=WARMUP_MODE)
            await self.wait(job)
            self.jobs.pop(job.id, None)
            if job.status is not JobStatus.SUCCEEDED:
                raise RuntimeError(f"warm-up generation failed: {job.error}")
        self.ready = True

    async def stop(self) -> None:
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        if self._events is not None:
            self._events.close()
        self.store.close()

    # ---- jobs -------------------------------------------------------------------------------------------

    def capacity(self, max_model_len: int) -> dict[str, int | None]:
        """Chat and generation load the deployment holds at once (`admission.capacity`); empty before `start`."""
        if not self.generator_info:
            return {}
        return capacity(self.limits, self.geometry, self.generator_info.get("kv_cache_tokens"), max_model_len)

    def submit(self, request: GenerationRequest, mode: str, decode_video: bool = True) -> Job:
        """A new job, or RequestTooLarge when the request can never run here, or Overloaded when the service is
        full. Its prompts are tokenized now: their length is part of what the job costs. Without `decode_video`
        (an action mode) the job answers its actions only and its video is never decoded."""
        prompts, state_bytes = self._plan(request)
        in_flight = sum(1 for job in self.jobs.values() if not job.status.final)
        if in_flight >= self.max_jobs:
            metrics.REJECTED.labels(mode=mode).inc()
            raise Overloaded(retry_after_s=max(1, int(self._typical_job_s())))
        job = Job(id=f"{self.job_id_prefix}{uuid.uuid4().hex}", mode=mode, request=request, prompts=prompts,
                  state_bytes=state_bytes, decode_video=decode_video)  # fmt: skip
        self.jobs[job.id] = job
        if job.mode != WARMUP_MODE:
            self.store.record(job)
        metrics.QUEUE_DEPTH.inc()
        self._waiting.append(job)
        self._admit_waiting()
        return job

    def _plan(self, request: GenerationRequest) -> tuple[list[list[int]], int]:
        """Its prompts' token ids (without reasoning: reason-then-generate counts its answer at its limit) and the
        bytes it will hold on the device; RequestTooLarge when either is over the deployment's limits."""
        cost = RequestCost.of(request, self.geometry)
        refusal = self.limits.refusal(request, cost)
        if refusal is not None:
            raise RequestTooLarge(*refusal)
        max_chars = self.chars_per_token_bound * self.limits.max_prompt_tokens
        for field in ("prompt", "negative_prompt"):
            text = getattr(request, field) or ""
            if len(text) > max_chars:
                raise RequestTooLarge(field, f"{len(text):,} characters: more than the {self.limits.max_prompt_tokens:,} "
                                             "tokens this deployment admits per prompt")  # fmt: skip
        prompts = self.prompts.context(request)
        counts = [len(ids) for ids in prompts]
        if request.reason_first:
            counts[0] = len(self.prompts.reasoning_chat(request)) + request.reasoning_max_tokens + 2
            if counts[0] > self.limits.max_prompt_tokens:
                raise RequestTooLarge("reasoning_max_tokens", f"the reasoning chat and its answer of up to "
                                      f"{request.reasoning_max_tokens:,} tokens need {counts[0]:,} prompt tokens; this "
                                      f"deployment admits at most {self.limits.max_prompt_tokens:,}")  # fmt: skip
        state_bytes = cost.state_bytes(sum(counts), self.limits.kv_bytes_per_token)
        refusal = self.limits.prompt_refusal(counts, state_bytes)
        if refusal is not None:
            raise RequestTooLarge(*refusal)
        return prompts, state_bytes

    async def wait(self, job: Job) -> Job:
        async for _ in job.events():
            pass
        return job

    async def cancel(self, job: Job) -> None:
        """Cancel a job: it leaves the batch at the loop's next step and its K/V and latents are released."""
        self._stop(job, JobStatus.CANCELLED)
        self._admit_waiting()

    def fail_all(self, reason: str, error_status: int = 503) -> None:
        """Fail every job not yet final with `reason` (their waiters get it at once); the loop releases them."""
        for job in [job for job in self.jobs.values() if not job.status.final]:
            self._stop(job, JobStatus.FAILED, reason, error_status)

    async def drain(self, grace_s: float, reason: str) -> None:
        """Wait up to `grace_s` for the jobs in flight to finish, then fail the rest with `reason`."""
        pending = [asyncio.create_task(self.wait(job)) for job in self.jobs.values() if not job.status.final]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
        self.fail_all(reason)

    def _stop(self, job: Job, status: JobStatus, error: str | None = None, error_status: int = 500) -> None:
        if job.status.final:
            return
        if job in self._waiting:
            self._waiting.remove(job)
        if self.core is not None:
            self.core.cancel(job.id)
        self._following.pop(job.id, None)
        self._flush_wake.set()
        self._finish(job, status, error=error, error_status=error_status)

    def find(self, job_id: str) -> Job | StoredJob | None:
        """A job in flight (or just finished) from memory, else from the store."""
        return self.jobs.get(job_id) or self.store.get(job_id)

    def forget(self, job: Job) -> None:
        """Drop a final job and its output (a sync response has delivered it)."""
        if job.status.final:
            self._delivered.add(job.id)
            self.jobs.pop(job.id, None)
            self.store.delete(job.id)

    def delete(self, job_id: str) -> bool:
        """Free a final job: its row and its result leave the store."""
        self.jobs.pop(job_id, None)
        return self.store.delete(job_id)

    def _typical_job_s(self) -> float:
        return sum(self._recent_job_s) / len(self._recent_job_s) if self._recent_job_s else 10.0

    # ---- admission: room in the generator, then the prompts through the reasoner once -------------------

    def _admit_waiting(self) -> None:
        """Start the prefill of waiting jobs, first come first served, while they fit the state budget."""
        while self._waiting and self.core.fits(self._waiting[0].state_bytes):
            job = self._waiting.pop(0)
            if job.memory_wait_since is not None:
                job.phases["memory_wait"] = time.time() - job.memory_wait_since
            keys = new_export_keys(len(job.prompts))
            self.core.start_prefill(job.id, keys, job.state_bytes)
            self._following[job.id] = job
            self._spawn(self._prefill_job(job, keys))
        if self._waiting and self._waiting[0].memory_wait_since is None:
            job = self._waiting[0]
            job.memory_wait_since = time.time()
            logger.info("%s %s waits for generator memory: it needs %.1f MiB, %.1f of %.1f MiB are held by %d "
                            "jobs in flight", job.mode, job.id, job.state_bytes / 2**20, self.core.held_bytes / 2**20,
                            self.core.state_budget_bytes / 2**20, len(self.core.held))  # fmt: skip

    async def _prefill_job(self, job: Job, keys: list[str]) -> None:
        """Prefill the job's prompts (after the reasoner's answer in reason-then-generate), then queue its
        admission; every exported K/V is forgotten if any prompt fails."""
        try:
            prompts = job.prompts
            if job.request.reason_first:
                prompts = self.prompts.context(job.request, await self._reason(job))
            outcomes = await asyncio.gather(*(self._prefill(ids, key) for ids, key in zip(prompts, keys)),
                                            return_exceptions=True)  # fmt: skip
            failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            if failures:
                raise failures[0]
        except Exception as exc:  # noqa: BLE001 - a failed job must not take the service down
            self.core.prefill_failed(job.id)
            self._following.pop(job.id, None)
            self._flush_wake.set()
            self._finish(job, JobStatus.FAILED, error=f"admission failed: {exc}")
            self._admit_waiting()
            return
        job.phases["prefill"] = time.time() - job.created
        self.core.prefilled(job.id, request_to_payload(job.request), decode=job.decode_video)
        self._flush_wake.set()

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

    # ---- the generator loop's commands and events -------------------------------------------------------

    async def _flush_commands(self) -> None:
        """Send the queued commands, in order, one RPC at a time (each returns at once: the loop applies them at its
        next step boundary)."""
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            commands = self.core.take_commands()
            if commands is not None:
                await self._rpc("cosmos3_submit", commands.to_payload())

    async def _receive_events(self) -> None:
        while True:
            header, arrays = await self._events.arecv()
            for update in self.core.apply(header, arrays):
                job = self._following.get(update.request_id)
                if job is not None:
                    self._update(job, update)
            if header["kind"] == "fatal":
                self.failure = f"the generator stopped: {header['error']}"
                self.fail_all(self.failure)
            if header["kind"] == "progress":
                metrics.STEP_SECONDS.observe(header["seconds"])
                metrics.BATCH_SIZE.observe(len(header["steps"]))
            self._flush_wake.set()  # a failure may have queued cancellations
            self._admit_waiting()

    def _update(self, job: Job, update: Update) -> None:
        if update.kind == "admitted":
            metrics.QUEUE_DEPTH.dec()
            job.status = JobStatus.RUNNING
            if job.mode != WARMUP_MODE:
                self.store.record(job)
            job.publish()
        elif update.kind == "progress":
            now = time.time()
            if job.first_step_at is None:
                job.first_step_at = now
                job.phases["queue"] = now - job.created - job.phases.get("prefill", 0.0)
            job.steps_done = update.steps_done
            job.publish()
        elif update.kind == "result":
            self._following.pop(job.id, None)
            job.phases["decode"] = update.decode_s
            self._spawn(self._encode(job, update.video, update.actions))
        elif update.kind == "failed":
            self._following.pop(job.id, None)
            self._finish(job, JobStatus.FAILED, error=update.error)

    async def _encode(self, job: Job, frames: np.ndarray | None, actions: np.ndarray | None) -> None:
        """Encode a finished job's result off the event loop (the encoders release the GIL)."""
        now = time.time()
        job.phases["denoise"] = now - (job.first_step_at or now)
        try:
            job.output = await asyncio.to_thread(job_output, job, frames if job.decode_video else None, actions)
        except Exception as exc:  # noqa: BLE001 - a failed encoding fails its job only
            self._finish(job, JobStatus.FAILED, error=f"encoding failed: {exc}")
            return
        job.phases["encode"] = time.time() - now
        self._finish(job, JobStatus.SUCCEEDED)

    def _finish(self, job: Job, status: JobStatus, error: str | None = None, error_status: int = 500) -> None:
        if job.status.final:  # e.g. cancelled before its admission failed
            return
        if job.status is JobStatus.QUEUED:
            metrics.QUEUE_DEPTH.dec()
        job.status, job.error, job.error_status, job.finished_at = status, error, error_status, time.time()
        metrics.REQUESTS.labels(mode=job.mode, status=status.value).inc()
        if status is JobStatus.SUCCEEDED:
            metrics.LATENCY.labels(mode=job.mode).observe(job.finished_at - job.created)
            for phase, seconds in job.phases.items():
                metrics.PHASE_SECONDS.labels(mode=job.mode, phase=phase).observe(seconds)
        phases = ", ".join(f"{phase} {seconds:.3f}" for phase, seconds in job.phases.items())
        logger.info("%s %s %s: %.3f s from %.3f (%s)%s", job.mode, job.id, status.value, job.finished_at - job.created,
                    job.created, phases or "no phases", f": {error}" if error else "")  # fmt: skip
        job.publish()
        if status is JobStatus.SUCCEEDED:
            self._recent_job_s.append(job.finished_at - job.created)
        if job.mode == WARMUP_MODE:
            return
        if job.output is not None and job.output.content is not None:
            self._spawn(self._store_result(job))  # the media's file is written off the event loop
        else:
            self.store.record(job)
            self.jobs.pop(job.id, None)

    async def _store_result(self, job: Job) -> None:
        await asyncio.to_thread(self.store.record, job)
        if job.id in self._delivered:
            self._delivered.discard(job.id)
            self.store.delete(job.id)
        self.jobs.pop(job.id, None)

    async def _rpc(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return (await self.engine.collective_rpc(method, args=args, kwargs=kwargs or None))[0]

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
