"""A real HTTP server in a child process on localhost, for tests that talk to it as a client would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import httpx

# For servers whose tests are about the API, jobs and process lifetime, not the reasoner's compiled graph: vLLM's
# CPU backend compiles the reasoner with Inductor at each start, which these tests do not need. The tests of the
# defaults (test_serve_options, test_default_deployment) start without it.
EAGER = ("--enforce-eager",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`command` in a child process; a `cosmos3-serve serve` command without `--job-store` gets a temporary one
    (removed at `stop`), so test servers leave no jobs in the user's cache."""

    def __init__(self, command: list[str], port: int) -> None:
        self._job_store = None
        if "serve" in command and "--job-store" not in command:
            self._job_store = tempfile.TemporaryDirectory(prefix="cosmos3-jobs-")
            command = [*command, "--job-store", self._job_store.name]
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        # vLLM's engine runs in its own process here and sizes its memory itself, as in production.
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self._lines: list[str] = []
        self.startup_statuses: list[tuple[int, int]] = []  # (status of the ready path, of /v1/health/live)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.process.stdout:
            self._lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def wait_ready(self, timeout_s: float = 600.0, then_output: str | None = None, path: str = "/health") -> None:
        """Until `path` answers 200 (and, if given, `then_output` has been printed). Each answer of `path` before
        that is kept in `startup_statuses` with the liveness answer at that moment."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output[-5000:]}")
            try:
                status = httpx.get(f"{self.base_url}{path}", timeout=2.0).status_code
                self.startup_statuses.append((status, httpx.get(f"{self.base_url}/v1/health/live", timeout=2.0).status_code))
            except httpx.TransportError:
                status = None
            if status == 200 and (then_output is None or then_output in self.output):
                return
            time.sleep(0.02)  # short: the test of readiness looks for the window while the generator warms up
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.output[-5000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._job_store is not None:
            self._job_store.cleanup()


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) of a server-sent event stream, as they arrive."""
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, json.loads(line.removeprefix("data: "))


class MediaOrigin:
    """A real HTTP server on 127.0.0.1 that answers every GET with `payload` and counts the requests it gets:
    the target a server must not fetch from."""

    def __init__(self, payload: bytes, content_type: str = "image/png") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                origin.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.hits = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, host: str = "127.0.0.1", path: str = "/media.png") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> MediaOrigin:
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
