"""`cosmos3-serve serve` options: NIM-style environment variables as defaults, flags over them, and the
precision of a deployment as vLLM engine arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cosmos3_serve.quant.precision import precision_engine_args
from cosmos3_serve.server.cli import build_parser
from cosmos3_serve.server.launcher import VAE_DTYPES, ServeOptions, vllm_engine_argv


def test_nim_environment_variables_are_defaults_and_flags_win(monkeypatch, tiny_checkpoint: Path) -> None:
    env = {"NIM_MODEL_PATH": str(tiny_checkpoint), "NIM_PRECISION": "fp8", "NIM_TENSOR_PARALLEL_SIZE": "2",
           "NIM_SERVER_PORT": "9123", "NIM_API_KEY": "k", "NIM_MAX_GENERATION_JOBS": "7",
           "NIM_MAX_GENERATION_BATCH_TOKENS": "4096"}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve"])
    assert (args.checkpoint, args.precision, args.tensor_parallel_size, args.port, args.api_key,
            args.max_generation_jobs, args.max_generation_batch_tokens) == (str(tiny_checkpoint), "fp8", 2, 9123,
                                                                           "k", 7, 4096)  # fmt: skip
    flags = build_parser().parse_args(["serve", "/elsewhere", "--precision", "bf16", "--port", "8001"])
    assert (flags.checkpoint, flags.precision, flags.port) == ("/elsewhere", "bf16", 8001)


@pytest.mark.parametrize("flag", ["--max-generation-batch-tokens", "--max-generation-jobs", "--max-request-bytes"])
def test_limits_must_be_positive(flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "/ckpt", flag, "0"])
    assert exit_info.value.code == 2 and f"argument {flag}: must be a positive integer, not 0" in capsys.readouterr().err


def test_precision_becomes_engine_arguments(tiny_checkpoint: Path) -> None:
    assert precision_engine_args("bf16", tiny_checkpoint) == {"dtype": "bfloat16"}
    assert precision_engine_args("fp8", tiny_checkpoint) == {"dtype": "bfloat16", "quantization": "fp8"}
    with pytest.raises(ValueError, match="quantizing a 16-bit checkpoint at load needs a CUDA GPU"):
        precision_engine_args("fp8", tiny_checkpoint, on_cpu=True)
    with pytest.raises(ValueError, match="nvfp4 needs an NVFP4 checkpoint"):
        precision_engine_args("nvfp4", tiny_checkpoint)
    argv = vllm_engine_argv(ServeOptions(tiny_checkpoint, precision="bf16", tensor_parallel_size=2))
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert (pairs["--dtype"], pairs["--tensor-parallel-size"]) == ("bfloat16", "2")
    assert json.loads(pairs["--kv-transfer-config"])["kv_connector"] == "Cosmos3KVExportConnector"
    assert pairs["--worker-extension-cls"].endswith("Cosmos3WorkerExtension")


def test_eager_and_profiler_flags_reach_vllms_parser(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from cosmos3_serve.model_executor import vllm_compat

    parser = vllm_compat.openai_server_api().make_arg_parser(FlexibleArgumentParser())
    default = parser.parse_args(vllm_engine_argv(ServeOptions(tiny_checkpoint)))
    assert not default.enforce_eager and default.profiler_config.profiler is None
    options = ServeOptions(tiny_checkpoint, enforce_eager=True, profile_dir=str(tmp_path / "traces"))
    parsed = parser.parse_args(vllm_engine_argv(options))
    assert parsed.enforce_eager
    assert (parsed.profiler_config.profiler, parsed.profiler_config.torch_profiler_dir) == (
        "torch", str(tmp_path / "traces"))


@pytest.mark.parametrize("flag, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_vae_precision_names_a_torch_dtype(tiny_checkpoint: Path, flag: str, dtype: torch.dtype) -> None:
    args = build_parser().parse_args(["serve", str(tiny_checkpoint), "--vae-precision", flag])
    assert getattr(torch, VAE_DTYPES[args.vae_precision]) is dtype  # what the worker builds its VAE in


def test_the_generators_settings_and_the_cpu_kv_cache_reach_vllms_parser(tiny_checkpoint: Path) -> None:
    """No memory flag on the CPU: vLLM's KV cache gets a share of the free memory (vLLM's own default, 92 % of the
    host, does not start); the generator's settings travel in `additional_config`."""
    import psutil
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from cosmos3_serve.model_executor import vllm_compat
    from cosmos3_serve.model_executor.admission import GeneratorSettings

    parser = vllm_compat.openai_server_api().make_arg_parser(FlexibleArgumentParser())
    default = parser.parse_args(vllm_engine_argv(ServeOptions(tiny_checkpoint)))
    assert 1 << 30 <= default.kv_cache_memory_bytes <= psutil.virtual_memory().available / 8 + (1 << 30)
    settings = GeneratorSettings.from_additional_config(default.additional_config)
    assert settings.max_shape == (512, 512, 33) and settings.state_budget_bytes == 1 << 30
    options = ServeOptions(tiny_checkpoint, gpu_memory_utilization=0.3, generation_max_shape="320x192x17",
                           generation_state_budget_mib=64)  # fmt: skip
    chosen = parser.parse_args(vllm_engine_argv(options))
    assert chosen.kv_cache_memory_bytes is None and chosen.gpu_memory_utilization == 0.3
    settings = GeneratorSettings.from_additional_config(chosen.additional_config)
    assert settings.max_shape == (320, 192, 17) and settings.state_budget_bytes == 64 << 20


def test_a_malformed_max_shape_is_refused_naming_the_flag(tiny_checkpoint: Path, capsys) -> None:
    from cosmos3_serve.server.launcher import serve

    assert serve(ServeOptions(tiny_checkpoint, generation_max_shape="1280x720")) == 2
    assert "--generation-max-shape: expected WIDTHxHEIGHTxFRAMES" in capsys.readouterr().err



def test_serve_with_no_flags_starts_and_serves(tiny_checkpoint: Path) -> None:
    """`cosmos3-serve serve CKPT` and nothing else (the port from NIM_SERVER_PORT): vLLM's KV cache and the generator
    size themselves on this CPU machine, then chat and an image are served."""
    import os
    import sys

    import httpx

    from tests.server_process import ServerProcess, free_port

    port = free_port()
    os.environ["NIM_SERVER_PORT"] = str(port)
    try:
        server = ServerProcess([sys.executable, "-m", "cosmos3_serve.server.cli", "serve", str(tiny_checkpoint)], port)
    finally:
        del os.environ["NIM_SERVER_PORT"]
    try:
        server.wait_ready(path="/v1/health/ready")
        with httpx.Client(base_url=server.base_url, timeout=300) as http:
            model = http.get("/v1/models").json()["data"][0]["id"]
            chat = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 8,
                                                           "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
            assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
            image = http.post("/v1/images/generations", json={"prompt": "A red cube.", "size": "64x64",
                                                              "num_inference_steps": 2})  # fmt: skip
            assert image.status_code == 200 and image.json()["data"][0]["b64_json"]
    finally:
        server.stop()
