"""The job store against hand-worked cases: what it keeps across a reopen, what it evicts and in which order, and
what a job left unfinished becomes."""

from __future__ import annotations

import time
from pathlib import Path

from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.server.job_store import STOPPED_REASON, JobStore
from cosmos3_serve.server.jobs import Job, JobOutput, JobStatus


def finished_job(job_id: str, content: bytes, finished_at: float) -> Job:
    job = Job(id=job_id, mode="text2image", request=GenerationRequest("p", num_frames=1, height=32, width=32, seed=7))
    job.status, job.finished_at, job.steps_done = JobStatus.SUCCEEDED, finished_at, job.steps_total
    job.output = JobOutput(content=content, media_type="image/png", seed=7)
    return job


def test_a_finished_job_and_its_result_survive_a_reopen(tmp_path: Path) -> None:
    store = JobStore(tmp_path, max_jobs=10, max_bytes=1 << 20, ttl_s=3600)
    store.record(finished_job("a", b"png bytes", time.time()))
    store.close()
    reopened = JobStore(tmp_path, max_jobs=10, max_bytes=1 << 20, ttl_s=3600)
    job = reopened.get("a")
    assert job.status is JobStatus.SUCCEEDED and job.output.content == b"png bytes" and job.output.seed == 7
    assert job.snapshot()["progress"] == 1.0
    assert reopened.delete("a") and reopened.get("a") is None and not (tmp_path / "results" / "a").exists()


def test_jobs_left_unfinished_come_back_failed_with_the_reason(tmp_path: Path) -> None:
    store = JobStore(tmp_path, max_jobs=10, max_bytes=1 << 20, ttl_s=3600)
    running = Job(id="r", mode="text2video", request=GenerationRequest("p", num_frames=5, height=32, width=32))
    running.status = JobStatus.RUNNING
    store.record(running)
    store.record(finished_job("done", b"x", time.time()))
    store.close()
    reopened = JobStore(tmp_path, max_jobs=10, max_bytes=1 << 20, ttl_s=3600)
    assert reopened.recover() == 1
    job = reopened.get("r")
    assert job.status is JobStatus.FAILED and job.error == STOPPED_REASON and job.error_status == 503
    assert reopened.get("done").status is JobStatus.SUCCEEDED


def test_finished_jobs_leave_oldest_first_past_the_count_bytes_and_age_bounds(tmp_path: Path) -> None:
    now = time.time()
    by_count = JobStore(tmp_path / "count", max_jobs=2, max_bytes=1 << 20, ttl_s=3600)
    for i, job_id in enumerate("abc"):
        by_count.record(finished_job(job_id, b"x", now + i))
    assert [by_count.get(j) is not None for j in "abc"] == [False, True, True]

    by_bytes = JobStore(tmp_path / "bytes", max_jobs=10, max_bytes=250, ttl_s=3600)
    for i, job_id in enumerate("abc"):
        by_bytes.record(finished_job(job_id, b"x" * 100, now + i))  # the newest two fit in 250 bytes
    assert [by_bytes.get(j) is not None for j in "abc"] == [False, True, True]
    assert sorted(p.name for p in (tmp_path / "bytes" / "results").iterdir()) == ["b", "c"]

    by_age = JobStore(tmp_path / "age", max_jobs=10, max_bytes=1 << 20, ttl_s=60)
    by_age.record(finished_job("old", b"x", now - 120))
    by_age.record(finished_job("new", b"x", now))
    assert by_age.get("old") is None and by_age.get("new") is not None
