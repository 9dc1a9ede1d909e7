"""Robots in a closed loop over `WS /v1/robot/session`: per-robot action latency at 1, 4 and 16 robots, actions only
and with the predicted video, against the bound that the GPU work per request puts on it.

    python bench/robot_policy.py CKPT [--robots 1,4,16] [--observations 8] [--steps 4] [--profile] [--json OUT]

Starts `cosmos3-serve serve CKPT` at its defaults (bf16 with dummy weights on a GPU, float32 on the CPU). Each robot
connects once, sends its session, then `--observations` observations one after the other (its next camera frame
once the last action chunk arrived: the closed loop), each a policy request (`--policy-domain`, 16 actions, the
256 tier, `--steps` steps, guidance 6). Per robot count and mode: the latency of every observation from the robot's
send to its answer (p50, p95), the actions per second of all robots together, and two references:

- `serial`: N x a robot's latency alone, a robot's latency when N robots' requests run one after another sharing
  no work (in a closed loop every request waits for the N - 1 others).
- `bound` (`--profile`, a GPU): N x the GPU's busy seconds per request, from the same fleet run once more under the
  worker's PyTorch profiler (`serve --profile-dir`). With N robots in the loop, a robot's mean latency is N / the
  answers per second (Little's law), and the GPU answers no faster than one request per its busy seconds per
  request; what a robot waits beyond the bound is host time: HTTP, scheduling, launches, idle GPU.
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
from serving import PROMPT, Server, first_frame, gpu_time_split  # noqa: E402

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


def profiled_fleet(server: Server, profiles: Path, url: str, start: dict, frame: str, robots: int,
                   observations: int) -> float:
    """The fleet once more under the worker's profiler: the GPU's busy seconds per request."""
    import httpx

    before = set(profiles.rglob("*.pt.trace.json*"))
    httpx.post(f"{server.base_url}/start_profile", timeout=60).raise_for_status()
    done = asyncio.run(fleet(url, start, frame, robots, observations))
    httpx.post(f"{server.base_url}/stop_profile", timeout=600).raise_for_status()
    [trace] = set(profiles.rglob("*.pt.trace.json*")) - before  # one worker (no tensor parallelism)
    return gpu_time_split(trace)["gpu_busy_s"] / done["observations"]


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
    parser.add_argument("--profile", action="store_true",
                        help="rerun each fleet under the worker's profiler for `bound` (traces next to the server log)")
    args = parser.parse_args()

    precision = ["--precision", "bf16", "--load-format", "dummy"] if on_gpu() else ["--precision", "fp32"]
    profiles = Path(args.server_log).resolve().with_suffix(".profiles")
    profiling = ["--profile-dir", str(profiles)] if args.profile else []
    server = Server([sys.executable, "-m", "cosmos3_serve.server.cli", "serve", args.checkpoint, "--port",
                     str(args.port), *precision, *profiling], args.port, args.server_log)  # fmt: skip
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
                row = asyncio.run(fleet(url, start, frame, robots, args.observations))
                if args.profile:
                    row["gpu_s_per_request"] = profiled_fleet(server, profiles, url, start, frame, robots,
                                                              args.observations)  # fmt: skip
                rows[(actions_only, robots)] = row
    finally:
        server.stop()

    print(f"\nrobots over WS /v1/robot/session, policy {args.policy_domain}, {POLICY_CHUNK} actions, tier {POLICY_TIER}, "
          f"{args.steps} steps, guidance 6; {args.observations} observations per robot, closed loop")  # fmt: skip
    print(f"{'output':14}{'robots':>7}{'p50 s':>9}{'p95 s':>9}{'serial s':>10}{'GPU s/req':>10}{'bound s':>9}"
          f"{'p50/bound':>10}{'actions/s':>11}")  # fmt: skip
    for (actions_only, robots), row in rows.items():
        alone = rows.get((actions_only, 1))
        row["serial_s"] = None if alone is None else alone["p50_s"] * robots
        gpu_s = row.get("gpu_s_per_request")
        row["bound_s"] = None if gpu_s is None else gpu_s * robots
        cells = [f"{row['serial_s']:10.3f}" if row["serial_s"] else f"{'-':>10}",
                 f"{gpu_s * 1e3:8.1f}ms" if gpu_s else f"{'-':>10}",
                 f"{row['bound_s']:9.3f}" if row["bound_s"] else f"{'-':>9}",
                 f"{row['p50_s'] / row['bound_s']:10.2f}" if row["bound_s"] else f"{'-':>10}"]  # fmt: skip
        print(f"{'actions only' if actions_only else 'with video':14}{robots:7d}{row['p50_s']:9.3f}{row['p95_s']:9.3f}"
              f"{''.join(cells)}{row['actions_per_s']:11.1f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps([{"actions_only": a, **row} for (a, _), row in rows.items()], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
