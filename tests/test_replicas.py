"""`serve --replicas 2` on the CPU: two whole servers behind one front end, over real HTTP and websockets. New
requests spread over the replicas, a job's requests reach the replica that runs it (its id says which), the job
list merges both, a robot's websocket is relayed, and the replicas die with the front end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import media
from tests.server_process import EAGER, ServerProcess, free_port

API_KEY = "replica-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
VIDEO = {"model": "cosmos3", "prompt": "A red cube on a table.", "size": "64x64", "num_frames": 5, "fps": 8,
         "num_inference_steps": 2, "guidance_scale": 1.0}  # fmt: skip


@pytest.fixture(scope="module")
def front(tiny_checkpoint: Path):
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "cosmos3_serve.server.cli", "serve", str(tiny_checkpoint),
                            "--replicas", "2", "--port", str(port), "--precision", "fp32", "--api-key", API_KEY,
                            "--served-model-name", "cosmos3", "--max-model-len", "2048", *EAGER], port)  # fmt: skip
    try:
        server.wait_ready(timeout_s=600, path="/v1/health/ready")
        yield server
    finally:
        server.stop()


def test_chat_through_the_front_end(front: ServerProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{front.base_url}/v1", api_key=API_KEY)
    reply = client.chat.completions.create(model="cosmos3", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Name a color."}])  # fmt: skip
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert httpx.post(f"{front.base_url}/v1/chat/completions", json={}).status_code == 401  # the replica's auth


def test_jobs_spread_over_replicas_and_come_back_from_their_own(front: ServerProcess) -> None:
    with httpx.Client(base_url=front.base_url, headers=AUTH, timeout=120) as http:
        created = [http.post("/v1/videos", json={**VIDEO, "seed": seed}) for seed in range(4)]
        assert all(response.status_code == 200 for response in created), [r.text for r in created]
        ids = [response.json()["id"] for response in created]
        # each creation returns at once (the job is queued), so in flight they alternate between the replicas
        assert {job_id.split("-")[1] for job_id in ids} == {"r0", "r1"}
        for job_id in ids:
            deadline = time.monotonic() + 300
            while (job := http.get(f"/v1/videos/{job_id}").json())["status"] not in ("completed", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert job["status"] == "completed" and job["id"] == job_id
            content = http.get(f"/v1/videos/{job_id}/content")
            assert content.status_code == 200 and content.content[4:8] == b"ftyp"  # an MP4, streamed through
        listed = http.get("/v1/videos", params={"limit": 3, "order": "asc"}).json()
        rest = http.get("/v1/videos", params={"limit": 3, "order": "asc", "after": listed["last_id"]}).json()
        pages = listed["data"] + rest["data"]
        assert listed["has_more"] and not rest["has_more"] and len(listed["data"]) == 3
        assert sorted(item["id"] for item in pages) == sorted(ids)  # both replicas' jobs, each once
        assert [item["created_at"] for item in pages] == sorted(item["created_at"] for item in pages)
        assert http.delete(f"/v1/videos/{ids[1]}").status_code == 200
        assert http.get(f"/v1/videos/{ids[1]}").status_code == 404
        assert http.get("/v1/videos/gen-r7-unknown").status_code == 404  # no such replica: asked of one, not found


def test_a_robot_session_is_relayed(front: ServerProcess) -> None:
    import websockets

    from tests.test_actions import CHUNK, DOMAIN, IMAGE, PROMPT

    url = front.base_url.replace("http://", "ws://") + "/v1/robot/session"
    start = {"type": "start", "prompt": PROMPT, "action_domain": DOMAIN, "action_chunk_size": CHUNK,
             "action_resolution_tier": 256, "fps": 16, "num_inference_steps": 1}  # fmt: skip

    async def robot() -> dict:
        async with websockets.connect(url, additional_headers=AUTH, max_size=None) as connection:
            await connection.send(json.dumps(start))
            assert json.loads(await connection.recv()) == {"type": "started", "actions_only": True}
            await connection.send(json.dumps({"type": "observation", "id": "o1", "image": media.png_data_url(IMAGE),
                                              "seed": 1}))  # fmt: skip
            return json.loads(await connection.recv())

    answer = asyncio.run(robot())
    assert answer["type"] == "actions" and answer["id"] == "o1" and len(answer["actions"]) == CHUNK

    async def without_key() -> None:
        async with websockets.connect(url):
            pass

    with pytest.raises(websockets.InvalidStatus):
        asyncio.run(without_key())


def test_the_replicas_die_with_the_front_end(front: ServerProcess) -> None:
    """kill -9 of the front end (no handler runs): the replicas' servers, their engine cores and workers all go."""
    import psutil

    replicas = psutil.Process(front.process.pid).children()
    descendants = psutil.Process(front.process.pid).children(recursive=True)
    assert len(replicas) == 2 and len(descendants) > 2  # the replicas' servers and their engine processes
    os.kill(front.process.pid, signal.SIGKILL)
    front.process.wait()
    gone, alive = psutil.wait_procs(descendants, timeout=60)
    assert not alive, [(p.pid, p.name()) for p in alive]
