"""`cosmos3-serve serve` on the tiny checkpoint: one real uvicorn server on localhost (vLLM's engine in its own
process, the generator in vLLM's worker), driven by the official `openai` client, httpx and the curl lines the
command prints. Generated pixels are compared with diffusers' pipeline (the oracle) for the same seed."""

from __future__ import annotations

import base64
import gzip
import io
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests import media
from tests.server_process import EAGER, MediaOrigin, ServerProcess, free_port, sse_events

API_KEY = "sk-cosmos3-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_REQUEST_BYTES = 1_000_000
MAX_JOBS = 4
NEGATIVE = "blurry, low quality"
LONG_JOB = {"num_frames": 33, "height": 512, "width": 512, "num_inference_steps": 100}  # seconds on a CPU
# Device memory of the jobs in flight: one LONG_JOB (about 15 MiB of latents and K/V) at a time, many small ones.
STATE_BUDGET_MIB = 20
MAX_CLIP_PIXELS = 100_000  # 24 frames of 64x64
PUBLIC_URL = "https://cosmos3.example.com"  # where a proxy would publish the server
MAX_STEPS = 200  # --max-inference-steps: LONG_JOB and the progress test's 100 steps run


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, profile_dir: Path) -> Iterator[ServerProcess]:
    port = free_port()
    running = ServerProcess(
        [sys.executable, "-m", "cosmos3_serve.server.cli", "serve", str(tiny_checkpoint), "--port", str(port),
         "--precision", "fp32", "--max-model-len", "4096", *EAGER, "--api-key", API_KEY,
         "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-generation-jobs", str(MAX_JOBS),
         "--generation-state-budget-mib", str(STATE_BUDGET_MIB), "--profile-dir", str(profile_dir),
         "--allowed-media-domains", "localhost", "--max-clip-pixels", str(MAX_CLIP_PIXELS),
         "--public-url", PUBLIC_URL + "/", "--max-inference-steps", str(MAX_STEPS)],
        port,
    )  # fmt: skip
    try:
        running.wait_ready(then_output="-o video.mp4", path="/v1/health/ready")
        yield running
    finally:
        running.stop()


@pytest.fixture()
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=300) as client:
        yield client


def openai_client(server: ServerProcess):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)


def reference_frames(pipeline, prompt: str, **kwargs) -> np.ndarray:
    """uint8 frames `[T, H, W, 3]` of diffusers' pipeline (its float output rounded as ours is)."""
    video = pipeline(prompt, output_type="np", generator=torch.Generator().manual_seed(kwargs.pop("seed")),
                     **kwargs).video  # fmt: skip
    return np.round(np.asarray(video) * 255).astype(np.uint8).reshape(-1, *np.asarray(video).shape[-3:])


def psnr_after_the_same_encoding(frames: np.ndarray, reference: np.ndarray, fps: float) -> float:
    """PSNR of decoded `frames` against `reference` sent through the same H.264 encoding (4:2:0 chroma makes the
    codec's own loss on random-model noise large; this compares what the pipeline generated)."""
    from cosmos3_serve.server.encoding import mp4_bytes

    encoded, _ = mp4_frames(mp4_bytes(reference, fps))
    mse = np.mean((frames.astype(float) - encoded.astype(float)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def mp4_frames(data: bytes) -> tuple[np.ndarray, float]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate)


# ---- chat: vLLM's OpenAI serving, reused ------------------------------------------------------------------


def test_openai_client_chat_completion(server: ServerProcess, tiny_checkpoint: Path) -> None:
    client = openai_client(server)
    [model] = client.models.list().data
    assert model.id == tiny_checkpoint.name
    messages = [{"role": "user", "content": "Describe a robot arm."}]
    reply = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8, temperature=0,
                                            stream=True)  # fmt: skip
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the stream carries the same text


@pytest.mark.parametrize("part", ["image_url", "video_url"])
def test_multimodal_chat_streams_what_the_engine_answers(server: ServerProcess, vllm_reasoner, part: str) -> None:
    """OpenAI content parts with data URLs, streamed and not, equal the in-process engine's greedy answer."""
    from vllm import SamplingParams

    url = (media.png_data_url(media.smooth_image(seed=6)) if part == "image_url"
           else media.mp4_data_url(media.smooth_video(seed=7, num_frames=8), fps=4))  # fmt: skip
    messages = [{"role": "user", "content": [{"type": part, part: {"url": url}}, {"type": "text", "text": "Describe."}]}]
    expected = vllm_reasoner.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    client = openai_client(server)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert reply.choices[0].message.content == streamed == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_allowed_media_domains_never_reach_a_loopback_target(http: httpx.Client) -> None:
    """`--allowed-media-domains localhost`: the domain passes the edge, but it resolves to loopback, so the fetch
    is refused at connect time; another host is refused at the edge. No request reaches the origin, and no
    answer says anything about it."""
    model = http.get("/v1/models").json()["data"][0]["id"]
    with MediaOrigin(media.png_bytes(media.smooth_image(seed=3))) as origin:
        for url, status in ((origin.url("localhost"), 400), (origin.url("127.0.0.1"), 422)):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]
            answer = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                                             "messages": [{"role": "user", "content": content}]})  # fmt: skip
            assert answer.status_code == status, (url, answer.text)
            assert str(origin.port) not in answer.text and "refused" not in answer.text.lower()
        assert origin.hits == 0


# ---- generation ---------------------------------------------------------------------------------------------


def test_openai_client_images_equal_the_reference(server: ServerProcess, diffusers_pipeline) -> None:
    result = openai_client(server).images.generate(
        prompt="A red cube.", n=2, size="64x32",
        response_format="b64_json", extra_body={"negative_prompt": NEGATIVE, "num_inference_steps": 3, "seed": 11},
    )  # fmt: skip
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json)))) for item in result.data]
    assert [image.shape for image in images] == [(32, 64, 3)] * 2
    for i, image in enumerate(images):  # n images: seeds seed, seed + 1, denoised together in one batch
        [reference] = reference_frames(diffusers_pipeline, "A red cube.", negative_prompt=NEGATIVE, num_frames=1,
                                       height=32, width=64, num_inference_steps=3, seed=11 + i)  # fmt: skip
        assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1


