"""Robots in a closed loop over `WS /v1/robot/session`: per-robot action latency at 1, 4 and 16 robots, actions only
and with the predicted video, against the bound that a request's own work puts on it.

    python bench/robot_policy.py CKPT [--robots 1,4,16] [--observations 8] [--steps 4] [--json OUT]

Starts `cosmos3-serve serve CKPT` at its defaults (bf16 with dummy weights on a GPU, float32 on the CPU). Each robot
connects once, sends its session, then `--observations` observations one after the other (its next camera frame
once the last action chunk arrived: the closed loop), each a policy request (`--policy-domain`, 16 actions, the
256 tier, `--steps` steps, guidance 6). Per robot count and mode: the latency of every observation from the robot's
send to its answer (p50, p95), the actions per second of all robots together, and `bound`: a robot's latency when
it runs alone, times (N + 1) / 2, the median's finish time if the N robots' requests shared no work (every request
waits for the half of the others before it); batching the requests' forwards in one step beats it once the GPU has
room to spare.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_load import on_gpu  # noqa: E402
from serving import PROMPT, Server, first_frame  # noqa: E402

POLICY_CHUNK, POLICY_TIER = 16, 256


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def robot(url: str, start: dict, frame: str, observations: int, index: int) -> list[float]:
    """One robot's closed loop: the latency of each observation, in seconds."""
    import websockets

    latencies = []
    async with websockets.connect(url, max_size=None) as connection:
        await connection.send(json.dumps(start))
        await connection.recv()
        for step in range(observations):
            observation = {"type": "observation", "id": f"{index}-{step}", "image": frame, "seed": 1000 * index + step}
            sent = time.perf_counter()
            while True:
                await connection.send(json.dumps(observation))
                answer = json.loads(await connection.recv())
                if answer.get("code") != 429:
                    break
                await asyncio.sleep(0.05)
            if answer["type"] != "actions":
                raise RuntimeError(f"robot {index}: {answer}")
            latencies.append(time.perf_counter() - sent)
    return latencies


async def fleet(url: str, start: dict, frame: str, robots: int, observations: int) -> dict:
    began = time.perf_counter()
    per_robot = await asyncio.gather(*(robot(url, start, frame, observations, i) for i in range(robots)))
    wall = time.perf_counter() - began
    latencies = [latency for robot_latencies in per_robot for latency in robot_latencies]
    return {"robots": robots, "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95),
            "actions_per_s": len(latencies) * POLICY_CHUNK / wall, "observations": len(latencies)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--robots", default="1,4,16")
    parser.add_argument("--observations", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--policy-domain", default="droid_lerobot" if on_gpu() else "pusht")
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--server-log", default="robot-policy-server.log")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    precision = ["--precision", "bf16", "--load-format", "dummy"] if on_gpu() else ["--precision", "fp32"]
    server = Server([sys.executable, "-m", "cosmos3_serve.server.cli", "serve", args.checkpoint, "--port",
                     str(args.port), *precision], args.port, args.server_log)  # fmt: skip
    try:
        server.wait_ready(1800)
        png = io.BytesIO()
        first_frame().save(png, format="PNG")
        frame = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        url = server.base_url.replace("http://", "ws://") + "/v1/robot/session"
        rows = {}
        for actions_only in (True, False):
            start = {"type": "start", "prompt": PROMPT, "action_domain": args.policy_domain,
                     "action_chunk_size": POLICY_CHUNK, "action_resolution_tier": POLICY_TIER,
                     "num_inference_steps": args.steps, "actions_only": actions_only}  # fmt: skip
            asyncio.run(fleet(url, start, frame, 1, 2))  # warm-up: the batch shapes' first steps
            for robots in (int(n) for n in args.robots.split(",")):
                rows[(actions_only, robots)] = asyncio.run(fleet(url, start, frame, robots, args.observations))
    finally:
        server.stop()

    print(f"\nrobots over WS /v1/robot/session, policy {args.policy_domain}, {POLICY_CHUNK} actions, tier {POLICY_TIER}, "
          f"{args.steps} steps, guidance 6; {args.observations} observations per robot, closed loop")  # fmt: skip
    print(f"{'output':14}{'robots':>7}{'p50 s':>9}{'p95 s':>9}{'bound s':>9}{'p50/bound':>10}{'actions/s':>11}")
    for (actions_only, robots), row in rows.items():
        alone = rows.get((actions_only, 1))
        bound = None if alone is None else alone["p50_s"] * (robots + 1) / 2
        row["bound_s"] = bound
        ratio = f"{row['p50_s'] / bound:10.2f}" if bound else f"{'-':>10}"
        bound_text = f"{bound:9.3f}" if bound else f"{'-':>9}"
        print(f"{'actions only' if actions_only else 'with video':14}{robots:7d}{row['p50_s']:9.3f}{row['p95_s']:9.3f}"
              f"{bound_text}{ratio}{row['actions_per_s']:11.1f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps([{"actions_only": a, **row} for (a, _), row in rows.items()], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
