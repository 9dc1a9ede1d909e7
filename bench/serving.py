"""Serving over HTTP: end-to-end latency and concurrency of `cosmos3-serve serve`, then diffusers' pipeline one
request at a time on the same card, in one run.

    python bench/serving.py CKPT [--json OUT] [--server-log LOG]

CKPT is a configs-only checkpoint with an action head (`cosmos3-serve make-tiny CKPT --shape nano --action`);
the server runs it with random weights (`--load-format dummy`, bf16).

1. Latency: text->image 720p and a short text->video (480p, 33 frames), 35 steps, guidance 6 (both CFG branches),
   one request at a time, sync responses (PNG / MP4 bytes): submission to the last byte, median of `--repeats`.
2. Concurrency: text->image 720p (`--image-steps` steps) and policy (`--policy-domain`, a 320x180 first frame on
   the 256 tier's canvas, 16 actions, `--policy-steps` steps), each with guidance 6: N simultaneous requests for
   each N of `--concurrency` (latency p50 / p95, throughput = N / time until the last answer), and `--sequential`
   requests one after another (the one-at-a-time baseline: p50 / p95 of their latencies, throughput = 1 / mean).
   With `--profile`, the largest N of each kind runs once more under the worker's PyTorch profiler (`serve
   --profile-dir`, vLLM's /start_profile and /stop_profile): where that run's GPU time went, from its trace: kernels
   inside the executor's ranges (denoising steps, VAE encode, VAE decode), outside them (the reasoner's prefills,
   sampling), and the GPU's idle time: in all, and from the first denoising step on by what it followed (idle
   stretches over 3 ms, by the executor's host range last begun before each: a denoising step, a VAE batch, an
   admission, a graph capture), and the bound that GPU work puts on the median latency (`median_bound`). The
   profiler slows the host, so that run's latencies are not reported.
3. After the server has stopped (GPU memory): diffusers' `Cosmos3OmniPipeline` with random weights of the same
   shapes (bf16 transformer, the VAE in the server's `--vae-precision`, float32 by default), the same requests one
   at a time, up to the decoded frames (`output_type="np"`; no PNG / MP4 encoding, no HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import gzip
import io
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPT = "A robot arm picks up a red cube from a wooden table and places it in a blue bowl."
POLICY_CHUNK, POLICY_TIER, POLICY_FRAME = 16, 256, (320, 180)  # frame: (w, h)


@dataclass(frozen=True)
class Workload:
    """One kind of request: its HTTP route and body, and the same request for diffusers' pipeline."""

    name: str
    path: str
    body: dict
    pipeline_kwargs: dict = field(default_factory=dict)


def first_frame():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (POLICY_FRAME[1], POLICY_FRAME[0], 3), dtype=np.uint8))


def workloads(args: argparse.Namespace) -> dict[str, Workload]:
    frame = io.BytesIO()
    first_frame().save(frame, format="PNG")
    frame_b64 = base64.b64encode(frame.getvalue()).decode()
    image_w, image_h = (int(side) for side in args.image_size.split("x"))
    video_w, video_h, video_frames = (int(side) for side in args.video_shape.split("x"))

    def image(steps: int) -> Workload:
        return Workload(f"text2image {image_w}x{image_h}, {steps} steps", "/v1/images/generations",
                        {"prompt": PROMPT, "size": f"{image_w}x{image_h}", "num_inference_steps": steps},
                        {"num_frames": 1, "height": image_h, "width": image_w, "num_inference_steps": steps})  # fmt: skip

    video = {"num_frames": video_frames, "height": video_h, "width": video_w, "num_inference_steps": args.latency_steps}
    policy = {"mode": "policy", "prompt": PROMPT, "image": frame_b64, "action_domain": args.policy_domain,
              "action_chunk_size": POLICY_CHUNK, "action_resolution_tier": POLICY_TIER,
              "num_inference_steps": args.policy_steps}  # fmt: skip
    works = {
        "latency_image": image(args.latency_steps),
        "latency_video": Workload(f"text2video {video_w}x{video_h}x{video_frames}, {args.latency_steps} steps",
                                  "/v1/video/generate", {"prompt": PROMPT, **video}, video),
        "image": image(args.image_steps),
        "policy": Workload(f"policy {args.policy_domain}, {POLICY_CHUNK} actions, tier {POLICY_TIER}, "
                           f"{args.policy_steps} steps", "/v1/video/generate", policy,
                           {"num_inference_steps": args.policy_steps}),
    }
    parts = {"latency": ("latency_image", "latency_video"), "image": ("image",), "policy": ("policy",)}
    return {key: works[key] for part in args.parts for key in parts[part]}