def test_video_sync_mp4_follows_the_reference(http: httpx.Client, diffusers_pipeline) -> None:
    body = {"prompt": "A dog runs.", "negative_prompt": NEGATIVE, "num_frames": 9, "height": 32, "width": 64,
            "fps": 8, "num_inference_steps": 3, "seed": 5}  # fmt: skip
    response = http.post("/v1/video/generate", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    assert response.headers["x-cosmos3-seed"] == "5"
    frames, fps = mp4_frames(response.content)
    reference = reference_frames(diffusers_pipeline, "A dog runs.", negative_prompt=NEGATIVE, num_frames=9, height=32,
                                 width=64, fps=8, num_inference_steps=3, seed=5)  # fmt: skip
    assert frames.shape == reference.shape == (9, 32, 64, 3) and fps == 8
    assert psnr_after_the_same_encoding(frames, reference, fps=8) > 40  # another video scores ~10 dB

    as_json = http.post("/v1/video/generate", json={**body, "response_format": "b64_json"}).json()
    assert as_json["media_type"] == "video/mp4" and as_json["status"] == "succeeded"
    # Same seed, the same reference: the second request's prompt K/V mostly come from the prefix cache (its last
    # block recomputed alone), and the random tiny model amplifies that rounding, so it is held to the reference.
    again = mp4_frames(base64.b64decode(as_json["b64_json"]))[0]
    assert psnr_after_the_same_encoding(again, reference, fps=8) > 40


def test_image_to_video_takes_a_data_url(http: httpx.Client, diffusers_pipeline) -> None:
    image = media.smooth_image(seed=3, height=48, width=80)
    body = {"prompt": "A car drives.", "image": media.png_data_url(image), "num_frames": 5, "height": 32, "width": 64,
            "fps": 8, "num_inference_steps": 2, "guidance_scale": 1.0, "seed": 2}  # fmt: skip
    response = http.post("/v1/video/generate", json=body)
    assert response.status_code == 200, response.text
    frames, _ = mp4_frames(response.content)
    reference = reference_frames(diffusers_pipeline, "A car drives.", image=image, num_frames=5, height=32, width=64,
                                 fps=8, num_inference_steps=2, guidance_scale=1.0, seed=2)  # fmt: skip
    assert psnr_after_the_same_encoding(frames, reference, fps=8) > 40


def test_async_job_reports_every_step_then_serves_its_content(http: httpx.Client, server: ServerProcess) -> None:
    steps = 100  # long enough to subscribe while it runs
    body = {"prompt": "A cat.", "num_frames": 1, "height": 32, "width": 32, "num_inference_steps": steps, "seed": 1,
            "response": "async"}  # fmt: skip
    submitted = http.post("/v1/video/generate", json=body)
    assert submitted.status_code == 202
    job = submitted.json()
    assert submitted.headers["location"] == f"/v1/video/generate/{job['id']}" and job["steps_total"] == steps
    with http.stream("GET", f"/v1/video/generate/{job['id']}/events") as events:
        seen = list(sse_events(events))
    progress = [data["steps_done"] for kind, data in seen if kind == "progress" and data["status"] == "running"]
    assert len(progress) >= 10 and progress[-1] == steps
    assert np.all(np.diff(progress) == 1)  # one event per step, none missed once subscribed
    assert seen[-1][0] == "done" and seen[-1][1]["status"] == "succeeded" and seen[-1][1]["steps_done"] == steps
    status = http.get(f"/v1/video/generate/{job['id']}").json()
    assert status["status"] == "succeeded" and status["progress"] == 1.0
    assert f" {job['id']} succeeded: " in server.output  # the job's log line, in vLLM's log stream
    content = http.get(f"/v1/video/generate/{job['id']}/content")
    assert content.headers["content-type"] == "image/png"
    sync = http.post("/v1/video/generate", json={**body, "response": "sync"})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(content.content))), np.asarray(Image.open(io.BytesIO(sync.content))))


def test_cancel_stops_a_running_job_and_the_server_keeps_serving(http: httpx.Client, server: ServerProcess) -> None:
    body = {"prompt": "A long one.", **LONG_JOB, "response": "async"}
    job = http.post("/v1/video/generate", json=body).json()
    with http.stream("GET", f"/v1/video/generate/{job['id']}/events") as events:
        for kind, data in sse_events(events):
            if data["steps_done"] >= 2:
                break
    chat = openai_client(server).chat.completions.create(  # the reasoner answers while the generator runs
        model=http.get("/v1/models").json()["data"][0]["id"], messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.usage.completion_tokens >= 1
    cancelled = http.delete(f"/v1/video/generate/{job['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["steps_done"] < LONG_JOB["num_inference_steps"]
    assert http.get(f"/v1/video/generate/{job['id']}/content").status_code == 409
    after = http.get(f"/v1/video/generate/{job['id']}").json()
    assert after["status"] == "cancelled" and after["steps_done"] == cancelled["steps_done"]  # no step after cancel
    ok = http.post("/v1/video/generate", json={"prompt": "Next.", "num_frames": 1, "height": 32, "width": 32,
                                               "num_inference_steps": 2})  # fmt: skip
    assert ok.status_code == 200


def test_overload_answers_429_with_retry_after(http: httpx.Client) -> None:
    body = {"prompt": "Busy.", **LONG_JOB, "response": "async"}
    jobs = [http.post("/v1/video/generate", json=body) for _ in range(MAX_JOBS)]
    try:
        assert all(job.status_code == 202 for job in jobs)
        refused = http.post("/v1/video/generate", json=body)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    finally:
        for job in jobs:
            http.delete(f"/v1/video/generate/{job.json()['id']}")


def test_nim_infer_text2image(http: httpx.Client, diffusers_pipeline) -> None:
    body = {"model_mode": "text2image", "prompt": "A red cube.", "height": 32, "width": 32, "steps": 2, "seed": 4}
    answer = http.post("/v1/infer", json=body).json()
    assert answer["model_mode"] == "text2image" and answer["seed"] == 4
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["b64_image"]))))
    [reference] = reference_frames(diffusers_pipeline, "A red cube.", num_frames=1, height=32, width=32,
                                   num_inference_steps=2, seed=4)  # fmt: skip
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1


