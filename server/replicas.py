"""`serve --replicas N`: N whole deployments of the server, each on its own GPUs, behind one front end.

Each replica is the same `cosmos3-serve serve` command on a local port, with `--tensor-parallel-size` GPUs of its
own (`CUDA_VISIBLE_DEVICES`), its own job store and job ids tagged with its number; `replica_router` is the front
end on the deployment's host and port. Why replicas and not vLLM's data parallelism: a generation job is a prefill
whose exported K/V stay in the worker of the engine that ran it, followed by commands to that worker's generator
loop, so every request of a job would have to reach one engine of a data-parallel group by hand; whole servers
keep a job, its K/V, its memory reservation and its failures inside one process tree, and need nothing of vLLM.

The replicas die with the front end (`PR_SET_PDEATHSIG`); a signal to the front end drains every replica (each
gives its jobs the grace period); a replica that exits on its own takes the front end down with exit code 1, as
the server does when its engine dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import uvicorn

from cosmos3_serve.model_executor.process_lifetime import killed_with_parent
from cosmos3_serve.server.replica_router import JOB_ID_PREFIX, build_router_app

# Flags that the front end sets per replica (the others pass through unchanged).
_PER_REPLICA_FLAGS = ("--replicas", "--host", "--port", "--public-url", "--job-id-prefix", "--job-store")


def replica_argv(serve_argv: list[str], index: int, port: int, public_url: str,
                 job_store: str | None = None) -> list[str]:  # fmt: skip
    """The `serve` arguments of replica `index`: the deployment's, with its own port, job ids and job store (a
    folder of `job_store` if the deployment names one; else the default, one per port)."""
    kept, skip = [], False
    for arg in serve_argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _PER_REPLICA_FLAGS:
            skip = "=" not in arg
            continue
        kept.append(arg)
    store = [] if job_store is None else ["--job-store", os.path.join(job_store, f"replica-{index}")]
    return [*kept, "--host", "127.0.0.1", "--port", str(port), "--public-url", public_url,
            "--job-id-prefix", JOB_ID_PREFIX.format(replica=index), *store]  # fmt: skip


def gpu_sets(replicas: int, gpus_per_replica: int) -> list[str | None]:
    """`CUDA_VISIBLE_DEVICES` of each replica (None on a machine without CUDA GPUs); ValueError if too few."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        try:
            listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                    text=True, check=True).stdout  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            return [None] * replicas
        devices = listed.split()
    if not devices:
        return [None] * replicas
    if len(devices) < replicas * gpus_per_replica:
        raise ValueError(f"replicas: {replicas} replicas of {gpus_per_replica} GPU(s) need "
                         f"{replicas * gpus_per_replica} GPUs, {len(devices)} are visible")  # fmt: skip
    return [",".join(devices[i * gpus_per_replica : (i + 1) * gpus_per_replica]) for i in range(replicas)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_replicas(serve_argv: list[str], replicas: int, gpus_per_replica: int, host: str, port: int,
                   public_url: str, grace_s: float, job_store: str | None) -> int:  # fmt: skip
    """Start the replicas, serve the front end until a signal or a replica's exit; the exit code."""
    try:
        devices = gpu_sets(replicas, gpus_per_replica)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ports = [_free_port() for _ in range(replicas)]
    children = []
    for index, (replica_port, gpus) in enumerate(zip(ports, devices)):
        env = dict(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        command = [sys.executable, "-m", "cosmos3_serve.server.cli", "serve",
                   *replica_argv(serve_argv, index, replica_port, public_url, job_store)]  # fmt: skip
        children.append(subprocess.Popen(command, env=env, preexec_fn=killed_with_parent(os.getpid())))
    app = build_router_app([f"http://127.0.0.1:{p}" for p in ports])
    print(f"cosmos3-serve: {replicas} replicas (ports {', '.join(map(str, ports))}) behind {public_url}", flush=True)
    return asyncio.run(_run(app, host, port, children, grace_s))


async def _run(app, host: str, port: int, children: list[subprocess.Popen], grace_s: float) -> int:
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    serving = asyncio.create_task(server.serve())
    exited = asyncio.create_task(_first_exit(children))
    done, _ = await asyncio.wait({serving, exited}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if exited in done:
        index, code = exited.result()
        print(f"cosmos3-serve: replica {index} exited with {code}; stopping", file=sys.stderr, flush=True)
        exit_code = 1
        server.should_exit = True
        await serving
    else:
        exited.cancel()
    for child in children:  # each replica drains: its jobs in flight get the grace period
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + grace_s + 30
    for child in children:
        while child.poll() is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        if child.poll() is None:
            child.kill()
            child.wait()
    return exit_code


async def _first_exit(children: list[subprocess.Popen]) -> tuple[int, int]:
    while True:
        for index, child in enumerate(children):
            if child.poll() is not None:
                return index, child.returncode
        await asyncio.sleep(0.5)
