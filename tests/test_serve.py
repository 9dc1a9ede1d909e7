"""`cosmos3-serve serve` on the tiny checkpoint: a real HTTP server on localhost, driven by the official `openai`
client and by the curl line the command prints for the user."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_process import ServerProcess, free_port


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    port = free_port()
    running = ServerProcess(
        [sys.executable, "-m", "cosmos3_serve.server.cli", "serve", str(tiny_checkpoint), "--port", str(port),
         "--dtype", "float32", "--max-model-len", "4096", "--gpu-memory-utilization", "0.2"],
        port,
    )  # fmt: skip
    try:
        running.wait_ready(then_output="-H 'Content-Type: application/json'")
        yield running
    finally:
        running.stop()


def test_openai_client_chat_completion(server: ServerProcess, tiny_checkpoint: Path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    [model] = client.models.list().data
    assert model.id == tiny_checkpoint.name
    reply = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "Describe a robot arm."}], max_tokens=8, temperature=0
    )
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5

    stream = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "Describe a robot arm."}], max_tokens=8, temperature=0,
        stream=True,
    )  # fmt: skip
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the stream carries the same text


def test_printed_curl_lines_work_as_pasted(server: ServerProcess) -> None:
    curls = [line.strip() for line in server.output.splitlines() if line.strip().startswith("curl ")]
    assert len(curls) >= 2, server.output[-3000:]
    for line in curls:
        result = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        assert "error" not in body, body
    chat_line = next(line for line in curls if "/v1/chat/completions" in line)
    assert re.search(r"-d '\{.*\"messages\"", chat_line)


@pytest.mark.parametrize("part", ["image_url", "video_url"])
def test_multimodal_chat_streams_what_the_engine_answers(server: ServerProcess, vllm_reasoner, part: str) -> None:
    """OpenAI content parts with data URLs, streamed and not, equal the in-process engine's greedy answer."""
    from openai import OpenAI
    from vllm import SamplingParams

    from tests import media

    url = (media.png_data_url(media.smooth_image(seed=6)) if part == "image_url"
           else media.mp4_data_url(media.smooth_video(seed=7, num_frames=8), fps=4))  # fmt: skip
    messages = [{"role": "user", "content": [{"type": part, part: {"url": url}}, {"type": "text", "text": "Describe."}]}]
    expected = vllm_reasoner.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert reply.choices[0].message.content == streamed == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)