def test_prefix_cache_reuse_and_step_metrics_are_exported(http: httpx.Client) -> None:
    body = {"prompt": "A cat.", "negative_prompt": "watermark, text, " * 40, "num_frames": 1, "height": 32,
            "width": 32, "num_inference_steps": 2}  # fmt: skip
    for prompt in ("A cat.", "A dog."):
        assert http.post("/v1/video/generate", json={**body, "prompt": prompt}).status_code == 200
    text = http.get("/v1/metrics").text
    assert "cosmos3_denoise_step_seconds_count" in http.get("/metrics").text  # vLLM's route renders ours too
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}  # fmt: skip
    assert values['cosmos3_prompt_kv_tokens_total{source="prefix_cache"}'] >= 64  # the shared negative prompt
    assert values["cosmos3_denoise_step_seconds_count"] >= 4
    assert values['cosmos3_generation_requests_total{mode="text2image",status="succeeded"}'] >= 2
    phases = {phase: values[f'cosmos3_generation_phase_seconds_sum{{mode="text2image",phase="{phase}"}}']
              for phase in ("prefill", "queue", "denoise", "decode", "encode")}  # fmt: skip
    latency = values['cosmos3_generation_latency_seconds_sum{mode="text2image"}']
    assert all(seconds > 0 for seconds in phases.values())
    # decode is part of denoise; the other phases follow one another within each job's latency
    assert phases["decode"] <= phases["denoise"]
    assert phases["prefill"] + phases["queue"] + phases["denoise"] + phases["encode"] <= latency + 1e-3
    assert any(name.startswith("vllm:") for name in values)  # the reasoner's series, same scrape


def test_policy_returns_video_and_actions_equal_to_the_reference(http: httpx.Client, diffusers_pipeline) -> None:
    from tests.test_actions import IMAGE, NEGATIVE as ACTION_NEGATIVE, action_request, reference

    request = action_request("policy", steps=2, seed=8)
    body = {"mode": "policy", "prompt": request.prompt, "negative_prompt": ACTION_NEGATIVE,
            "image": media.png_data_url(IMAGE), "fps": request.fps, "num_inference_steps": 2, "seed": 8,
            "action_domain": request.action_domain, "action_chunk_size": request.action_chunk_size,
            "action_resolution_tier": request.action_resolution_tier}  # fmt: skip
    answer = http.post("/v1/video/generate", json=body)  # actions travel in JSON, with the video in base64
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    expected = reference(diffusers_pipeline, request, output_type="np")
    [expected_actions] = expected.action
    assert np.abs(np.asarray(answer["actions"]) - expected_actions.numpy()).max() <= 1e-4
    frames, _ = mp4_frames(base64.b64decode(answer["b64_json"]))
    assert frames.shape[0] == request.action_chunk_size + 1


def test_inverse_dynamics_on_nim_infer_returns_actions(http: httpx.Client) -> None:
    from tests.test_actions import CHUNK, DOMAIN, VIDEO

    frames = np.stack([np.asarray(frame) for frame in VIDEO])
    body = {"model_mode": "inverse_dynamics", "video": media.mp4_data_url(frames, fps=8), "steps": 2, "seed": 1,
            "action_domain": DOMAIN, "action_chunk_size": CHUNK, "action_resolution_tier": 256}  # fmt: skip
    answer = http.post("/v1/infer", json=body)
    assert answer.status_code == 200, answer.text
    actions = np.asarray(answer.json()["actions"])
    assert actions.shape == (CHUNK, 2) and np.isfinite(actions).all() and "b64_video" not in answer.json()


def test_an_action_mode_without_its_inputs_is_refused_by_field(http: httpx.Client) -> None:
    response = http.post("/v1/video/generate", json={"mode": "forward_dynamics", "prompt": "Push.",
                                                     "image": media.png_data_url(media.smooth_image(seed=1)),
                                                     "action_domain": "pusht", "action_chunk_size": 4})  # fmt: skip
    assert response.status_code == 422 and response.json()["error"]["param"] == "actions"


