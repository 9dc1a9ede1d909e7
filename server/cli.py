"""`cosmos3-serve` command line: `serve` a checkpoint, `make-tiny` a random-weight one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cosmos3_serve.model_executor.checkpoint.shapes import SHAPES


def _make_tiny(args: argparse.Namespace) -> int:
    from cosmos3_serve.model_executor.checkpoint.writer import write_checkpoint

    out = write_checkpoint(
        args.out, shape=args.shape, vocab=args.vocab, seed=args.seed, action=args.action, progress=True
    )
    kind = "weights, configs and tokenizer" if args.shape == "tiny" else "configs and tokenizer (no weights)"
    print(f"wrote {args.shape} Cosmos 3 checkpoint ({kind}) to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from cosmos3_serve.model_executor.generation import GenerationRequest
    from cosmos3_serve.server.generate_cli import GenerateOptions, generate

    request = GenerationRequest(
        args.prompt, args.negative_prompt, num_frames=args.num_frames, height=args.height, width=args.width,
        fps=args.fps, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        seed=args.seed, image=Image.open(args.image).convert("RGB") if args.image else None,
    )  # fmt: skip
    options = GenerateOptions(Path(args.checkpoint), Path(args.out), request, dtype=args.dtype)
    return generate(options)


def _serve(args: argparse.Namespace) -> int:
    from cosmos3_serve.server.launcher import ServeOptions, serve

    return serve(
        ServeOptions(
            checkpoint=Path(args.checkpoint),
            host=args.host,
            port=args.port,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            api_key=args.api_key,
            video_pruning_rate=args.video_pruning_rate,
            video_pruning_method=args.video_pruning_method,
        )
    )


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
        help="tiny: random weights; nano / super: real dimensions, configs and tokenizer only",
    )
    tiny.set_defaults(func=_make_tiny)

    gen = sub.add_parser("generate", help="generate an image (PNG) or a video (MP4) from a prompt, on this machine")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--out", required=True, help="output file: .png for one frame, .mp4 for a video")
    gen.add_argument("--num-frames", type=int, default=1, help="4k + 1 frames; 1 is an image")
    gen.add_argument("--height", type=int, default=720)
    gen.add_argument("--width", type=int, default=1280)
    gen.add_argument("--fps", type=float, default=24.0)
    gen.add_argument("--num-inference-steps", type=int, default=35)
    gen.add_argument("--guidance-scale", type=float, default=6.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--image", default=None, help="image -> video: the first frame (a PNG / JPEG file)")
    gen.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI-style API)")
    serve.add_argument("checkpoint", help="checkpoint directory in the released unified layout")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default="auto", help="reasoner compute dtype (auto, bfloat16, float32, ...)")
    serve.add_argument("--tensor-parallel-size", type=int, default=1)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="fraction of device memory for the engine (on CPU: of host memory that must be free at start)",
    )
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    serve.add_argument(
        "--video-pruning-rate", type=float, default=None, help="fraction of video tokens to prune (EVS), in [0, 1)"
    )
    serve.add_argument("--video-pruning-method", choices=["evs", "vidcom2"], default="evs")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
