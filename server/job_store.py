"""Generation jobs kept across restarts: their metadata in SQLite, their results in files beside it, bounded by
count, bytes and age.

A job is recorded when it is submitted, updated when it starts and when it ends; a finished job's media is written
to `results/<id>` and its actions into its row. At startup every job the previous process left unfinished is marked
failed with the reason, so a client polling it learns what happened instead of getting 404. Finished jobs leave
the store oldest first when there are more than `max_jobs`, their results hold more than `max_bytes`, or they are
older than `ttl_s`; `delete` removes one at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cosmos3_serve.server.jobs import Job, JobOutput, JobParams, JobStatus, job_snapshot

STOPPED_REASON = "the server stopped while the job ran; submit it again"
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, mode TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL, finished_at REAL,
    steps_done INTEGER NOT NULL, steps_total INTEGER NOT NULL, seed INTEGER, error TEXT, error_status INTEGER,
    media_type TEXT, actions TEXT, result_bytes INTEGER NOT NULL DEFAULT 0, params TEXT
)
"""
COLUMNS = ("id", "mode", "status", "created", "finished_at", "steps_done", "steps_total", "seed", "error",
           "error_status", "media_type", "actions", "result_bytes", "params")  # fmt: skip


class StoredJob:
    """A job read back from the store: what the routes read of a `Job` (status, snapshot, output, events)."""

    def __init__(self, row: dict[str, Any], result_path: Path) -> None:
        self.row, self.result_path = row, result_path
        self.id, self.status = row["id"], JobStatus(row["status"])
        self.error, self.error_status = row["error"], row["error_status"] or 500
        self.steps_done, self.steps_total = row["steps_done"], row["steps_total"]
        self.created, self.finished_at = row["created"], row["finished_at"]
        self.params = JobParams(**json.loads(row["params"])) if row["params"] else None

    def snapshot(self) -> dict[str, Any]:
        row = self.row
        return job_snapshot(row["id"], row["mode"], row["status"], row["steps_done"], row["steps_total"],
                            row["created"], row["finished_at"], row["seed"], row["error"])  # fmt: skip

    @property
    def output(self) -> JobOutput | None:
        if self.status is not JobStatus.SUCCEEDED:
            return None
        content = self.result_path.read_bytes() if self.row["media_type"] else None
        actions = None if self.row["actions"] is None else json.loads(self.row["actions"])
        return JobOutput(content=content, media_type=self.row["media_type"], seed=self.row["seed"], actions=actions)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        yield self.snapshot()


class JobStore:
    def __init__(self, directory: Path, max_jobs: int, max_bytes: int, ttl_s: float) -> None:
        self.directory, self.max_jobs, self.max_bytes, self.ttl_s = directory, max_jobs, max_bytes, ttl_s
        self.results = directory / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(directory / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(SCHEMA)
        if "params" not in {column[1] for column in self.db.execute("PRAGMA table_info(jobs)")}:  # an older store
            self.db.execute("ALTER TABLE jobs ADD COLUMN params TEXT")
        self._lock = threading.Lock()  # the event loop records metadata, encoding threads record results

    def recover(self) -> int:
        """Marks the jobs a previous process left unfinished as failed; returns how many."""
        with self._lock:
            cursor = self.db.execute(
                "UPDATE jobs SET status = ?, error = ?, error_status = 503, finished_at = ? WHERE status IN (?, ?)",
                (JobStatus.FAILED.value, STOPPED_REASON, time.time(), JobStatus.QUEUED.value, JobStatus.RUNNING.value),
            )
            return cursor.rowcount

    def record(self, job: Job) -> None:
        """Writes the job's metadata (on submission and on every change of status)."""
        row = {"id": job.id, "mode": job.mode, "status": job.status.value, "created": job.created,
               "finished_at": job.finished_at, "steps_done": job.steps_done, "steps_total": job.steps_total,
               "seed": job.request.seed, "error": job.error, "error_status": job.error_status, "media_type": None,
               "actions": None, "result_bytes": 0, "params": json.dumps(asdict(job.params))}  # fmt: skip
        if job.output is not None:
            row["media_type"] = job.output.media_type
            row["actions"] = None if job.output.actions is None else json.dumps(job.output.actions)
            if job.output.content is not None:
                (self.results / job.id).write_bytes(job.output.content)
                row["result_bytes"] = len(job.output.content)
        placeholders = ", ".join("?" for _ in COLUMNS)
        with self._lock:
            self.db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                            [row[column] for column in COLUMNS])  # fmt: skip
            if job.status.final:
                self._evict()

    def get(self, job_id: str) -> StoredJob | None:
        with self._lock:
            found = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if found is None else StoredJob(dict(zip(COLUMNS, found)), self.results / job_id)

    def delete(self, job_id: str) -> bool:
        with self._lock:
            return self._delete(job_id)

    def list_ids(self, after: str | None, limit: int, ascending: bool) -> tuple[list[str], bool]:
        """Up to `limit` job ids by creation time (oldest first if `ascending`), after the job `after` (None: from
        the start); and whether more follow. KeyError when `after` is not a stored job."""
        order = "ASC" if ascending else "DESC"
        with self._lock:
            if after is None:
                rows = self.db.execute(f"SELECT id FROM jobs ORDER BY created {order}, id {order} LIMIT ?",
                                       (limit + 1,)).fetchall()  # fmt: skip
            else:
                anchor = self.db.execute("SELECT created FROM jobs WHERE id = ?", (after,)).fetchone()
                if anchor is None:
                    raise KeyError(after)
                beyond = ">" if ascending else "<"
                rows = self.db.execute(
                    f"SELECT id FROM jobs WHERE (created, id) {beyond} (?, ?) ORDER BY created {order}, id {order} "
                    "LIMIT ?", (anchor[0], after, limit + 1)).fetchall()  # fmt: skip
        ids = [row[0] for row in rows]
        return ids[:limit], len(ids) > limit

    def evict(self) -> None:
        with self._lock:
            self._evict()

    def _delete(self, job_id: str) -> bool:
        deleted = self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0
        (self.results / job_id).unlink(missing_ok=True)
        return deleted

    def _evict(self) -> None:
        """Finished jobs past the age, count or bytes bounds leave, oldest first."""
        finished = self.db.execute(
            "SELECT id, finished_at, result_bytes FROM jobs WHERE finished_at IS NOT NULL ORDER BY finished_at DESC"
        ).fetchall()
        kept_bytes, now = 0, time.time()
        for index, (job_id, finished_at, result_bytes) in enumerate(finished):
            kept_bytes += result_bytes
            if index >= self.max_jobs or kept_bytes > self.max_bytes or now - finished_at > self.ttl_s:
                self._delete(job_id)
                kept_bytes -= result_bytes

    def close(self) -> None:
        with self._lock:
            self.db.close()
