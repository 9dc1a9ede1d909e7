"""Chat and generation at once on one `cosmos3-serve serve`: what each does to the other, over HTTP.

    python bench/mixed_load.py CKPT [--json OUT] [--server-log LOG] [--serve-flag=--FLAG ...]

The server runs at its defaults (no `--gpu-memory-utilization`), with random weights on a configs-only checkpoint
(`--load-format dummy`, bf16) on a GPU, or the tiny checkpoint in float32 on the CPU; `--serve-flag` adds flags.

1. Chat: `--chat-clients` clients each stream chat completions of `--chat-tokens` tokens (greedy, EOS ignored) back
   to back. Per token: the time to the first token (TTFT) and the gaps between tokens, p50 / p99 / max over all
   streams. Idle first (`--idle-s` seconds), then while each generation load runs (its requests sent together,
   synchronous responses): one video (`--video`, `--video-steps`), `--images` concurrent images (`--image-size`,
   `--image-steps`), `--policies` concurrent policy requests (checkpoints with an action head). Each load's own
   latency is reported too.
2. The reverse: a generation load (`--reverse`: images or policy) alone, then while `--reverse-chat-clients` chat
   clients stream: latency p50 / max and throughput (requests / time to the last answer), and the ratio of the two.

The same HTTP API served before and after the generator left vLLM's engine loop, so this bench measures both (run
it with the older package first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import PROMPT, Server, first_frame  # noqa: E402

CHAT_PROMPT = "Describe, step by step, how a robot arm picks up a red cube and places it in a blue bowl."


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def serve_command(args: argparse.Namespace) -> list[str]:
    precision = ["--precision", "bf16", "--load-format", "dummy"] if on_gpu() else ["--precision", "fp32"]
    return [sys.executable, "-m", "cosmos3_serve.server.cli", "serve", args.checkpoint, "--port", str(args.port),
            "--served-model-name", "cosmos3", *precision, *args.serve_flag]  # fmt: skip


# ---- chat ---------------------------------------------------------------------------------------------------


async def chat_stream(client: httpx.AsyncClient, tokens: int) -> tuple[float, list[float]]:
    """(TTFT, gaps between tokens) of one streamed chat completion."""
    body = {"model": "cosmos3", "messages": [{"role": "user", "content": CHAT_PROMPT}], "max_tokens": tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
    start = time.perf_counter()
    arrivals = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"chat: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line.removeprefix("data: ")).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("chat: no token streamed")
    return arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:])]


async def chat_clients(client: httpx.AsyncClient, clients: int, tokens: int, until: asyncio.Event) -> dict:
    """`clients` clients streaming back to back until `until` is set (each finishes the stream it is in)."""
    ttfts, gaps, streams = [], [], 0

    async def one_client() -> None:
        nonlocal streams
        while not until.is_set():
            ttft, stream_gaps = await chat_stream(client, tokens)
            ttfts.append(ttft)
            gaps.extend(stream_gaps)
            streams += 1

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return {"streams": streams, "ttft": percentiles(ttfts), "gap": percentiles(gaps)}


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, -(-len(ordered) * p // 100) - 1)]

    return {"n": len(ordered), "p50": rank(50), "p99": rank(99), "max": ordered[-1], "mean": statistics.fmean(ordered)}


# ---- generation loads ---------------------------------------------------------------------------------------


def loads(args: argparse.Namespace, action_head: bool) -> dict[str, tuple[str, list[dict]]]:
    """Load name -> (route, bodies sent together)."""
    video_w, video_h, video_frames = (int(side) for side in args.video.split("x"))
    image_w, image_h = (int(side) for side in args.image_size.split("x"))
    frame = io.BytesIO()
    first_frame().save(frame, format="PNG")
    video = {"prompt": PROMPT, "width": video_w, "height": video_h, "num_frames": video_frames,
             "num_inference_steps": args.video_steps, "guidance_scale": 6.0}  # fmt: skip
    image = {"prompt": PROMPT, "width": image_w, "height": image_h, "num_frames": 1,
             "num_inference_steps": args.image_steps, "guidance_scale": 6.0}  # fmt: skip
    policy = {"mode": "policy", "prompt": PROMPT, "image": base64.b64encode(frame.getvalue()).decode(),
              "action_domain": args.policy_domain, "action_chunk_size": 16, "action_resolution_tier": 256,
              "num_inference_steps": 4, "guidance_scale": 6.0}  # fmt: skip
    chosen = {"video": [video], "images": [image] * args.images}
    if action_head:
        chosen["policy"] = [policy] * args.policies
    return {name: ("/v1/video/generate", [{**body, "seed": seed} for seed, body in enumerate(bodies)])
            for name, bodies in chosen.items()}  # fmt: skip


async def generation_load(client: httpx.AsyncClient, bodies: list[dict]) -> dict:
    async def one(body: dict) -> float:
        start = time.perf_counter()
        response = await client.post("/v1/video/generate", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"generation: HTTP {response.status_code}: {response.text[:300]}")
        return time.perf_counter() - start

    start = time.perf_counter()
    latencies = await asyncio.gather(*(one(body) for body in bodies))
    wall = time.perf_counter() - start
    return {"requests": len(bodies), "wall_s": wall, "throughput_per_s": len(bodies) / wall,
            "latency": percentiles(list(latencies))}  # fmt: skip


async def chat_during(client: httpx.AsyncClient, bodies: list[dict], clients: int, tokens: int) -> dict:
    """Chat clients streaming while the load runs (they start with it and stop when it is done)."""
    done = asyncio.Event()
    chat = asyncio.create_task(chat_clients(client, clients, tokens, done))
    try:
        load = await generation_load(client, bodies)
    finally:
        done.set()
    return {"load": load, "chat": await chat}


async def measure(base_url: str, args: argparse.Namespace, result: dict) -> None:
    """Fills `result` part by part (a bench cut short keeps what it measured)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(3600.0)) as client:
        metadata = (await client.get("/v1/metadata")).json()
        action_head = any(mode == "policy" for mode in metadata.get("modes", []))
        works = loads(args, action_head)
        for name, (_, bodies) in works.items():  # warm-up: each shape once
            if args.warmup_steps and (name in args.loads or name == args.reverse):
                await generation_load(client, [{**bodies[0], "num_inference_steps": args.warmup_steps}])
        await chat_stream(client, args.chat_tokens)
        idle = asyncio.Event()
        asyncio.get_running_loop().call_later(args.idle_s, idle.set)
        result["metadata"] = metadata
        result["chat_idle"] = await chat_clients(client, args.chat_clients, args.chat_tokens, idle)
        print("chat idle:", json.dumps(result["chat_idle"]), flush=True)
        for name in args.loads:
            if name in works:
                result[f"chat_during_{name}"] = await chat_during(client, works[name][1], args.chat_clients,
                                                                  args.chat_tokens)  # fmt: skip
                print(f"chat during {name}:", json.dumps(result[f"chat_during_{name}"]), flush=True)
        if args.reverse != "none":
            reverse = works[args.reverse][1]
            result["reverse_alone"] = await generation_load(client, reverse)
            result["reverse_with_chat"] = await chat_during(client, reverse, args.reverse_chat_clients,
                                                            args.chat_tokens)  # fmt: skip


