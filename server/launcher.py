"""`cosmos3-serve serve`: one service for a checkpoint, and ready-to-paste requests once it is ready.

The service is one process running uvicorn with one FastAPI app (`server.app`): vLLM's OpenAI server over an
async vLLM engine (our reasoner plugin, the K/V export connector and the generator sidecar in its worker), plus
our generation and NIM routes. vLLM's engine core runs in a child process, so this must start under a
`__main__` guard (the console script has one).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from cosmos3_serve.model_executor import log_routing, patches, vllm_compat
from cosmos3_serve.model_executor.admission import GeneratorSettings
from cosmos3_serve.model_executor.parallel_degrees import ParallelDegrees
from cosmos3_serve.quant.precision import precision_engine_args
from cosmos3_serve.server import deployment
from cosmos3_serve.server.deployment import parse_shape
from cosmos3_serve.server.media_policy import MediaPolicy
from cosmos3_serve.server.protocol import InputLimits


VAE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --vae-precision -> torch dtype name


@dataclass(frozen=True)
class ServeOptions:
    checkpoint: Path
    host: str = "127.0.0.1"
    port: int = 8000
    precision: str = "auto"
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # "mp" or "ray" (across nodes); None: vLLM's choice
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    api_key: str | None = None
    served_model_name: str | None = None
    video_pruning_rate: float | None = None
    video_pruning_method: str = "evs"
    max_request_bytes: int = 64 << 20
    max_generation_jobs: int = 64
    job_id_prefix: str = "gen-"  # of every generation job's id
    max_generation_batch_tokens: int | None = None  # None: the executor's default
    generation_max_shape: str | None = None  # WIDTHxHEIGHTxFRAMES of the largest video admitted; None: the device's
    generation_state_budget_mib: int | None = None  # device memory of the jobs in flight; None: the device's
    load_format: str = "auto"  # "dummy": random weights of the checkpoint's shapes (benchmarks)
    profile_dir: str | None = None  # the worker's profiler traces; enables /start_profile and /stop_profile
    enforce_eager: bool = False  # no CUDA graphs, in the reasoner (vLLM's) nor in the generator
    vae_precision: str = "fp32"  # the VAE's: fp32 (default), bf16 or fp16
    a16_steps: int | None = None  # FP8: first and last steps at 16-bit activations; None: the checkpoint's policy
    generator_attention: str = "bf16"  # the generator's attention inputs: bf16 (the towers' dtype) or fp8
    generator_parallel: str | None = None  # cfg=C,sp=S over the tensor-parallel ranks; None: a sharded tower
    max_input_pixels: int | None = None  # of a conditioning image or video frame; None: `InputLimits`' default
    max_clip_pixels: int | None = None  # of a conditioning video's decoded frames together; None: the default
    max_inference_steps: int | None = None  # None: `InputLimits`' default
    shutdown_grace_s: float = 30.0  # SIGTERM: how long jobs in flight and open requests get to finish
    job_store: Path | None = None  # None: `default_job_store(port)`
    max_stored_jobs: int = 1000
    max_stored_result_mib: int = 4096
    result_ttl_s: float = 3600.0
    public_url: str | None = None  # where clients reach the server (a proxy's URL); None: `base_url`
    allowed_media_domains: tuple[str, ...] = ()  # hosts whose http(s) media URLs chat may fetch; none: data URLs only

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.checkpoint.resolve().name

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def generator_settings(options: ServeOptions) -> GeneratorSettings:
    """The generator's settings of `options`; ValueError naming the option when one is malformed."""
    try:
        shape = None if options.generation_max_shape is None else parse_shape(options.generation_max_shape)
    except ValueError as exc:
        raise ValueError(f"generation-max-shape: {exc}") from None
    budget = None if options.generation_state_budget_mib is None else options.generation_state_budget_mib << 20
    try:
        degrees = ParallelDegrees.parse(options.generator_parallel or "")
        degrees.check(options.tensor_parallel_size)
    except ValueError as exc:
        raise ValueError(f"generator-parallel: {exc}") from None
    return deployment.generator_settings(shape, options.max_generation_batch_tokens, VAE_DTYPES[options.vae_precision],
                                         budget, max_model_len=options.max_model_len,
                                         a16_steps=options.a16_steps,
                                         attention_precision=options.generator_attention,
                                         parallel=str(degrees))  # fmt: skip