# ---- errors and operations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/video/generate", {"prompt": "x", "bogus": 1}, "bogus"),
        ("/v1/video/generate", {"prompt": "x", "num_frames": 6}, "num_frames"),
        ("/v1/video/generate", {"prompt": "x", "num_frames": 1, "height": 48, "width": 30}, "width"),
        ("/v1/video/generate", {"prompt": "x", "image": "not base64!"}, "image"),
        ("/v1/video/generate", {"prompt": "x", "mode": "video2video"}, "video"),
        ("/v1/video/generate", {"num_frames": 1}, "prompt"),
        ("/v1/infer", {"model_mode": "text2image", "prompt": "x", "foo": 2}, "foo"),
        ("/v1/infer", {"model_mode": "text2world", "prompt": "x", "frames": 8}, "frames"),
        ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size"),
        ("/v1/video/generate", {"prompt": "x", "num_inference_steps": 101}, "num_inference_steps"),
        ("/v1/video/generate", {"prompt": "x", "num_frames": 5, "fps": float("inf")}, "fps"),
        ("/v1/video/generate", {"prompt": "x", "num_frames": 5, "fps": 1e300}, "fps"),
        ("/v1/video/generate", {"prompt": "x", "guidance_scale": 1e300}, "guidance_scale"),
        ("/v1/infer", {"model_mode": "text2image", "prompt": "x", "guidance_scale": float("nan")}, "guidance_scale"),
        ("/v1/images/generations", {"prompt": "x", "guidance_scale": float("inf")}, "guidance_scale"),
    ],
)
def test_bad_fields_get_422_naming_the_field(http: httpx.Client, path: str, body: dict, field: str) -> None:
    json_text = json.dumps(body)  # Python's JSON writes Infinity and NaN, as some clients do
    response = http.post(path, content=json_text, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize(
    "method, path, content, content_type, status",
    [("GET", "/v1/no-such-route", None, "application/json", 404),
     ("POST", "/v1/metadata", None, "application/json", 405),
     ("POST", "/v1/video/generate", b'{"prompt": "x",', "application/json", 422),
     ("POST", "/v1/chat/completions", b"hello", "text/plain", 400),  # vLLM's plain-text validation error
     ("POST", "/detokenize", b"hello", "text/plain", 400),
     ("POST", "/scale_elastic_ep", b"{}", "application/json", 404)],  # an admin route of vLLM's not served
)  # fmt: skip
def test_routing_and_parse_errors_answer_in_the_error_envelope(http: httpx.Client, method: str, path: str,
                                                               content: bytes | None, content_type: str,
                                                               status: int) -> None:  # fmt: skip
    response = http.request(method, path, content=content, headers={"Content-Type": content_type})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and set(error) == {"message", "type", "param", "code"}


def test_an_image_of_too_many_pixels_is_refused_from_its_header(http: httpx.Client) -> None:
    image = media.png_data_url(Image.new("1", (12000, 12000)))  # a few KB: 144 megapixels of one colour
    answer = http.post("/v1/video/generate", json={"prompt": "x", "image": image})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["param"] == "image" and "12000x12000" in error["message"] and "16,777,216" in error["message"]


def test_a_clip_of_too_many_pixels_is_refused_before_decoding(http: httpx.Client) -> None:
    """The frames a request reads (video -> video: its output's) times the frame size from the header, against
    `--max-clip-pixels`; the same clip with fewer frames read passes that check."""
    clip = media.mp4_data_url(media.smooth_video(seed=5, num_frames=40, height=64, width=64), fps=8)
    body = {"prompt": "x", "video": clip, "height": 64, "width": 64, "num_inference_steps": 1}
    answer = http.post("/v1/video/generate", json={**body, "num_frames": 33})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["param"] == "video" and "33 frames of 4,096 pixels" in error["message"]
    assert "100,000" in error["message"]
    assert http.post("/v1/video/generate", json={**body, "num_frames": 17}).status_code == 200


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/video/generate", {"prompt": "x", "num_frames": 1, "num_inference_steps": MAX_STEPS + 1},
     "num_inference_steps"),
    ("/v1/images/generations", {"prompt": "x", "num_inference_steps": MAX_STEPS + 1}, "num_inference_steps"),
    ("/v1/infer", {"model_mode": "text2image", "prompt": "x", "steps": MAX_STEPS + 1}, "steps"),
])  # fmt: skip
def test_steps_over_the_deployment_limit_are_refused_naming_it(http: httpx.Client, path: str, body: dict,
                                                               field: str) -> None:  # fmt: skip
    answer = http.post(path, json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and "--max-inference-steps" in error["message"]


def test_links_start_with_the_public_url_whatever_the_host_header(http: httpx.Client) -> None:
    body = {"prompt": "A cube.", "size": "32x32", "num_inference_steps": 1, "response_format": "url"}
    answer = http.post("/v1/images/generations", json=body, headers={"Host": "attacker.example"})
    assert answer.status_code == 200, answer.text
    [item] = answer.json()["data"]
    assert item["url"].startswith(PUBLIC_URL + "/v1/video/generate/") and "attacker" not in answer.text
    content = http.get(item["url"].removeprefix(PUBLIC_URL))
    assert content.status_code == 200 and content.headers["content-type"] == "image/png"


@pytest.mark.parametrize(("body", "field"), [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -3}, "temperature"),
])  # fmt: skip
def test_vllm_routes_answer_bad_fields_in_the_envelope_naming_the_field(http: httpx.Client, body: dict,
                                                                        field: str) -> None:  # fmt: skip
    model = http.get("/v1/models").json()["data"][0]["id"]
    answer = http.post("/v1/chat/completions", json={"model": model, **body})
    assert 400 <= answer.status_code < 500, answer.text
    error = answer.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == answer.status_code
    assert error["param"] == field and field in error["message"]


def test_oversize_body_gets_413(http: httpx.Client) -> None:
    big = base64.b64encode(b"\0" * MAX_REQUEST_BYTES).decode()
    response = http.post("/v1/video/generate", json={"prompt": "x", "image": big})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_api_key_guards_every_route_but_health(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as anonymous:
        for path in ("/v1/health/live", "/v1/health/ready", "/health"):
            assert anonymous.get(path).status_code == 200, path
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/metadata"), ("GET", "/v1/metrics"),
                             ("POST", "/v1/video/generate"), ("POST", "/v1/chat/completions"),
                             ("GET", "/openapi.json")):  # fmt: skip
            assert anonymous.request(method, path).status_code == 401, path
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401


def test_ready_only_once_both_towers_are_loaded_and_warm(server: ServerProcess) -> None:
    """While vLLM serves and the generator loads and warms up, the server is live but not ready."""
    statuses = server.startup_statuses
    assert statuses[-1][0] == 200
    assert (503, 200) in statuses, statuses  # seen while starting: live, not ready


def test_metadata_version_and_unknown_job(http: httpx.Client, tiny_checkpoint: Path) -> None:
    answer = http.get("/v1/metadata")
    metadata = answer.json()
    assert metadata["model"] == tiny_checkpoint.name and metadata["precision"] == "fp32"
    assert str(tiny_checkpoint.parent) not in answer.text  # no filesystem paths in responses
    assert {"text2image", "text2video", "image2video", "video2video"} <= set(metadata["modes"])
    assert metadata["towers"]["generator"]["loaded"] and metadata["tensor_parallel_size"] == 1
    generator = metadata["towers"]["generator"]
    assert generator["vae_dtype"] == "float32"  # the default --vae-precision
    assert generator["limits"]["max_shape"] == [512, 512, 33]  # the CPU's default largest request
    assert generator["limits"]["state_budget_bytes"] == STATE_BUDGET_MIB << 20
    assert generator["memory_gib"]["weights"] > 0 and generator["kv_cache_gib"] >= 1.0
    held = metadata["capacity"]  # what test_a_job_waits_for_generator_memory_then_runs sees: one LONG_JOB at a time
    assert held["generation_video_512x512x33"] == 1 and held["generation_video_832x480x93"] == 0
    assert held["chat_sequences_at_max_model_len"] == generator["kv_cache_tokens"] // 4096  # --max-model-len
    assert http.get("/v1/version").json()["api"] == "v1"
    assert http.get("/v1/video/generate/gen-unknown").status_code == 404


