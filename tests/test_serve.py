"""`cosmos3-serve serve` on the tiny checkpoint: a real HTTP server on localhost, driven by the official `openai`
client and by the curl line the command prints for the user."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_MARK = "is ready on"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, checkpoint: Path) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cosmos3_serve.server.cli", "serve", str(checkpoint), "--port", str(self.port),
             "--dtype", "float32", "--max-model-len", "4096"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if READY_MARK in line:
                self.ready.set()
        self.ready.set()  # exited: let the waiter see it

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float) -> None:
        if not self.ready.wait(timeout_s) or self.process.poll() is not None:
            raise RuntimeError(f"server did not start:\n{self.output[-5000:]}")
        self.ready.clear()
        self.ready.wait(2.0)  # the example requests follow the ready line


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    running = RunningServer(tiny_checkpoint)
    try:
        running.wait_ready(timeout_s=600)
        yield running
    finally:
        running.process.terminate()
        try:
            running.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            running.process.kill()


def test_openai_client_chat_completion(server: RunningServer, tiny_checkpoint: Path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")
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


def test_printed_curl_lines_work_as_pasted(server: RunningServer) -> None:
    curls = [line.strip() for line in server.output.splitlines() if line.strip().startswith("curl ")]
    assert len(curls) >= 2, server.output[-3000:]
    for line in curls:
        result = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        assert "error" not in body, body
    chat_line = next(line for line in curls if "/v1/chat/completions" in line)
    assert re.search(r"-d '\{.*\"messages\"", chat_line)