def print_report(report: dict) -> None:
    r = report["result"]
    print(f"\nmixed load, {report['device']}, {report['date']}; server: {' '.join(report['server_command'][3:])}")
    print(f"KV cache {r['metadata'].get('towers', {}).get('generator', {}).get('kv_cache_gib', '?')} GiB; generator "
          f"memory {r['metadata'].get('towers', {}).get('generator', {}).get('memory_gib', '?')}")  # fmt: skip
    print(f"held at once (/v1/metadata capacity): {r['metadata'].get('capacity', '?')}")
    print(f"\nchat: {report['args']['chat_clients']} clients x {report['args']['chat_tokens']} tokens, seconds")
    print(f"{'while':34}{'streams':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'gap p50':>10}{'gap p99':>10}{'gap max':>10}"
          f"{'load wall':>11}{'load p50':>10}")  # fmt: skip
    rows = [("idle", r["chat_idle"], None)]
    rows += [(name.removeprefix("chat_during_"), row["chat"], row["load"]) for name, row in r.items()
             if name.startswith("chat_during_")]  # fmt: skip
    for name, chat, load in rows:
        tail = "" if load is None else f"{load['wall_s']:11.2f}{load['latency']['p50']:10.2f}"
        print(f"{name:34}{chat['streams']:8d}{chat['ttft']['p50']:10.4f}{chat['ttft']['p99']:10.4f}"
              f"{chat['gap']['p50']:10.4f}{chat['gap']['p99']:10.4f}{chat['gap']['max']:10.4f}{tail}")  # fmt: skip
    idle = r["chat_idle"]
    for name, chat, _ in rows[1:]:
        print(f"  {name}: gap p99 {chat['gap']['p99'] / idle['gap']['p99']:.2f}x idle, "
              f"TTFT p50 {chat['ttft']['p50'] / idle['ttft']['p50']:.2f}x idle")  # fmt: skip
    if "reverse_alone" not in r:
        return
    alone, mixed = r["reverse_alone"], r["reverse_with_chat"]["load"]
    print(f"\ngeneration {report['args']['reverse']} ({alone['requests']} together), alone vs with "
          f"{report['args']['reverse_chat_clients']} chat clients streaming")  # fmt: skip
    print(f"{'':22}{'p50 s':>9}{'max s':>9}{'req/s':>9}")
    for label, row in (("alone", alone), ("with chat", mixed)):
        print(f"{label:22}{row['latency']['p50']:9.3f}{row['latency']['max']:9.3f}{row['throughput_per_s']:9.3f}")
    print(f"throughput with chat / alone: {mixed['throughput_per_s'] / alone['throughput_per_s']:.3f}")