def test_profiler_traces_each_denoising_step_and_vae_batch(http: httpx.Client, profile_dir: Path) -> None:
    """`--profile-dir`: vLLM's /start_profile and /stop_profile around one text->image request of 3 steps leave a
    trace of the engine's worker with one admission, one range per denoising step, one VAE decode and no VAE encode
    (no CUDA graph capture on the CPU)."""
    assert http.post("/start_profile").status_code == 200
    response = http.post("/v1/images/generations", json={"prompt": "A red cube.", "size": "64x32",
                                                         "num_inference_steps": 3, "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert http.post("/stop_profile").status_code == 200
    [trace] = profile_dir.rglob("*.pt.trace.json*")
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    ranges = [e["name"] for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("cosmos3::")]
    assert sorted(ranges) == ["cosmos3::admit"] + ["cosmos3::denoise_step"] * 3 + ["cosmos3::vae_decode"], ranges


def test_openapi_lists_every_route_with_its_schema(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
        ("/v1/video/generate", "post"), ("/v1/video/generate/{job_id}", "get"),
        ("/v1/video/generate/{job_id}", "delete"), ("/v1/video/generate/{job_id}/content", "get"),
        ("/v1/video/generate/{job_id}/events", "get"), ("/v1/images/generations", "post"), ("/v1/infer", "post"),
        ("/v1/health/live", "get"), ("/v1/health/ready", "get"), ("/v1/metadata", "get"), ("/v1/version", "get"),
        ("/v1/metrics", "get"),
    ]:  # fmt: skip
        assert method in paths.get(path, {}), (path, method)
    schemas = spec["components"]["schemas"]
    for name, field in [("VideoGenerateBody", "num_frames"), ("NimInferBody", "model_mode"),
                        ("ImagesGenerationsBody", "size")]:  # fmt: skip
        assert field in schemas[name]["properties"], name


def test_printed_curl_lines_work_as_pasted(server: ServerProcess, tmp_path: Path) -> None:
    curls = [line.strip() for line in server.output.splitlines() if line.strip().startswith("curl ")]
    paths = {"/" + shlex.split(line)[2].split("/", 3)[3] for line in curls}  # curl -s URL ...
    assert paths == {"/v1/models", "/v1/chat/completions", "/v1/images/generations", "/v1/video/generate"}, curls
    for line in curls:
        result = subprocess.run(shlex.split(line), capture_output=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        if " -o " in line:
            frames, _ = mp4_frames((tmp_path / "video.mp4").read_bytes())
            assert frames.shape[0] == 9
        else:
            body = json.loads(result.stdout)
            assert "error" not in body, body


def test_a_request_that_can_never_fit_is_refused_at_once_naming_the_limit(http: httpx.Client) -> None:
    """Larger than the deployment's largest request (`--generation-max-shape`, 512x512x33 on the CPU): 413 before any
    work, naming the limit; the largest itself is admitted (the cancel test runs it)."""
    video = http.post("/v1/video/generate", json={"prompt": "Too big.", "num_frames": 65, "height": 512, "width": 512})
    assert video.status_code == 413, video.text
    error = video.json()["error"]
    assert error["param"] == "num_frames" and "--generation-max-shape 512x512x33" in error["message"]
    image = http.post("/v1/images/generations", json={"prompt": "Too big.", "size": "2048x2048"})
    assert image.status_code == 413 and "generator tokens per step" in image.json()["error"]["message"]
    huge = http.post("/v1/video/generate", json={"prompt": "Too big.", "num_frames": 1, "height": 100_000,
                                                 "width": 100_000})  # fmt: skip
    assert huge.status_code == 413 and huge.json()["error"]["param"] == "num_frames"


@pytest.mark.parametrize(
    "field, text, refused_by",
    [("prompt", "a" * 5000, "prompt tokens"),  # one token per letter on the tiny vocabulary
     ("negative_prompt", "a" * 900_000, "characters")],  # more characters than the limit's tokens spell: not tokenized
)  # fmt: skip
def test_a_prompt_over_the_token_limit_is_refused_naming_it(http: httpx.Client, field: str, text: str,
                                                            refused_by: str) -> None:  # fmt: skip
    body = {"prompt": "A cat.", "num_frames": 1, "height": 32, "width": 32, field: text}
    answer = http.post("/v1/video/generate", json=body)
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    limit = http.get("/v1/metadata").json()["towers"]["generator"]["limits"]["max_prompt_tokens"]
    assert limit == 4095  # --max-model-len 4096: the prefill's one token leaves 4,095 for the prompt
    assert error["param"] == field and refused_by in error["message"] and f"{limit:,}" in error["message"]


def test_reasoning_beyond_the_context_is_refused_naming_it(http: httpx.Client) -> None:
    """Reason-then-generate counts the reasoning's token budget with its prompt, before any work."""
    body = {"prompt": "A cat.", "num_frames": 1, "height": 32, "width": 32, "reason_first": True,
            "reasoning_max_tokens": 8000}  # fmt: skip
    started = time.monotonic()
    answer = http.post("/v1/video/generate", json=body)
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["param"] == "reasoning_max_tokens" and "4,095" in error["message"]
    assert time.monotonic() - started < 2.0  # refused before any prefill or reasoning


def test_a_job_waits_for_generator_memory_then_runs(http: httpx.Client, server: ServerProcess) -> None:
    """Two long jobs hold more than the state budget: the second stays queued while the first denoises (the server
    logs why), and runs once the first leaves."""
    body = {"prompt": "In turn.", **LONG_JOB, "response": "async"}
    first, second = (http.post("/v1/video/generate", json={**body, "seed": seed}).json() for seed in (1, 2))
    try:
        with http.stream("GET", f"/v1/video/generate/{first['id']}/events") as events:
            for _, data in sse_events(events):
                if data["steps_done"] >= 2:
                    break
        waiting = http.get(f"/v1/video/generate/{second['id']}").json()
        assert waiting["status"] == "queued" and waiting["steps_done"] == 0
        assert f"{second['id']} waits for generator memory" in server.output
        http.delete(f"/v1/video/generate/{first['id']}")
        with http.stream("GET", f"/v1/video/generate/{second['id']}/events") as events:
            for _, data in sse_events(events):
                if data["steps_done"] >= 1:
                    break
        assert http.get(f"/v1/video/generate/{second['id']}").json()["status"] == "running"
    finally:
        for job in (first, second):
            http.delete(f"/v1/video/generate/{job['id']}")


def test_chat_streams_while_a_video_denoises(http: httpx.Client, server: ServerProcess) -> None:
    """The generator denoises on its own thread: chat tokens keep arriving within one denoising step (before, each
    token waited for a whole step), and a chat stream ends while the video is still far from done."""
    import threading
    import time

    job = http.post("/v1/video/generate", json={"prompt": "Meanwhile.", **LONG_JOB, "response": "async"}).json()
    step_times: list[float] = []

    def follow() -> None:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=300) as client:
            with client.stream("GET", f"/v1/video/generate/{job['id']}/events") as events:
                for kind, data in sse_events(events):
                    if kind == "progress" and data["steps_done"] > len(step_times):
                        step_times.append(time.perf_counter())
                    if data["status"] != "running" and step_times:
                        return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        while len(step_times) < 2:
            time.sleep(0.05)
        model = http.get("/v1/models").json()["data"][0]["id"]
        token_times = []
        stream = openai_client(server).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Tell me about robots."}], max_tokens=48, stream=True,
            extra_body={"ignore_eos": True, "temperature": 0.0},
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                token_times.append(time.perf_counter())
        steps_during_chat = [t for t in step_times if token_times[0] <= t <= token_times[-1]]
        state = http.get(f"/v1/video/generate/{job['id']}").json()
        assert state["status"] == "running" and state["steps_done"] < LONG_JOB["num_inference_steps"] // 2
        assert len(token_times) >= 16  # content chunks: a few tokens decode to nothing
        assert len(steps_during_chat) < len(token_times) // 4  # many tokens per denoising step, not one
    finally:
        http.delete(f"/v1/video/generate/{job['id']}")
        follower.join(timeout=60)



# ---- OpenAI's Videos API: the same jobs, OpenAI's shapes ---------------------------------------------------


def _wait_completed(client, video_id: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while True:
        video = client.videos.retrieve(video_id)
        if video.status in ("completed", "failed") or time.monotonic() > deadline:
            return video
        time.sleep(0.2)


def test_openai_client_videos_create_retrieve_download_list_delete(server: ServerProcess, diffusers_pipeline,
                                                                    tiny_checkpoint: Path) -> None:  # fmt: skip
    import openai

    client = openai_client(server)
    knobs = {"negative_prompt": NEGATIVE, "num_inference_steps": 3, "seed": 21, "fps": 8}
    created = client.videos.create(prompt="A boat sails.", size="64x32", seconds="1", extra_body=knobs)  # multipart
    assert (created.object, created.size, created.seconds) == ("video", "64x32", "1")
    assert created.status in ("queued", "in_progress") and created.model == tiny_checkpoint.name
    video = _wait_completed(client, created.id)
    assert (video.status, video.progress, video.error) == ("completed", 100, None)
    assert video.completed_at >= video.created_at and video.expires_at > video.completed_at

    content = client.videos.download_content(created.id).read()
    frames, fps = mp4_frames(content)
    reference = reference_frames(diffusers_pipeline, "A boat sails.", negative_prompt=NEGATIVE, num_frames=9,
                                 height=32, width=64, fps=8, num_inference_steps=3, seed=21)  # fmt: skip
    assert frames.shape == reference.shape == (9, 32, 64, 3) and fps == 8  # 1 s at 8 fps: 4k + 1 = 9 frames
    assert psnr_after_the_same_encoding(frames, reference, fps=8) > 40
    thumbnail_png = client.videos.download_content(created.id, variant="thumbnail").read()
    thumbnail = np.asarray(Image.open(io.BytesIO(thumbnail_png)))
    assert np.array_equal(thumbnail, frames[0])
    same_job = httpx.get(f"{server.base_url}/v1/video/generate/{created.id}", headers=AUTH).json()
    assert same_job["status"] == "succeeded"  # one job model behind both routes

    second = client.videos.create(prompt="A kite flies.", size="32x32", extra_body={"num_frames": 5, **knobs})
    _wait_completed(client, second.id)
    newest_first = client.videos.list(limit=1, order="desc")
    assert [v.id for v in newest_first.data] == [second.id] and newest_first.has_more
    assert [v.id for v in newest_first.get_next_page().data] == [created.id]
    assert created.id in [v.id for v in client.videos.list(order="asc").data]

    deleted = client.videos.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(created.id)


def test_videos_take_an_uploaded_or_inline_reference_and_sync_answers_the_mp4(
    server: ServerProcess, http: httpx.Client, diffusers_pipeline
) -> None:
    image = media.smooth_image(seed=4, height=48, width=80)
    knobs = {"num_frames": 5, "fps": 8, "num_inference_steps": 2, "guidance_scale": 1.0, "seed": 6}
    inline = http.post("/v1/videos/sync", json={"prompt": "A car drives.", "size": "64x32",
                                                "input_reference": {"image_url": media.png_data_url(image)}, **knobs})
    uploaded = openai_client(server).videos.create(prompt="A car drives.", size="64x32",
                                                    input_reference=("frame.png", media.png_bytes(image), "image/png"),
                                                    extra_body=knobs)  # fmt: skip
    video = _wait_completed(openai_client(server), uploaded.id)
    assert inline.status_code == 200 and video.status == "completed", inline.text
    from_upload = http.get(f"/v1/videos/{uploaded.id}/content").content
    reference = reference_frames(diffusers_pipeline, "A car drives.", image=image, num_frames=5, height=32, width=64,
                                 fps=8, num_inference_steps=2, guidance_scale=1.0, seed=6)  # fmt: skip
    # image2video from the reference image, as diffusers makes it. Earlier tests leave this prompt's K/V in the
    # prefix cache, whose rounding the random tiny model amplifies; another video is far below the bound.
    for answer in (inline.content, from_upload):
        assert psnr_after_the_same_encoding(mp4_frames(answer)[0], reference, fps=8) > 30


def test_videos_serve_the_action_modes_actions(http: httpx.Client) -> None:
    from tests.test_actions import CHUNK, DOMAIN, VIDEO

    frames = np.stack([np.asarray(frame) for frame in VIDEO])
    body = {"mode": "inverse_dynamics", "input_reference": media.mp4_data_url(frames, fps=8), "num_inference_steps": 2,
            "seed": 1, "action_domain": DOMAIN, "action_chunk_size": CHUNK, "action_resolution_tier": 256}  # fmt: skip
    created = http.post("/v1/videos", json=body).json()
    deadline = time.monotonic() + 300
    while (video := http.get(f"/v1/videos/{created['id']}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert video["status"] == "completed" and np.asarray(video["actions"]).shape == (CHUNK, 2)
    content = http.get(f"/v1/videos/{created['id']}/content", params={"variant": "actions"}).json()
    assert content["actions"] == video["actions"]
    expected = http.post("/v1/infer", json={"model_mode": "inverse_dynamics", "video": body["input_reference"],
                                            "steps": 2, "seed": 1, "action_domain": DOMAIN, "action_chunk_size": CHUNK,
                                            "action_resolution_tier": 256}).json()["actions"]  # fmt: skip
    assert np.abs(np.asarray(video["actions"]) - np.asarray(expected)).max() <= 1e-5


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "size": "wide"}, "size"),
    ({"prompt": "x", "size": "0x32"}, "size"),
    ({"prompt": "x", "seconds": 1, "num_frames": 9}, "seconds"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"prompt": "x", "input_reference": {"file_id": "file-1"}}, "input_reference"),
    ({"prompt": "x", "input_reference": "https://example.com/a.png"}, "input_reference"),
    ({"prompt": "x", "model": "sora-2"}, None),
])  # fmt: skip
def test_videos_refuse_bad_fields_naming_them(http: httpx.Client, body: dict, field: str | None) -> None:
    response = http.post("/v1/videos", json=body)
    expected_status = 404 if field is None else 422  # an unknown model is not served here
    assert response.status_code == expected_status, response.text
    assert response.json()["error"]["param"] == field
    form = http.post("/v1/videos", data={k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in body.items()})
    assert form.status_code == expected_status and form.json()["error"]["param"] == field  # a form: the same