def default_job_store(port: int) -> Path:
    """The user's cache directory, one store per port (two servers on one host keep their own jobs)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cosmos3-serve" / f"jobs-{port}"


def input_limits(options: ServeOptions) -> InputLimits:
    """The flags' limits; a conditioning clip's pixels default to those of the largest video the deployment
    generates (`--generation-max-shape`): 189 frames of 1280x720 on a GPU, 33 of 512x512 on the CPU."""
    width, height, frames = generator_settings(options).max_shape
    given = {"max_image_pixels": options.max_input_pixels,
             "max_clip_pixels": options.max_clip_pixels or width * height * frames,
             "max_inference_steps": options.max_inference_steps}  # fmt: skip
    return InputLimits(**{name: value for name, value in given.items() if value is not None})


def vllm_engine_argv(options: ServeOptions) -> list[str]:
    """vLLM server arguments for `options` (the API key is enforced by our middleware, not vLLM's)."""
    from cosmos3_serve.model_executor.engine_args import generation_engine_args

    engine = {**precision_engine_args(options.precision, options.checkpoint, on_cpu=not deployment.on_gpu()),
              **generation_engine_args(generator_settings(options)),
              **vllm_compat.video_pruning_kwargs(options.video_pruning_rate, options.video_pruning_method),
              "served_model_name": options.model_name, "host": options.host, "port": options.port,
              "tensor_parallel_size": options.tensor_parallel_size, "load_format": options.load_format}  # fmt: skip
    engine["max_model_len"] = options.max_model_len or deployment.AUTO_MAX_MODEL_LEN
    if options.gpu_memory_utilization is not None:
        engine["gpu_memory_utilization"] = options.gpu_memory_utilization
    elif not deployment.on_gpu():  # vLLM's CPU default (92 % of the host) does not fit beside anything
        engine["kv_cache_memory_bytes"] = deployment.cpu_kv_cache_bytes()
    if options.enforce_eager:
        engine["enforce_eager"] = True
    if options.distributed_executor_backend is not None:
        engine["distributed_executor_backend"] = options.distributed_executor_backend
    media_domains = sorted(MediaPolicy.from_domains(list(options.allowed_media_domains)).allowed_domains)
    if media_domains:  # vLLM checks them too; without any, our policy refuses every remote URL
        engine["allowed_media_domains"] = media_domains
    if options.profile_dir is not None:  # the worker's profiler only: the API server's would slow every request
        trace_dir = str(Path(options.profile_dir).resolve())
        engine["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": trace_dir,
                                     "torch_profiler_with_stack": False, "ignore_frontend": True}  # fmt: skip
    argv = ["--model", str(options.checkpoint)]
    for name, value in engine.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def example_requests(options: ServeOptions) -> str:
    """curl lines for chat, an image and a short video, small enough for the tiny checkpoint on a CPU."""
    auth = f" -H {shlex.quote('Authorization: Bearer ' + options.api_key)}" if options.api_key else ""
    json_header = " -H 'Content-Type: application/json'"
    chat = {"model": options.model_name, "max_tokens": 32,
            "messages": [{"role": "user", "content": "Describe a robot picking up a red cube."}]}  # fmt: skip
    image = {"model": options.model_name, "prompt": "A red cube on a wooden table.", "size": "256x256",
             "num_inference_steps": 4}  # fmt: skip
    video = {"prompt": "A robot arm picks up a red cube.", "height": 256, "width": 256, "num_frames": 9, "fps": 8,
             "num_inference_steps": 4}  # fmt: skip
    return "\n".join([
        f"curl -s {options.base_url}/v1/models{auth}",
        f"curl -s {options.base_url}/v1/chat/completions{auth}{json_header} -d {shlex.quote(json.dumps(chat))}",
        f"curl -s {options.base_url}/v1/images/generations{auth}{json_header} -d {shlex.quote(json.dumps(image))}",
        f"curl -s {options.base_url}/v1/video/generate{auth}{json_header} -d {shlex.quote(json.dumps(video))}"
        " -o video.mp4",
    ])  # fmt: skip


async def _serve(options: ServeOptions, vllm_args) -> int:
    from cosmos3_serve.server import http_server
    from cosmos3_serve.server.app import ServerSettings, build_cosmos3_app

    api = vllm_compat.openai_server_api()
    settings = ServerSettings(checkpoint=options.checkpoint, model_name=options.model_name,
                              precision=options.precision, api_key=options.api_key,
                              max_request_bytes=options.max_request_bytes,
                              max_generation_jobs=options.max_generation_jobs,
                              job_id_prefix=options.job_id_prefix,
                              media_policy=MediaPolicy.from_domains(list(options.allowed_media_domains)),
                              shutdown_grace_s=options.shutdown_grace_s,
                              input_limits=input_limits(options),
                              public_url=(options.public_url or options.base_url).rstrip("/"),
                              job_store=Path(options.job_store or default_job_store(options.port)),
                              max_stored_jobs=options.max_stored_jobs,
                              max_stored_result_bytes=options.max_stored_result_mib << 20,
                              result_ttl_s=options.result_ttl_s)  # fmt: skip
    _, sock = api.setup_server(vllm_args, reuse_port=False)
    try:
        async with api.build_async_engine_client(vllm_args) as engine_client:
            app = await build_cosmos3_app(engine_client, vllm_args, settings)
            state = app.state.cosmos3  # vLLM's lifespan deletes `app.state` when the HTTP server stops

            async def announce() -> None:
                await app.state.cosmos3_startup
                if state.service.ready:
                    print(f"\ncosmos3-serve is ready on {options.base_url} (model {options.model_name!r}). Try:\n",
                          flush=True)  # fmt: skip
                    print(example_requests(options) + "\n", flush=True)

            announcing = asyncio.create_task(announce())
            exit_code = await http_server.serve(app, sock, state.lifecycle,
                                                log_level=vllm_args.uvicorn_log_level,
                                                access_log=not vllm_args.disable_uvicorn_access_log,
                                                max_message_bytes=options.max_request_bytes)  # fmt: skip
            announcing.cancel()
            await state.service.stop()
    finally:
        sock.close()
    return exit_code


def serve(options: ServeOptions) -> int:
    if not (options.checkpoint / "config.json").is_file():
        print(f"error: {options.checkpoint} has no config.json; is it a Cosmos 3 checkpoint?", file=sys.stderr)
        return 2
    try:
        argv = vllm_engine_argv(options)
    except ValueError as exc:
        print(f"error: --{exc}", file=sys.stderr)
        return 2
    import uvloop
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    api = vllm_compat.openai_server_api()
    vllm_args = api.make_arg_parser(FlexibleArgumentParser(prog="cosmos3-serve serve")).parse_args(argv)
    api.validate_parsed_serve_args(vllm_args)
    log_routing.route_to_vllm()
    patches.guard_media_fetches(MediaPolicy.from_domains(list(options.allowed_media_domains)))
    return uvloop.run(_serve(options, vllm_args))
