"""`cosmos3-serve` command line: `serve` a checkpoint, `make-tiny` a random-weight one, `quantize` one to FP8 or
NVFP4, `generate` on this machine."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from cosmos3_serve.model_executor.checkpoint.shapes import SHAPES
from cosmos3_serve.quant.precision import ATTENTION_PRECISIONS, PRECISIONS
from cosmos3_serve.sampling.actions import ACTION_MODES, RESOLUTION_BINS, VIEW_POINT_FRAMING


def _make_tiny(args: argparse.Namespace) -> int:
    from cosmos3_serve.model_executor.checkpoint.writer import RANDOM_WEIGHT_SHAPES, write_checkpoint

    out = write_checkpoint(
        args.out, shape=args.shape, vocab=args.vocab, seed=args.seed, action=args.action, progress=True
    )
    weights = args.shape in RANDOM_WEIGHT_SHAPES
    kind = "weights, configs and tokenizer" if weights else "configs and tokenizer (no weights)"
    print(f"wrote {args.shape} Cosmos 3 checkpoint ({kind}) to {out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from cosmos3_serve.quant.calibration import DEFAULT_PROMPTS, CalibrationShape
    from cosmos3_serve.quant.modelopt_format import StepPolicy
    from cosmos3_serve.quant.quantize import quantize_checkpoint

    prompts = DEFAULT_PROMPTS
    if args.calibration is not None:
        prompts = tuple(line.strip() for line in Path(args.calibration).read_text().splitlines() if line.strip())
        if not prompts:
            raise SystemExit(f"--calibration: {args.calibration} holds no prompt (one per line)")
    out = quantize_checkpoint(Path(args.checkpoint), Path(args.out), args.precision, prompts, args.steps,
                              CalibrationShape.parse(args.shape), StepPolicy(args.a16_steps, args.a16_steps),
                              device=args.device)  # fmt: skip
    print(f"wrote the {args.precision} checkpoint of {args.checkpoint} to {out} ({len(prompts)} calibration prompts "
          f"x {args.steps} steps)")  # fmt: skip
    return 0


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from cosmos3_serve.model_executor.request import GenerationRequest
    from cosmos3_serve.server.generate_cli import GenerateOptions, generate, read_actions, read_video

    try:
        image = Image.open(args.image).convert("RGB") if args.image else None
        video = read_video(Path(args.video)) if args.video else None
        actions = read_actions(Path(args.actions)) if args.actions else None
    except (OSError, ValueError) as exc:
        print(f"error: cannot read an input file: {exc}", file=sys.stderr)
        return 2
    request = GenerationRequest(
        args.prompt, args.negative_prompt, num_frames=args.num_frames, height=args.height, width=args.width,
        fps=args.fps, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        seed=args.seed, image=image, video=video, action_mode=args.action_mode,
        action_domain=args.action_domain, action_chunk_size=args.action_chunk_size, actions=actions,
        action_resolution_tier=args.action_resolution_tier,
        action_view_point=None if args.action_view_point == "none" else args.action_view_point,
    )  # fmt: skip
    options = GenerateOptions(Path(args.checkpoint), Path(args.out), request, dtype=args.dtype,
                              actions_out=Path(args.actions_out) if args.actions_out else None)  # fmt: skip
    return generate(options)


def _serve(args: argparse.Namespace) -> int:
    from cosmos3_serve.server.launcher import ServeOptions, serve

    if args.checkpoint is None:
        print("error: give a checkpoint directory (or set NIM_MODEL_PATH)", file=sys.stderr)
        return 2
    fields = {field.name: getattr(args, field.name) for field in dataclasses.fields(ServeOptions)}
    options = ServeOptions(**{**fields, "checkpoint": Path(args.checkpoint)})
    if args.replicas > 1:
        from cosmos3_serve.server.replicas import serve_replicas

        public_url = (options.public_url or options.base_url).rstrip("/")
        return serve_replicas(args.argv[1:], args.replicas, options.tensor_parallel_size, options.host, options.port,
                              public_url, options.shutdown_grace_s,
                              None if options.job_store is None else str(options.job_store))  # fmt: skip
    return serve(options)


def _env(name: str, default=None, kind=str):
    """A NIM-style environment variable as a flag's default (the flag wins)."""
    value = os.environ.get(name)
    return default if value in (None, "") else kind(value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosmos3-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a random-weight checkpoint in the released Cosmos 3 layout")
    tiny.add_argument("out", help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weights are a pure function of the seed (default 0)")
    tiny.add_argument(
        "--vocab",
        choices=["qwen", "compact"],
        default="qwen",
        help="qwen: Qwen special tokens at their real ids (151643...); compact: small vocabulary for tests",
    )
    tiny.add_argument("--action", action="store_true", help="add the action head (policy / dynamics modes)")
    tiny.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="tiny",
        help="tiny (tests) / small (CPU quality benchmarks): random weights; nano / super: real dimensions, configs "
             "and tokenizer only",
    )
    tiny.set_defaults(func=_make_tiny)

    quantize = sub.add_parser("quantize", help="calibrate a 16-bit checkpoint with NVIDIA ModelOpt and write it in "
                                               "FP8 or NVFP4 (both towers), in the released layout")  # fmt: skip
    quantize.add_argument("checkpoint", help="a 16-bit Cosmos 3 checkpoint")
    quantize.add_argument("out", help="output directory")
    quantize.add_argument("--precision", choices=["fp8", "nvfp4"], required=True)
    quantize.add_argument("--calibration", default=None,
                          help="a text file of calibration prompts, one per line (default: four built-in prompts)")
    quantize.add_argument("--steps", type=_positive_int, default=10,
                          help="denoising steps each calibration prompt is generated over (default 10)")
    quantize.add_argument("--shape", default="832x480x33",
                          help="WIDTHxHEIGHT[xFRAMES] the calibration prompts generate at (default 832x480x33)")
    quantize.add_argument("--a16-steps", type=_non_negative_int, default=3,
                          help="the checkpoint's step policy: the first and last N denoising steps at 16-bit "
                               "activations (default 3, as the released FP8 checkpoints)")  # fmt: skip
    quantize.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    quantize.set_defaults(func=_quantize)

    gen = sub.add_parser(
        "generate",
        help="generate an image (PNG), a video (MP4) or actions (policy / dynamics modes) on this machine",
    )
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", default="", help="what to generate; in action modes, the action (may be empty)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--out", required=True,
                     help="output file: .png for one frame, .mp4 for a video, .npy / .json for inverse_dynamics' actions")
    gen.add_argument("--num-frames", type=int, default=1, help="4k + 1 frames; 1 is an image")
    gen.add_argument("--height", type=int, default=720)
    gen.add_argument("--width", type=int, default=1280)
    gen.add_argument("--fps", type=float, default=24.0)
    gen.add_argument("--num-inference-steps", type=int, default=35)
    gen.add_argument("--guidance-scale", type=float, default=6.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--image", default=None, help="image -> video, or an action mode's first frame (PNG / JPEG)")
    gen.add_argument("--video", default=None, help="video -> video, or an action mode's clip (a video file)")
    gen.add_argument("--action-mode", choices=ACTION_MODES, default=None,
                     help="forward_dynamics: image + actions -> video; policy: image -> video + actions; "
                          "inverse_dynamics: video -> actions")  # fmt: skip
    gen.add_argument("--action-domain", default=None, help="the embodiment, e.g. bridge_orig_lerobot")
    gen.add_argument("--action-chunk-size", type=int, default=None, help="action steps (the clip has one frame more)")
    gen.add_argument("--actions", default=None, help="forward_dynamics: actions [T, D] as .npy or JSON rows")
    gen.add_argument("--action-resolution-tier", type=int, choices=sorted(RESOLUTION_BINS), default=480)
    gen.add_argument("--action-view-point", choices=[*VIEW_POINT_FRAMING, "none"], default="ego_view")
    gen.add_argument("--actions-out", default=None, help="policy: its actions' file, .npy or .json (default: OUT.npy)")
    gen.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    gen.set_defaults(func=_generate)

    serve = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP: OpenAI-style chat, images and video generation, NIM-style operations",
        description="Flags default to NIM-style environment variables where named (docs/api.md).",
    )
    serve.add_argument("checkpoint", nargs="?", default=_env("NIM_MODEL_PATH"),
                       help="checkpoint directory in the released unified layout [NIM_MODEL_PATH]")
    serve.add_argument("--host", default=_env("NIM_HOST", "127.0.0.1"), help="[NIM_HOST]")
    serve.add_argument("--port", type=int, default=_env("NIM_SERVER_PORT", 8000, int), help="[NIM_SERVER_PORT]")
    serve.add_argument("--precision", choices=PRECISIONS, default=_env("NIM_PRECISION", "auto"),
                       help="weights and compute of both towers [NIM_PRECISION]")
    serve.add_argument("--tensor-parallel-size", type=int, default=_env("NIM_TENSOR_PARALLEL_SIZE", 1, int),
                       help="[NIM_TENSOR_PARALLEL_SIZE]")
    serve.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                       default=_env("NIM_DISTRIBUTED_EXECUTOR_BACKEND"),
                       help="how vLLM runs the tensor-parallel workers, each with its share of both towers: mp, "
                            "processes on this host; ray, actors on the nodes of the Ray cluster this host belongs "
                            "to (multi-node; docs/deployment.md) (default: vLLM's choice, mp on one node) "
                            "[NIM_DISTRIBUTED_EXECUTOR_BACKEND]")  # fmt: skip
    serve.add_argument("--max-model-len", type=int, default=_env("NIM_MAX_MODEL_LEN", None, int),
                       help="[NIM_MAX_MODEL_LEN]")
    serve.add_argument("--gpu-memory-utilization", type=float, default=_env("NIM_GPU_MEMORY_UTILIZATION", None, float),
                       help="fraction of device memory for both towers (vLLM's default, 0.9, on a GPU); the KV cache "
                            "gets what the reasoner and the generator's measured reservation leave (on the CPU: of "
                            "host memory that must be free at start; default: a share of the free memory for the KV "
                            "cache) [NIM_GPU_MEMORY_UTILIZATION]")
    serve.add_argument("--api-key", default=_env("NIM_API_KEY"),
                       help="require `Authorization: Bearer KEY` on every route but health [NIM_API_KEY]")
    serve.add_argument("--served-model-name", default=_env("NIM_SERVED_MODEL_NAME"),
                       help="model name in the API (default: the checkpoint's directory name) [NIM_SERVED_MODEL_NAME]")
    serve.add_argument(
        "--video-pruning-rate", type=float, default=None, help="fraction of video tokens to prune (EVS), in [0, 1)"
    )
    serve.add_argument("--video-pruning-method", choices=["evs", "vidcom2"], default="evs")
    serve.add_argument("--max-request-bytes", type=_positive_int,
                       default=_env("NIM_MAX_REQUEST_BYTES", 64 << 20, _positive_int),
                       help="larger request bodies get 413 [NIM_MAX_REQUEST_BYTES]")
    serve.add_argument("--max-generation-jobs", type=_positive_int,
                       default=_env("NIM_MAX_GENERATION_JOBS", 64, _positive_int),
                       help="generation jobs queued or running at once; more get 429 [NIM_MAX_GENERATION_JOBS]")
    serve.add_argument("--replicas", type=_positive_int, default=_env("NIM_REPLICAS", 1, _positive_int),
                       help="whole deployments side by side, each on its own --tensor-parallel-size GPUs, behind one "
                            "front end on --host / --port: new requests go to the replica with the fewest in flight, "
                            "a job's requests to its replica (docs/deployment.md) [NIM_REPLICAS]")
    serve.add_argument("--job-id-prefix", default="gen-",
                       help="what every generation job's id starts with (a front end routes by it)")
    serve.add_argument("--max-generation-batch-tokens", type=_positive_int,
                       default=_env("NIM_MAX_GENERATION_BATCH_TOKENS", None, _positive_int),
                       help="generator tokens per denoising step (default 2048); later jobs wait for a place in "
                            "the batch [NIM_MAX_GENERATION_BATCH_TOKENS]")
    serve.add_argument("--generation-max-shape", default=_env("NIM_GENERATION_MAX_SHAPE"),
                       help="WIDTHxHEIGHTxFRAMES of the largest video (with guidance) the server admits; its memory "
                            "is measured at startup and reserved beside vLLM's KV cache, and larger requests get 413 "
                            "(default: 1280x720x189 on a GPU, 512x512x33 on the CPU) [NIM_GENERATION_MAX_SHAPE]")
    serve.add_argument("--generation-state-budget-mib", type=_positive_int,
                       default=_env("NIM_GENERATION_STATE_BUDGET_MIB", None, _positive_int),
                       help="device memory (MiB) of the generation jobs between their prefill and their result (prompt "
                            "K/V, latents); more jobs wait in the queue (default: 4096 on a GPU, 1024 on the CPU) "
                            "[NIM_GENERATION_STATE_BUDGET_MIB]")
    serve.add_argument("--job-store", default=_env("NIM_JOB_STORE"),
                       help="directory of the generation jobs' SQLite store and result files, kept across restarts "
                            "(default: ~/.cache/cosmos3-serve/jobs-PORT) [NIM_JOB_STORE]")
    serve.add_argument("--max-stored-jobs", type=_positive_int,
                       default=_env("NIM_MAX_STORED_JOBS", 1000, _positive_int),
                       help="finished jobs kept; the oldest leave first [NIM_MAX_STORED_JOBS]")
    serve.add_argument("--max-stored-result-mib", type=_positive_int,
                       default=_env("NIM_MAX_STORED_RESULT_MIB", 4096, _positive_int),
                       help="bytes of finished jobs' results kept on disk, in MiB; the oldest leave first "
                            "[NIM_MAX_STORED_RESULT_MIB]")
    serve.add_argument("--result-ttl-s", type=float, default=_env("NIM_RESULT_TTL_S", 3600.0, float),
                       help="seconds a finished job and its result are kept [NIM_RESULT_TTL_S]")
    serve.add_argument("--public-url", default=_env("NIM_PUBLIC_URL"),
                       help="the URL clients reach this server at (behind a proxy or load balancer): links in "
                            "responses (`response_format: url`) start with it, never with a request's Host header "
                            "(default: http://HOST:PORT of --host and --port) [NIM_PUBLIC_URL]")
    serve.add_argument("--max-inference-steps", type=_positive_int,
                       default=_env("NIM_MAX_INFERENCE_STEPS", None, _positive_int),
                       help="denoising steps of one request; more get 422 (default 1000) [NIM_MAX_INFERENCE_STEPS]")
    serve.add_argument("--max-input-pixels", type=_positive_int,
                       default=_env("NIM_MAX_INPUT_PIXELS", None, _positive_int),
                       help="pixels of a conditioning image or of one frame of a conditioning video, read from the "
                            "header before decoding; more get 422 (default 4096x4096) [NIM_MAX_INPUT_PIXELS]")
    serve.add_argument("--max-clip-pixels", type=_positive_int,
                       default=_env("NIM_MAX_CLIP_PIXELS", None, _positive_int),
                       help="pixels of the frames of a conditioning video that a request reads, together, counted "
                            "before decoding; more get 422 (default: those of --generation-max-shape) "
                            "[NIM_MAX_CLIP_PIXELS]")
    serve.add_argument("--shutdown-grace-s", type=float, default=_env("NIM_SHUTDOWN_GRACE_S", 30.0, float),
                       help="on SIGTERM / SIGINT: new work gets 503, and generation jobs in flight and open requests "
                            "get this long to finish; jobs still running then fail (503) [NIM_SHUTDOWN_GRACE_S]")
    serve.add_argument("--allowed-media-domains", nargs="+", metavar="DOMAIN",
                       default=tuple(_env("NIM_ALLOWED_MEDIA_DOMAINS", "").split()),
                       help="hosts whose http(s) image / video URLs chat may fetch, and only where every address "
                            "they resolve to is public (default: none: media only inline as data URLs) "
                            "[NIM_ALLOWED_MEDIA_DOMAINS, space-separated]")
    serve.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                       help="dummy: random weights of the checkpoint's shapes, for benchmarks on configs-only "
                            "checkpoints (`make-tiny --shape nano`)")
    serve.add_argument("--vae-precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="the VAE's precision, apart from the towers': fp32 (default) encodes and decodes as "
                            "the float32 reference does; bf16 / fp16 as diffusers' pipeline with its VAE in that dtype")
    serve.add_argument("--a16-steps", type=_non_negative_int, default=None,
                       help="FP8 checkpoints: the first and last N denoising steps of every request with 16-bit "
                            "activations (W8A16), the others W8A8 (default: the checkpoint's step policy)")  # fmt: skip
    serve.add_argument("--generator-attention", choices=list(ATTENTION_PRECISIONS), default="bf16",
                       help="the generator's attention: bf16 (default: the towers' 16-bit dtype) or fp8 (queries, "
                            "keys and values in e4m3 with dynamic per-tensor scales; FlashAttention 3's FP8 kernel on "
                            "Hopper and later, emulated elsewhere)")
    serve.add_argument("--generator-parallel", default=None, metavar="cfg=C,sp=S",
                       help="split the generator's work over the --tensor-parallel-size ranks by sequence as well as "
                            "by layer shard: a request's CFG branches run on different rank groups (C) and each group "
                            "splits its tokens by Ulysses sequence parallelism (S, dividing the key-value heads); the "
                            "ranks left over (--tensor-parallel-size / (C x S)) shard the tower; default: the tower "
                            "sharded like the reasoner (tensor parallelism)")
    serve.add_argument("--enforce-eager", action="store_true",
                       help="no CUDA graphs: vLLM's for the reasoner, ours for the generator's denoising steps")
    serve.add_argument("--profile-dir", default=None,
                       help="enable POST /start_profile and /stop_profile (vLLM's): the engine worker's PyTorch "
                            "profiler, host and GPU, with ranges around each denoising step and VAE batch; traces "
                            "are written here at each stop (for development, not production)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