# ---- robots: a persistent connection per robot for policy steps --------------------------------------------


def test_sixteen_robots_get_their_actions_over_websockets(server: ServerProcess, http: httpx.Client) -> None:
    import asyncio

    import websockets

    from tests.test_actions import CHUNK, DOMAIN, IMAGE, NEGATIVE as ACTION_NEGATIVE, PROMPT as ACTION_PROMPT

    url = server.base_url.replace("http://", "ws://") + "/v1/robot/session"
    start = {"type": "start", "prompt": ACTION_PROMPT, "negative_prompt": ACTION_NEGATIVE, "action_domain": DOMAIN,
             "action_chunk_size": CHUNK, "action_resolution_tier": 256, "fps": 16, "num_inference_steps": 1}  # fmt: skip
    frame = media.png_data_url(IMAGE)

    async def robot(index: int) -> list[dict]:
        async with websockets.connect(url, additional_headers=AUTH, max_size=None) as connection:
            await connection.send(json.dumps(start))
            assert json.loads(await connection.recv()) == {"type": "started", "actions_only": True}
            await connection.send(json.dumps({"type": "observation", "id": "bad", "image": frame, "seed": -1}))
            answers = [json.loads(await connection.recv())]  # the connection stays after a bad message
            for step in range(2 if index == 0 else 1):
                observation = {"type": "observation", "id": f"r{index}-{step}", "image": frame, "seed": 100 + index}
                while True:  # the server runs MAX_JOBS at once: a robot told 429 sends its observation again
                    await connection.send(json.dumps(observation))
                    answer = json.loads(await connection.recv())
                    if answer.get("code") != 429:
                        break
                    await asyncio.sleep(0.2)
                answers.append(answer)
            return answers

    async def all_robots() -> list[list[dict]]:
        return await asyncio.gather(*(robot(i) for i in range(16)))

    sessions = asyncio.run(all_robots())
    for index, answers in enumerate(sessions):
        error, *actions = answers
        assert (error["type"], error["id"], error["code"], error["param"]) == ("error", "bad", 422, "seed")
        assert [a["id"] for a in actions] == [f"r{index}-{step}" for step in range(len(actions))]
        assert all(a["type"] == "actions" and "b64_video" not in a for a in actions)
        assert all(np.asarray(a["actions"]).shape == (CHUNK, 2) for a in actions)
    # The same observation through /v1/video/generate, alone: the same actions (one job model, batching invariant)
    alone = http.post("/v1/video/generate", json={"mode": "policy", "prompt": ACTION_PROMPT, "image": frame,
                                                  "negative_prompt": ACTION_NEGATIVE, "action_domain": DOMAIN,
                                                  "action_chunk_size": CHUNK, "action_resolution_tier": 256, "fps": 16,
                                                  "num_inference_steps": 1, "seed": 103}).json()  # fmt: skip
    assert np.abs(np.asarray(sessions[3][1]["actions"]) - np.asarray(alone["actions"])).max() <= 1e-4
    # the same observation and seed twice, in other batches
    assert np.abs(np.asarray(sessions[0][1]["actions"]) - np.asarray(sessions[0][2]["actions"])).max() <= 1e-4


