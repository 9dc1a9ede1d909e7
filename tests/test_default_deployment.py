"""`cosmos3-serve serve CKPT --precision fp32` on this CPU machine, memory sized by the server: chat and generation
are served at once, and concurrent chat changes no generated value (the diffusers pipeline is the oracle)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import media
from tests.server_process import MediaOrigin, ServerProcess, free_port
from tests.test_actions import NEGATIVE, action_request, reference

CHAT_CLIENTS = 4
POLICY_REQUESTS = 12  # together: a step batch large enough that the towers' matmuls overlap in time


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    port = free_port()
    running = ServerProcess([sys.executable, "-m", "cosmos3_serve.server.cli", "serve", str(tiny_checkpoint),
                             "--port", str(port), "--precision", "fp32"], port)  # fmt: skip
    try:
        running.wait_ready(path="/v1/health/ready")
        yield running
    finally:
        running.stop()


@pytest.fixture()
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        yield client


def test_policy_actions_under_chat_load_equal_the_reference(http: httpx.Client, server: ServerProcess,
                                                            diffusers_pipeline) -> None:  # fmt: skip
    """The generator steps on its own thread of vLLM's worker process while the reasoner decodes on vLLM's."""
    image = media.smooth_image(seed=24, height=180, width=320)
    request = action_request("policy", steps=4, seed=9, action_chunk_size=16, image=image)
    body = {"mode": "policy", "prompt": request.prompt, "negative_prompt": NEGATIVE,
            "image": media.png_data_url(image), "fps": request.fps, "num_inference_steps": 4, "seed": 9,
            "action_domain": request.action_domain, "action_chunk_size": 16,
            "action_resolution_tier": request.action_resolution_tier}  # fmt: skip
    model = http.get("/v1/models").json()["data"][0]["id"]
    chatting = threading.Event()
    chatting.set()

    def chat() -> int:
        streams = 0
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            while chatting.is_set():
                answer = client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": "Tell me about robots."}],
                    "max_tokens": 64, "ignore_eos": True, "temperature": 0.0})  # fmt: skip
                streams += answer.status_code == 200
        return streams

    def policy(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            return client.post("/v1/video/generate", json=body)

    with ThreadPoolExecutor(max_workers=CHAT_CLIENTS + POLICY_REQUESTS) as pool:
        chats = [pool.submit(chat) for _ in range(CHAT_CLIENTS)]
        answers = list(pool.map(policy, range(POLICY_REQUESTS)))
        chatting.clear()
        assert all(completions.result() >= 1 for completions in chats)
    [expected_actions] = reference(diffusers_pipeline, request, output_type="np").action
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert np.abs(np.asarray(answer.json()["actions"]) - expected_actions.numpy()).max() <= 1e-4


@pytest.mark.parametrize("part", ["image_url", "video_url"])
def test_remote_media_urls_are_off_by_default(http: httpx.Client, part: str) -> None:
    """No flag: chat media only inline. http(s) and file URLs are refused at the edge with 422 naming the field,
    before any fetch, in words that say nothing about the target."""
    model = http.get("/v1/models").json()["data"][0]["id"]
    payload = media.png_bytes(media.smooth_image(seed=3))
    with MediaOrigin(payload) as origin:
        for url in (origin.url(), origin.url("localhost"), "file:///etc/passwd", "ftp://127.0.0.1/x"):
            content = [{"type": "text", "text": "Describe."}, {"type": part, part: {"url": url}}]
            answer = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                                             "messages": [{"role": "user", "content": content}]})  # fmt: skip
            assert answer.status_code == 422, (url, answer.text)
            error = answer.json()["error"]
            assert error["param"] == f"messages[0].content[1].{part}.url"
            assert "data URL" in error["message"]
            assert str(origin.port) not in answer.text and "passwd" not in answer.text
        assert origin.hits == 0
    inline = [{"type": "image_url", "image_url": {"url": media.png_data_url(media.smooth_image(seed=3))}}]
    answer = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": inline}]})  # fmt: skip
    assert answer.status_code == 200, answer.text


def test_a_clip_over_the_largest_video_generated_is_refused_at_the_defaults(http: httpx.Client) -> None:
    """No flag: a conditioning clip may hold the pixels of the largest video the deployment generates (512x512x33
    on the CPU); 33 frames of 640x480 read by a 33-frame request hold more."""
    clip = media.mp4_data_url(media.smooth_video(seed=2, num_frames=33, height=480, width=640), fps=8)
    body = {"prompt": "x", "video": clip, "num_frames": 33, "height": 64, "width": 64, "num_inference_steps": 1}
    answer = http.post("/v1/video/generate", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == "video" and "8,650,752" in answer.json()["error"]["message"]
