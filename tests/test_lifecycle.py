"""The server's life and death as a supervisor sees it, on real servers on localhost (tiny checkpoint, CPU):
SIGTERM drains (503 for new work, jobs finish within the grace period or fail, every client answered, exit 0);
a dead engine core fails every job and ends the server with a non-zero code; a killed server leaves no process
behind."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.server_process import EAGER, ServerProcess, free_port, sse_events

LONG_VIDEO = {"prompt": "A long one.", "num_frames": 33, "height": 512, "width": 512, "num_inference_steps": 100}
SHORT_VIDEO = {**LONG_VIDEO, "prompt": "A short one.", "num_inference_steps": 4}  # seconds on a CPU
GRACE_S = 30  # the short video finishes within it, the long one (minutes on a CPU) does not


def start_server(checkpoint: Path, *flags: str) -> ServerProcess:
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "cosmos3_serve.server.cli", "serve", str(checkpoint),
                            "--port", str(port), "--precision", "fp32", "--max-model-len", "2048",
                            *EAGER, *flags], port)  # fmt: skip
    server.wait_ready(path="/v1/health/ready")
    return server


class EventFollower(threading.Thread):
    """Follows one job's event stream to its end, from a thread: the events it got, and whether it ended."""

    def __init__(self, base_url: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{base_url}/v1/video/generate/{job_id}/events"
        self.events: list[tuple[str, dict]] = []
        self.running = threading.Event()

    def run(self) -> None:
        try:
            with httpx.Client(timeout=120) as client, client.stream("GET", self.url) as response:
                for kind, data in sse_events(response):
                    self.events.append((kind, data))
                    if data["status"] == "running" and data["steps_done"] >= 1:
                        self.running.set()
        except httpx.TransportError:  # the server was killed: the events so far are what the test reads
            pass


def start_async(server: ServerProcess, body: dict) -> EventFollower:
    """Submits `body` as an async job and follows its events until it has denoised a step."""
    submitted = httpx.post(f"{server.base_url}/v1/video/generate", json={**body, "response": "async"}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    follower = EventFollower(server.base_url, submitted.json()["id"])
    follower.start()
    assert follower.running.wait(300), "the job never started denoising"
    return follower


def test_sigterm_drains_then_exits_zero(tiny_checkpoint: Path) -> None:
    server = start_server(tiny_checkpoint, "--shutdown-grace-s", str(GRACE_S))
    try:
        short_job = start_async(server, SHORT_VIDEO)
        sync_answer: list[httpx.Response] = []
        sync_client = threading.Thread(target=lambda: sync_answer.append(
            httpx.post(f"{server.base_url}/v1/video/generate", json=LONG_VIDEO, timeout=300)))  # fmt: skip
        sync_client.start()
        time.sleep(2.0)  # the long job is submitted: it waits for the short one's place in the step batch
        signalled_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(f"{server.base_url}/v1/video/generate", json=SHORT_VIDEO, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{server.base_url}/v1/health/ready", timeout=30).status_code == 503
        assert httpx.get(f"{server.base_url}/v1/health/live", timeout=30).status_code == 200

        short_job.join(GRACE_S)
        kind, final = short_job.events[-1]
        assert kind == "done" and final["status"] == "succeeded"  # it finished within the grace period
        content = httpx.get(f"{server.base_url}/v1/video/generate/{final['id']}/content", timeout=30)
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"  # still served
        sync_client.join(GRACE_S + 30)
        [answer] = sync_answer  # the synchronous client is answered: its job failed at the end of the grace period
        assert answer.status_code == 503 and "shut down" in answer.json()["error"]["message"]
        assert time.monotonic() - signalled_at >= GRACE_S - 1
        assert server.process.wait(timeout=60) == 0, server.output[-3000:]
    finally:
        server.stop()


def test_a_dead_engine_fails_every_job_and_exits_nonzero(tiny_checkpoint: Path) -> None:
    server = start_server(tiny_checkpoint)
    try:
        long_job = start_async(server, LONG_VIDEO)
        [engine] = [child for child in psutil.Process(server.process.pid).children() if "EngineCore" in child.name()]
        engine.kill()
        statuses = []
        while server.process.poll() is None:
            try:
                statuses.append(httpx.get(f"{server.base_url}/v1/health/ready", timeout=5).status_code)
            except httpx.TransportError:
                break
            time.sleep(0.02)
        assert server.process.wait(timeout=60) != 0
        down = next((i for i, status in enumerate(statuses) if status != 200), len(statuses))
        assert 200 not in statuses[down:]  # never ready again once it noticed the engine was gone
        long_job.join(30)
        kind, final = long_job.events[-1]
        assert kind == "done" and final["status"] == "failed" and "engine" in final["error"]
    finally:
        server.stop()


def test_jobs_survive_a_crash_and_a_finished_one_is_freed_by_delete(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Killed with -9 mid-job (as the kernel's OOM killer does: no handler runs), the server leaves no process
    behind; started again on the same store: the finished job and its result are served, the running one is failed
    with the reason, and DELETE frees the finished one."""
    store = ["--job-store", str(tmp_path / "jobs")]
    first = start_server(tiny_checkpoint, *store)
    try:
        image = {**SHORT_VIDEO, "num_frames": 1, "response": "async"}
        done = httpx.post(f"{first.base_url}/v1/video/generate", json=image, timeout=30).json()
        follower = EventFollower(first.base_url, done["id"])
        follower.run()
        assert follower.events[-1][1]["status"] == "succeeded"
        content = httpx.get(f"{first.base_url}/v1/video/generate/{done['id']}/content", timeout=30).content
        running = start_async(first, LONG_VIDEO)
        children = psutil.Process(first.process.pid).children(recursive=True)
        assert children, "vLLM's engine core runs in a child process"
        first.process.kill()
        first.process.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        first.stop()
    second = start_server(tiny_checkpoint, *store)
    try:
        base = f"{second.base_url}/v1/video/generate"
        assert httpx.get(f"{base}/{done['id']}", timeout=30).json()["status"] == "succeeded"
        assert httpx.get(f"{base}/{done['id']}/content", timeout=30).content == content
        lost = httpx.get(f"{base}/{running.url.split('/')[-2]}", timeout=30).json()
        assert lost["status"] == "failed" and "stopped while the job ran" in lost["error"]
        deleted = httpx.delete(f"{base}/{done['id']}", timeout=30)
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert httpx.get(f"{base}/{done['id']}", timeout=30).status_code == 404
        assert httpx.get(f"{base}/{done['id']}/content", timeout=30).status_code == 404
        assert not (tmp_path / "jobs" / "results" / done["id"]).exists()
    finally:
        second.stop()