def test_a_robot_session_needs_the_api_key(server: ServerProcess) -> None:
    import asyncio

    import websockets

    url = server.base_url.replace("http://", "ws://") + "/v1/robot/session"

    async def connect() -> None:
        async with websockets.connect(url):
            pass

    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        asyncio.run(connect())
    assert refused.value.response.status_code == 403


# ---- NVIDIA's Cosmos 3 NIM names on /v1/infer ------------------------------------------------------------


def _nim_case(mode: str) -> tuple[dict, dict]:
    """A Cosmos 3 NIM request of `mode` and the same request in `/v1/video/generate`'s names."""
    from tests.test_actions import CHUNK, DOMAIN, IMAGE, VIDEO

    image, clip = media.png_data_url(IMAGE), media.mp4_data_url(np.stack([np.asarray(f) for f in VIDEO]), fps=8)
    same = {"prompt": "A robot arm moves.", "num_inference_steps": 2, "guidance_scale": 1.0, "seed": 9, "fps": 8.0}
    nim, ours = {"model_mode": mode, **same}, {"mode": mode, **same}
    if mode in ("forward_dynamics", "policy", "inverse_dynamics"):
        reference = clip if mode == "inverse_dynamics" else image
        nim.update(input_reference=reference, action_params={"domain_name": DOMAIN, "action_chunk_size": CHUNK,
                                                             "raw_action_dim": 2, "image_size": "256"})  # fmt: skip
        ours.update({"video" if mode == "inverse_dynamics" else "image": reference, "action_domain": DOMAIN,
                     "action_chunk_size": CHUNK, "action_resolution_tier": 256})  # fmt: skip
        if mode == "forward_dynamics":
            from tests.test_actions import ACTIONS

            nim["action_params"]["action"] = ACTIONS.tolist()
            ours["actions"] = ACTIONS.tolist()
        return nim, ours
    # the older height / width: a resolution tier's outputs take too long on two cores (`resolution_size` is
    # checked on its own)
    nim.update(height=32, width=64, num_frames=1 if mode == "text2image" else 5)
    ours.update(height=32, width=64, num_frames=1 if mode == "text2image" else 5)
    if mode == "image2video":
        nim["input_reference"] = ours["image"] = image
    if mode == "video2video":
        nim["input_reference"] = ours["video"] = clip
    return nim, ours