def main() -> int:
    gpu = on_gpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--json", default=None)
    parser.add_argument("--server-log", default="mixed-load-server.log")
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--serve-flag", action="append", default=[], help="a flag for `serve` (repeat; --x=value)")
    parser.add_argument("--chat-clients", type=int, default=4)
    parser.add_argument("--chat-tokens", type=int, default=96)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--video", default="1280x720x189" if gpu else "512x512x33", help="WIDTHxHEIGHTxFRAMES")
    parser.add_argument("--video-steps", type=int, default=35 if gpu else 12)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-size", default="1280x720" if gpu else "256x256")
    parser.add_argument("--image-steps", type=int, default=35 if gpu else 12)
    parser.add_argument("--policies", type=int, default=16)
    parser.add_argument("--policy-domain", default="droid_lerobot" if gpu else "pusht",
                        help="the policy requests' embodiment (the tiny checkpoint's action head is 8 wide)")
    parser.add_argument("--loads", type=lambda s: s.split(","), default=["video", "images", "policy"])
    parser.add_argument("--reverse", choices=["images", "policy", "none"], default="images")
    parser.add_argument("--reverse-chat-clients", type=int, default=32)
    parser.add_argument("--ready-timeout", type=float, default=1800.0)
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="steps of one warm-up request per load shape (0: none; the server's startup already "
                             "runs the largest admitted video once to measure it)")
    args = parser.parse_args()

    device = "cpu"
    if gpu:
        import torch

        device = torch.cuda.get_device_name()
    server = Server(serve_command(args), args.port, args.server_log)
    result: dict = {}
    report = {"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args), "server_ready_s": None,
              "server_command": server.command, "result": result}  # fmt: skip
    try:
        report["server_ready_s"] = server.wait_ready(args.ready_timeout)
        print(f"server ready after {report['server_ready_s']:.1f} s", flush=True)
        asyncio.run(measure(server.base_url, args, result))
    finally:
        server.stop()
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