def summary(latencies: list[float], wall_s: float) -> dict:
    ordered = sorted(latencies)

    def nearest_rank(p: float) -> float:
        return ordered[max(0, -(-len(ordered) * p // 100) - 1)]

    return {"requests": len(ordered), "p50_s": nearest_rank(50), "p95_s": nearest_rank(95), "wall_s": wall_s,
            "throughput_per_s": len(ordered) / wall_s, "latencies_s": latencies}  # fmt: skip


# ---- the server ---------------------------------------------------------------------------------------------


def serve_command(args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "cosmos3_serve.server.cli", "serve", args.checkpoint, "--precision", "bf16",
               "--load-format", "dummy", "--gpu-memory-utilization", str(args.gpu_memory_utilization),
               "--max-model-len", "4096", "--port", str(args.port)]  # fmt: skip
    if args.max_generation_batch_tokens is not None:
        command += ["--max-generation-batch-tokens", str(args.max_generation_batch_tokens)]
    if args.profile:
        command += ["--profile-dir", str(profile_dir(args))]
    return command + ["--vae-precision", args.vae_precision]


class Server:
    """`cosmos3-serve serve` in a child process, its output in `log_path`."""

    def __init__(self, command: list[str], port: int, log_path: str) -> None:
        self.command = command
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")  # noqa: SIM115 - open for the server's lifetime
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} (see its log)")
            try:
                if httpx.get(f"{self.base_url}/v1/health/ready", timeout=2.0).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the server was not ready after {timeout_s} s (see its log)")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


WARMUP_STEPS = 2


async def timed_post(client: httpx.AsyncClient, work: Workload, seed: int, steps: int | None = None) -> float:
    body = {**work.body, "seed": seed} | ({} if steps is None else {"num_inference_steps": steps})
    start = time.perf_counter()
    response = await client.post(work.path, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{work.name}: HTTP {response.status_code}: {response.text[:500]}")
    return time.perf_counter() - start


PHASE_SERIES = re.compile(r'^cosmos3_generation_phase_seconds_(sum|count)\{mode="[^"]*",phase="([a-z]+)"\} (\S+)$')


async def phase_totals(client: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    """(sum | count, phase) -> the server's running total over all modes (`cosmos3_generation_phase_seconds`)."""
    totals: dict[tuple[str, str], float] = {}
    for line in (await client.get("/v1/metrics")).text.splitlines():
        match = PHASE_SERIES.match(line)
        if match:
            key = (match.group(1), match.group(2))
            totals[key] = totals.get(key, 0.0) + float(match.group(3))
    return totals


def mean_phases(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, float]:
    """Mean seconds per job of each phase between two `phase_totals`."""
    phases = {phase for kind, phase in after if kind == "sum"}
    return {phase: (after[("sum", phase)] - before.get(("sum", phase), 0.0))
            / max(after[("count", phase)] - before.get(("count", phase), 0.0), 1.0) for phase in sorted(phases)}  # fmt: skip


async def together(client: httpx.AsyncClient, work: Workload, n: int) -> dict:
    before, start = await phase_totals(client), time.perf_counter()
    latencies = await asyncio.gather(*(timed_post(client, work, seed) for seed in range(n)))
    row = summary(list(latencies), time.perf_counter() - start)
    return {**row, "phases": mean_phases(before, await phase_totals(client))}


async def one_at_a_time(client: httpx.AsyncClient, work: Workload, n: int) -> dict:
    before = await phase_totals(client)
    latencies = [await timed_post(client, work, seed) for seed in range(n)]
    return {**summary(latencies, sum(latencies)), "phases": mean_phases(before, await phase_totals(client))}


async def measure_server(base_url: str, works: dict[str, Workload], args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(900.0)) as client:
        for work in works.values():  # warm-up: first calls of each shape (kernels' heuristics, VAE)
            await timed_post(client, work, seed=1000, steps=WARMUP_STEPS)
        result = {"latency": {}, "concurrency": {}}
        for key in [key for key in ("latency_image", "latency_video") if key in works]:
            result["latency"][key] = await one_at_a_time(client, works[key], args.repeats)
        for key in [key for key in ("image", "policy") if key in works]:
            rows = {"one_at_a_time": await one_at_a_time(client, works[key], args.sequential)}
            for n in args.concurrency:
                rows[f"together_{n}"] = await together(client, works[key], n)
            result["concurrency"][key] = rows
            if args.profile:
                profiled = await profiled_together(client, works[key], max(args.concurrency), args)
                result.setdefault("profiled", {})[key] = profiled
        metrics = (await client.get("/metrics")).text
    result["step_seconds"] = [line for line in metrics.splitlines() if line.startswith("cosmos3_denoise_step_seconds")]
    return result


# ---- profile ------------------------------------------------------------------------------------------------

EXECUTOR_RANGES = {"cosmos3::denoise_step": "denoise", "cosmos3::vae_encode": "vae_encode",
                   "cosmos3::vae_decode": "vae_decode"}  # model_executor.profile_ranges.PROFILE_RANGES  # fmt: skip
# Host ranges an idle stretch of the GPU is attributed to (the last one begun before it): the above, and the admission
# (its VAE encode inside) and CUDA graph captures.
HOST_RANGES = {**EXECUTOR_RANGES, "cosmos3::admit": "admit", "cosmos3::graph_capture": "capture"}
GPU_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")
IDLE_GAP_US = 3000  # idle stretches counted: far longer than a launch's latency


def profile_dir(args: argparse.Namespace) -> Path:
    return Path(args.server_log).resolve().with_suffix(".profiles")


async def profiled_together(client: httpx.AsyncClient, work: Workload, n: int, args: argparse.Namespace) -> dict:
    """N simultaneous requests under the worker's profiler, and where their GPU time went (`gpu_time_split`)."""
    before = set(profile_dir(args).rglob("*.pt.trace.json*"))
    (await client.post("/start_profile")).raise_for_status()
    start = time.perf_counter()
    await asyncio.gather(*(timed_post(client, work, seed) for seed in range(n)))
    wall_s = time.perf_counter() - start
    (await client.post("/stop_profile")).raise_for_status()
    [trace] = set(profile_dir(args).rglob("*.pt.trace.json*")) - before  # one worker (no tensor parallelism)
    return {"requests": n, "wall_s": wall_s, "trace": str(trace), **gpu_time_split(trace)}


def gpu_time_split(trace: Path) -> dict:
    """Where a worker's trace spent its time. GPU: busy seconds (the union of its kernels, copies and memsets), each
    kernel's seconds by the executor range it ran in (the `gpu_user_annotation` spans of the `record_function`
    ranges; "outside": the reasoner's prefills, sampling), the span from first to last activity. Host: seconds and
    count of each range (`user_annotation`): a range whose host time exceeds its kernels' was bound by launching."""
    with (gzip.open if trace.suffix == ".gz" else open)(trace, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    ranges = [e for e in events if e.get("name") in EXECUTOR_RANGES]
    host_s, host_count = dict.fromkeys(EXECUTOR_RANGES.values(), 0.0), dict.fromkeys(EXECUTOR_RANGES.values(), 0)
    for e in ranges:
        if e.get("cat") == "user_annotation":
            host_s[EXECUTOR_RANGES[e["name"]]] += e["dur"] / 1e6
            host_count[EXECUTOR_RANGES[e["name"]]] += 1
    spans = sorted((e["ts"], e["ts"] + e["dur"], EXECUTOR_RANGES[e["name"]]) for e in ranges
                   if e.get("cat") == "gpu_user_annotation")  # fmt: skip
    starts = [span[0] for span in spans]
    activity = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_ACTIVITY)
    by_range = dict.fromkeys([*EXECUTOR_RANGES.values(), "outside"], 0.0)
    busy_us, covered_until = 0.0, float("-inf")
    for begin, end in activity:
        busy_us += max(0.0, end - max(begin, covered_until))
        covered_until = max(covered_until, end)
        i = bisect.bisect_right(starts, begin) - 1
        inside = i >= 0 and begin < spans[i][1]
        by_range[spans[i][2] if inside else "outside"] += (end - begin) / 1e6
    span_s = (activity[-1][1] - activity[0][0]) / 1e6 if activity else 0.0
    return {"gpu_busy_s": busy_us / 1e6, "gpu_span_s": span_s, "gpu_by_range_s": by_range, "host_by_range_s": host_s,
            "ranges": host_count, **idle_after_first_step(events, activity)}  # fmt: skip


def idle_after_first_step(events: list[dict], activity: list[tuple[float, float]]) -> dict:
    """The GPU's idle stretches over IDLE_GAP_US from the first denoising step on: their seconds in all
    (`idle_s`), and by the host range last begun before each (`idle_after_s`: what the GPU was waiting behind)."""
    host = sorted((e["ts"], HOST_RANGES[e["name"]]) for e in events
                  if e.get("cat") == "user_annotation" and e.get("name") in HOST_RANGES)  # fmt: skip
    steps = [ts for ts, name in host if name == "denoise"]
    if not steps:
        return {"idle_s": 0.0, "idle_after_s": {}}
    starts, idle_after, covered_until = [ts for ts, _ in host], {}, float("-inf")
    for begin, end in activity:
        if covered_until >= steps[0] and begin - covered_until > IDLE_GAP_US:
            name = host[bisect.bisect_right(starts, covered_until) - 1][1]
            idle_after[name] = idle_after.get(name, 0.0) + (begin - covered_until) / 1e6
        covered_until = max(covered_until, end)
    return {"idle_s": sum(idle_after.values()), "idle_after_s": idle_after}


# ---- diffusers ----------------------------------------------------------------------------------------------


def diffusers_pipeline(checkpoint: Path, device: str, vae_dtype):
    import torch
    from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer
    from transformers import AutoTokenizer

    from cosmos3_serve.sampling.schedulers import load_scheduler

    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        transformer = Cosmos3OmniTransformer(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    torch.set_default_dtype(torch.float32)
    transformer.time_embedder.float()  # `_keep_in_fp32_modules`, as from_pretrained does
    with torch.no_grad():
        for p in transformer.parameters():  # random weights with unit-scale activations
            p.normal_(0, 1.0 / max(p.shape[-1], 1) ** 0.5) if p.ndim > 1 else p.data.normal_(1.0, 0.05)
    vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(checkpoint, subfolder="vae"))
    vae = vae.to(device, vae_dtype).eval()  # the server's --vae-precision
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "text_tokenizer")
    return Cosmos3OmniPipeline(transformer=transformer, text_tokenizer=tokenizer, vae=vae,
                               scheduler=load_scheduler(checkpoint), enable_safety_checker=False)  # fmt: skip


def measure_diffusers(checkpoint: Path, works: dict[str, Workload], args: argparse.Namespace) -> dict:
    import torch
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition

    device = "cuda" if torch.cuda.is_available() else "cpu"
    from cosmos3_serve.server.launcher import VAE_DTYPES

    pipe = diffusers_pipeline(checkpoint, device, getattr(torch, VAE_DTYPES[args.vae_precision]))
    pipe.set_progress_bar_config(disable=True)
    policy = CosmosActionCondition(mode="policy", chunk_size=POLICY_CHUNK, domain_name=args.policy_domain,
                                   resolution_tier=POLICY_TIER, image=first_frame(), view_point="ego_view")  # fmt: skip

    def run(work: Workload, seed: int, steps: int | None = None) -> float:
        kwargs = dict(work.pipeline_kwargs, action=policy) if work is works.get("policy") else dict(work.pipeline_kwargs)
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        start = time.perf_counter()
        pipe(PROMPT, guidance_scale=6.0, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    result = {}
    for key, work in works.items():
        run(work, seed=1000, steps=WARMUP_STEPS)  # warm-up
        latencies = [run(work, seed) for seed in range(args.repeats if key.startswith("latency") else args.sequential)]
        result[key] = summary(latencies, sum(latencies))
    return result


def wait_for_free_device_memory(fraction: float, timeout_s: float = 120.0) -> None:
    """Until the stopped server's processes have released the GPU (`fraction` of it free)."""
    import torch

    if not torch.cuda.is_available():
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info()
        if free >= fraction * total:
            return
        time.sleep(1.0)


# ---- report -------------------------------------------------------------------------------------------------


def print_report(report: dict) -> None:
    works, server, ref = report["workloads"], report["server"], report["diffusers"]
    print(f"\nserving, Nano shape, random weights, bf16, {report['device']}; seconds (server ready after "
          f"{report['server_ready_s']:.0f} s)")  # fmt: skip
    print(f"\nend-to-end latency, one request at a time (median of {report['args']['repeats']})")
    print(f"{'request':44}{'cosmos3-serve HTTP':>20}{'diffusers pipeline':>20}")
    for key in [key for key in ("latency_image", "latency_video") if key in works]:
        print(f"{works[key]:44}{statistics.median(server['latency'][key]['latencies_s']):20.3f}"
              f"{statistics.median(ref[key]['latencies_s']):20.3f}")  # fmt: skip
    for key in [key for key in ("image", "policy") if key in works]:
        rows = server["concurrency"][key]
        print(f"\n{works[key]}")
        phases = ("prefill", "queue", "denoise", "decode", "encode")
        print(f"{'':28}{'p50 s':>9}{'p95 s':>9}{'req/s':>9}{'p50 / single':>14}   mean s per job: "
              + " ".join(f"{phase:>8}" for phase in phases))  # fmt: skip
        single = rows["one_at_a_time"]["p50_s"]
        for label, row in [("diffusers, one at a time", ref[key]), *[
                (("cosmos3-serve, one at a time" if name == "one_at_a_time" else
                  f"cosmos3-serve, {name.split('_')[1]} together"), row) for name, row in rows.items()]]:  # fmt: skip
            split = " ".join(f"{row['phases'].get(phase, 0.0):8.3f}" for phase in phases) if "phases" in row else ""
            print(f"{label:28}{row['p50_s']:9.3f}{row['p95_s']:9.3f}{row['throughput_per_s']:9.3f}"
                  f"{row['p50_s'] / single:14.2f}{'':19}{split}")  # fmt: skip
        profiled = server.get("profiled", {}).get(key)
        if profiled is not None:
            print(f"profiled again, {profiled['requests']} together: wall {profiled['wall_s']:.3f} s, GPU busy "
                  f"{profiled['gpu_busy_s']:.3f} s over a span of {profiled['gpu_span_s']:.3f} s")  # fmt: skip
            print(f"{'  range':28}{'count':>9}{'host s':>9}{'GPU s':>9}")
            for name, gpu_s in profiled["gpu_by_range_s"].items():
                count, host_s = profiled["ranges"].get(name), profiled["host_by_range_s"].get(name)
                host = f"{'':18}" if count is None else f"{count:9d}{host_s:9.3f}"
                print(f"{'  ' + name:28}{host}{gpu_s:9.3f}")
            after = ", ".join(f"{name} {seconds:.3f}" for name, seconds in profiled["idle_after_s"].items())
            print(f"  GPU idle from the first denoising step on (stretches over {IDLE_GAP_US / 1e3:.0f} ms): "
                  f"{profiled['idle_s']:.3f} s, after: {after or 'none'}")  # fmt: skip
            rank, work_s, encode_s = median_bound(profiled, rows["one_at_a_time"])
            print(f"  the median's bound at this GPU work per request (denoising and VAE, {work_s * 1e3:.1f} ms): "
                  f"{rank:g} x {work_s:.4f} + its encoding {encode_s:.3f} = {rank * work_s + encode_s:.3f} s, "
                  f"2 x single {2 * single:.3f} s")  # fmt: skip


def median_bound(profiled: dict, single: dict) -> tuple[float, float, float]:
    """The median request of N sent together cannot finish before (N + 1) / 2 requests' GPU work is done, N requests
    of distinct seeds sharing none of it but their prompts' (prefix-cached) prefill: (that rank, the profiled run's
    GPU seconds per request inside the executor's ranges, the one-at-a-time requests' mean encoding phase, which
    follows the request's own GPU work)."""
    n = profiled["requests"]
    work_s = sum(profiled["gpu_by_range_s"][name] for name in EXECUTOR_RANGES.values()) / n
    return (n + 1) / 2, work_s, single.get("phases", {}).get("encode", 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--json", default=None)
    parser.add_argument("--server-log", default="serving-server.log")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    parser.add_argument("--image-size", default="1280x720", help="WIDTHxHEIGHT of text2image")
    parser.add_argument("--video-shape", default="832x480x33", help="WIDTHxHEIGHTxFRAMES of the short text2video")
    parser.add_argument("--latency-steps", type=int, default=35)
    parser.add_argument("--image-steps", type=int, default=10, help="steps of text2image in the concurrency runs")
    parser.add_argument("--policy-steps", type=int, default=4)
    parser.add_argument("--policy-domain", default="droid_lerobot", help="the policy requests' embodiment")
    parser.add_argument("--concurrency", type=lambda s: [int(n) for n in s.split(",")], default=[1, 4, 8, 16])
    parser.add_argument("--sequential", type=int, default=4, help="requests of the one-at-a-time baselines")
    parser.add_argument("--repeats", type=int, default=2, help="requests of each latency measurement")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--max-generation-batch-tokens", type=int, default=None,
                        help="the server's step token budget (default: the server's default)")
    parser.add_argument("--vae-precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="the server's VAE precision; diffusers' VAE runs in the same")
    parser.add_argument("--profile", action="store_true",
                        help="rerun the largest concurrency under the worker's profiler; traces next to the server log")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["latency", "image", "policy"],
                        help="comma-separated subset of latency, image, policy")
    args = parser.parse_args()

    works = workloads(args)
    server = Server(serve_command(args), args.port, args.server_log)
    try:
        ready_s = server.wait_ready(args.ready_timeout)
        served = asyncio.run(measure_server(server.base_url, works, args))
    finally:
        server.stop()
    wait_for_free_device_memory(0.8)
    reference = measure_diffusers(Path(args.checkpoint), works, args)

    import torch

    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "args": vars(args),
              "workloads": {key: work.name for key, work in works.items()}, "server_ready_s": ready_s,
              "server": served, "diffusers": reference}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