@pytest.mark.parametrize("mode", ["text2image", "text2video", "image2video", "video2video", "forward_dynamics",
                                  "policy", "inverse_dynamics"])  # fmt: skip
def test_nim_cosmos3_request_equals_the_same_request_on_video_generate(http: httpx.Client, mode: str) -> None:
    nim_body, our_body = _nim_case(mode)
    nim = http.post("/v1/infer", json=nim_body)
    ours = http.post("/v1/video/generate", json={**our_body, "response_format": "b64_json"})
    assert nim.status_code == ours.status_code == 200, nim.text + ours.text
    nim, ours = nim.json(), ours.json()
    if mode in ("policy", "inverse_dynamics", "forward_dynamics") and "actions" in ours:
        action = nim["action"]
        assert (action["shape"], action["raw_action_dim"], action["action_mode"]) == ([4, 2], 2, mode)
        assert action["domain_id"] == 4 and action["dtype"] == "float32"  # pusht
        assert np.abs(np.asarray(action["data"]) - np.asarray(ours["actions"])).max() <= 1e-4
    elif mode not in ("text2image",):
        assert nim["action"] is None
    media_field = "b64_image" if mode == "text2image" else "b64_video"
    if ours.get("b64_json") is None:
        assert media_field not in nim  # inverse dynamics makes no video
        return
    theirs, mine = base64.b64decode(nim[media_field]), base64.b64decode(ours["b64_json"])
    if mode == "text2image":
        got, expected = (np.asarray(Image.open(io.BytesIO(data))) for data in (theirs, mine))
        assert got.shape == expected.shape == (32, 64, 3)
    else:
        (got, _), (expected, _) = mp4_frames(theirs), mp4_frames(mine)
        assert got.shape == expected.shape
    # the same seed and request; the second one's prompt K/V come from the prefix cache (see the Videos API test)
    mse = np.mean((got.astype(float) - expected.astype(float)) ** 2)
    assert mse == 0 or 10 * np.log10(255**2 / mse) > 30


@pytest.mark.parametrize("body, status, field", [
    ({"model_mode": "text2video", "prompt": "x", "num_inference_steps": "35"}, 422, "num_inference_steps"),
    ({"model_mode": "text2video", "prompt": "x", "num_frames": 9.0}, 422, "num_frames"),
    ({"model_mode": "text2video", "prompt": "x", "resolution": "1280x720"}, 422, "resolution"),
    ({"model_mode": "text2video", "prompt": "x", "input_reference": "aGk="}, 422, "input_reference"),
    ({"model_mode": "policy", "prompt": "x", "input_reference": "aGk=", "num_frames": 5,
      "action_params": {"domain_name": "pusht", "action_chunk_size": 4}}, 422, "num_frames"),
    ({"model_mode": "policy", "prompt": "x",
      "action_params": {"domain_name": "pusht", "action_chunk_size": 4, "raw_action_dim": 7}},
     422, "action_params.raw_action_dim"),
    ({"model_mode": "policy", "prompt": "x",
      "action_params": {"domain_name": "pusht", "action_chunk_size": 4, "use_state": True}},
     422, "action_params.use_state"),
    ({"model_mode": "text2video", "prompt": "x", "transfer": {"edge": True}}, 422, "transfer"),
    ({"model_mode": "text2video", "prompt": "x", "steps": 2, "num_inference_steps": 2}, 422, "steps"),
])  # fmt: skip
def test_nim_fields_are_strict_and_named_in_errors(http: httpx.Client, body: dict, status: int, field: str) -> None:
    response = http.post("/v1/infer", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == field


def test_nim_manifest_and_license(http: httpx.Client, tiny_checkpoint: Path) -> None:
    manifest = http.get("/v1/manifest").json()
    assert manifest["model"] == tiny_checkpoint.name and manifest["inference_endpoint"] == "/v1/infer"
    assert manifest["profiles"][0]["selected"] and "policy" in manifest["modes"]
    license_answer = http.get("/v1/license")  # the tiny checkpoint carries no license file
    assert license_answer.status_code == 404 and "license" in license_answer.json()["error"]["message"]
