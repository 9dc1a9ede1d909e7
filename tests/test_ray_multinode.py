"""Multi-node serving through vLLM's Ray executor, on a Ray cluster of two CPU nodes on this machine.

Two `ray start` processes make the nodes, on the loopback addresses 127.0.0.2 (head) and 127.0.0.3, each with one
core's threads and one worker slot (`tests/ray_on_cpu.py`: a logical GPU standing for a CPU worker).
`cosmos3-serve serve --tensor-parallel-size 2 --distributed-executor-backend ray` then runs one tensor-parallel rank
on each node, both towers sharded across the two, and a single-process server of the same checkpoint is the
reference: over HTTP, greedy chat gives the same text and a text -> image generation the same image. Killing the
server ends its Ray workers and leaves the cluster up; stopping the nodes leaves no process behind.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests import ray_on_cpu
from tests.server_process import ServerProcess, free_port

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="needs ray (the `test` extra installs it)")  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # loopback addresses: one per node, as vLLM's executor requires
WORKER_ACTOR = "ray::RayWorker"  # Ray's process title of vLLM's worker actors (RayWorkerProc, RayWorkerWrapper)
CHAT = {"messages": [{"role": "user", "content": "Describe a robot picking up a red cube."}], "max_tokens": 16,
        "temperature": 0}  # fmt: skip
IMAGE = {"prompt": "A red cube on a wooden table.", "size": "64x64", "num_inference_steps": 3, "seed": 7,
         "response_format": "b64_json"}  # fmt: skip
MIN_PSNR_DB = 30.0  # as the other tests of generated pixels; the two servers' images differ by float rounding only


@dataclass
class RayNode:
    """One node: a `ray start --block` process, whose descendants are the node's processes (GCS, raylet, workers);
    SIGTERM to it stops them all."""

    ip: str
    process: subprocess.Popen
    log: Path

    def wait_started(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {self.ip} did not start:\n{self.log.read_text()[-5000:]}")
            time.sleep(0.2)

    def processes(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def worker_actor_pids(self) -> set[int]:
        """vLLM's worker actors on this node."""
        pids = set()
        for process in self.processes():
            try:
                title = process.cmdline()
            except psutil.NoSuchProcess:
                continue
            if title and title[0].startswith(WORKER_ACTOR):
                pids.add(process.pid)
        return pids


@dataclass
class RayCluster:
    address: str  # the head's GCS, HOST:PORT
    head: RayNode
    worker: RayNode


def _repo_on_path() -> str:
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _start_node(ip: str, temp_dir: Path, *args: str) -> RayNode:
    """A node of the cluster (`args`: its role); the Ray workers it starts inherit this environment."""
    env = {**os.environ,
           "VLLM_HOST_IP": ip,  # what vLLM reports as this node's address
           "OMP_NUM_THREADS": "1",  # one core per node: the two workers do not oversubscribe the machine's two
           "GLOO_SOCKET_IFNAME": "lo",  # the workers' collectives stay on the loopback interface
           "PYTHONPATH": _repo_on_path(),  # the workers import `tests.ray_on_cpu` for its setup hook
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    log = temp_dir / "node.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(RAY), "start", "--block", "--node-ip-address", ip, "--num-cpus", "1",
                                    "--num-gpus", "1", "--temp-dir", str(temp_dir), "--disable-usage-stats", *args],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # fmt: skip
    return RayNode(ip, process, log)


