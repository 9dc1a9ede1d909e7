"""Bounded soak: `cosmos3-serve serve CKPT` at its defaults under mixed load (chat streams, images, short videos)
for a fixed time; it prints the responses by status, the server errors, and the resident memory of the server's
process tree over time (the first sample after a warm-up minute against the last).

    python bench/soak.py CKPT [--minutes 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import Server  # noqa: E402

WARMUP_S = 60.0  # allocator pools, compiled kernels and caches settle in the first minute
SAMPLE_S = 10.0


def tree_rss_bytes(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


async def chat(client: httpx.AsyncClient, model: str, statuses: collections.Counter, until: float) -> None:
    while time.monotonic() < until:
        body = {"model": model, "max_tokens": 32, "stream": True,
                "messages": [{"role": "user", "content": "Describe a robot arm picking up a cube."}]}  # fmt: skip
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass
            statuses[f"chat {response.status_code}"] += 1


async def generate(client: httpx.AsyncClient, kind: str, body: dict, statuses: collections.Counter,
                   until: float) -> None:  # fmt: skip
    seed = 0
    while time.monotonic() < until:
        seed += 1
        response = await client.post("/v1/video/generate", json={**body, "seed": seed})
        statuses[f"{kind} {response.status_code}"] += 1


async def sample_memory(pid: int, samples: list[tuple[float, int]], start: float, until: float) -> None:
    while time.monotonic() < until:
        samples.append((time.monotonic() - start, tree_rss_bytes(pid)))
        await asyncio.sleep(SAMPLE_S)


async def soak(server: Server, minutes: float, chat_clients: int) -> dict:
    statuses: collections.Counter = collections.Counter()
    samples: list[tuple[float, int]] = []
    image = {"prompt": "A red cube on a table.", "num_frames": 1, "height": 256, "width": 256, "num_inference_steps": 8}
    video = {"prompt": "A robot arm moves.", "num_frames": 9, "height": 128, "width": 128, "num_inference_steps": 8}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        start = time.monotonic()
        until = start + minutes * 60
        await asyncio.gather(
            sample_memory(server.process.pid, samples, start, until),
            *(chat(client, model, statuses, until) for _ in range(chat_clients)),
            generate(client, "image", image, statuses, until),
            generate(client, "video", video, statuses, until),
        )
    settled = [rss for t, rss in samples if t >= WARMUP_S]
    return {"minutes": minutes, "responses": dict(statuses),
            "server_errors": sum(n for key, n in statuses.items() if key.split()[1].startswith("5")),
            "rss_settled_gib": settled[0] / 2**30, "rss_end_gib": settled[-1] / 2**30,
            "rss_growth": settled[-1] / settled[0] - 1, "rss_samples": samples}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--chat-clients", type=int, default=4)
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--server-log", default="soak-server.log")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    command = [sys.executable, "-m", "cosmos3_serve.server.cli", "serve", args.checkpoint, "--port", str(args.port)]
    server = Server(command, args.port, args.server_log)
    try:
        ready_s = server.wait_ready(1800.0)
        report = {"command": command, "ready_s": ready_s, **asyncio.run(soak(server, args.minutes, args.chat_clients))}
    finally:
        server.stop()
    print(f"{args.minutes:g} min, {args.chat_clients} chat clients + images + videos: responses {report['responses']}")
    print(f"server errors (5xx): {report['server_errors']}")
    print(f"resident memory of the server's processes: {report['rss_settled_gib']:.2f} GiB after "
          f"{WARMUP_S:.0f} s, {report['rss_end_gib']:.2f} GiB at the end ({report['rss_growth']:+.1%})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["server_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