def _stop_nodes(nodes: list[RayNode]) -> list[str]:
    """SIGTERM each node's `ray start`, the head last (a worker node whose head is gone waits for it to come back);
    what of their processes outlives that is killed by pid and named."""
    processes = [process for node in nodes for process in node.processes()]
    for node in reversed(nodes):
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
            try:
                node.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
    _, alive = psutil.wait_procs(processes, timeout=30)
    leftovers = []
    for process in alive:
        try:
            leftovers.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return leftovers


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A head node and a worker node; their session directories live in short temporary paths (Ray's socket paths
    must fit in 107 bytes)."""
    head_dir, worker_dir = Path(tempfile.mkdtemp(prefix="ray")), Path(tempfile.mkdtemp(prefix="ray"))
    port = free_port()
    nodes = []
    try:
        nodes.append(_start_node(HEAD_IP, head_dir, "--head", "--port", str(port), "--include-dashboard", "false",
                                 "--ray-client-server-port", str(free_port())))  # fmt: skip
        nodes[0].wait_started()
        nodes.append(_start_node(WORKER_IP, worker_dir, "--address", f"{HEAD_IP}:{port}"))
        nodes[1].wait_started()
        yield RayCluster(f"{HEAD_IP}:{port}", *nodes)
    finally:
        leftovers = _stop_nodes(nodes)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)
        assert not leftovers, f"processes outlived their Ray node: {leftovers}"


def _serve(checkpoint: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:  # `ServerProcess` starts its command in this environment
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        return ServerProcess([sys.executable, "-m", "cosmos3_serve.server.cli", "serve", str(checkpoint),
                              "--port", str(port), "--precision", "fp32", "--max-model-len", "2048",
                              "--enforce-eager", *flags], port)  # fmt: skip


@pytest.fixture(scope="module")
def ray_server(ray_cluster: RayCluster, tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """Tensor parallelism 2 through vLLM's Ray executor."""
    env = {"RAY_ADDRESS": ray_cluster.address,  # the engine core joins the cluster as a driver on the head node
           "VLLM_HOST_IP": HEAD_IP,  # the driver's node address, as its node's workers have it
           "RAY_RUNTIME_ENV_HOOK": ray_on_cpu.RUNTIME_ENV_HOOK,
           "PYTHONPATH": _repo_on_path(),  # the engine core imports the hook
           "RAY_DEDUP_LOGS": "0",  # every worker's log lines, with vLLM's `(Worker_TP<rank> pid=<pid>)` prefix
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    server = _serve(tiny_checkpoint, "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray", env=env)
    try:
        server.wait_ready(path="/v1/health/ready")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def single_server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """The reference: one worker process, vLLM's default executor."""
    server = _serve(tiny_checkpoint)
    try:
        server.wait_ready(path="/v1/health/ready")
        yield server
    finally:
        server.stop()


def _chat(server: ServerProcess) -> dict:
    model = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    answer = httpx.post(f"{server.base_url}/v1/chat/completions", json={**CHAT, "model": model}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _image(server: ServerProcess) -> np.ndarray:
    answer = httpx.post(f"{server.base_url}/v1/images/generations", json=IMAGE, timeout=300)
    assert answer.status_code == 200, answer.text
    [item] = answer.json()["data"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"), dtype=np.float64)


def _rank_pids(output: str) -> dict[int, int]:
    """Tensor-parallel rank -> worker pid, from vLLM's log prefix `(Worker_TP<rank> pid=<pid>)`."""
    return {int(rank): int(pid) for rank, pid in re.findall(r"\(Worker_TP(\d+) pid=(\d+)\)", output)}


def test_one_tensor_parallel_rank_runs_on_each_node(ray_cluster: RayCluster, ray_server: ServerProcess) -> None:
    on_head, on_worker = ray_cluster.head.worker_actor_pids(), ray_cluster.worker.worker_actor_pids()
    assert len(on_head) == len(on_worker) == 1, (on_head, on_worker)
    # Rank 0 is on the head, where the API server runs: the generator's first rank sends its events to the API
    # server's local socket.
    assert _rank_pids(ray_server.output) == {0: on_head.pop(), 1: on_worker.pop()}
    metadata = httpx.get(f"{ray_server.base_url}/v1/metadata", timeout=30).json()
    assert metadata["tensor_parallel_size"] == 2 and metadata["towers"]["generator"]["loaded"]


def test_greedy_chat_matches_the_single_process_server(ray_server: ServerProcess,
                                                       single_server: ServerProcess) -> None:  # fmt: skip
    across_nodes, single = _chat(ray_server), _chat(single_server)
    assert across_nodes["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"]
    assert across_nodes["usage"] == single["usage"]


def test_generated_image_matches_the_single_process_server(ray_server: ServerProcess,
                                                           single_server: ServerProcess) -> None:  # fmt: skip
    across_nodes, single = _image(ray_server), _image(single_server)
    assert across_nodes.shape == single.shape == (64, 64, 3)
    assert single.std() > 10  # a picture, not a flat field that any two images would match
    mse = float(np.mean((across_nodes - single) ** 2))
    assert mse == 0 or 10 * np.log10(255**2 / mse) > MIN_PSNR_DB


def test_a_killed_server_takes_its_ray_workers_along(ray_cluster: RayCluster, ray_server: ServerProcess) -> None:
    """SIGKILL to the API server (no shutdown path runs): its engine core dies with it (`process_lifetime`), and
    Ray ends the actors of that driver; the nodes stay up for the next server. Runs last in this module."""
    workers = ray_cluster.head.worker_actor_pids() | ray_cluster.worker.worker_actor_pids()
    assert len(workers) == 2
    ray_server.process.kill()
    ray_server.process.wait()
    deadline = time.monotonic() + 60
    while ray_cluster.head.worker_actor_pids() | ray_cluster.worker.worker_actor_pids():
        assert time.monotonic() < deadline, "the Ray workers outlived the killed server"
        time.sleep(0.5)
    assert ray_cluster.head.process.poll() is None and ray_cluster.worker.process.poll() is None
