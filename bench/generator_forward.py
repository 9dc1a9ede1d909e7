"""Generator forward: our tower (vLLM layers, FA3 varlen, prompt K/V given) against diffusers' full
`Cosmos3OmniTransformer` forward on the same inputs and the same random weights, same run, same card.

    python bench/generator_forward.py CKPT [--shapes image720,video480x93,video720x189] [--json OUT]

CKPT is a configs-only checkpoint (`cosmos3-serve make-tiny CKPT --shape nano`); weights are random (bf16).
For each shape: median forward time of both, achieved TFLOP/s of ours, the fraction of the bf16 matmul peak
measured in this run, and the relative difference of the velocities (ours vs diffusers, both bf16).
diffusers recomputes the reasoner's prompt K/V inside every forward; ours takes them from the export, as in
serving (the prompt's K/V are captured from diffusers' own forward, so both attend to the same keys).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

PROMPT_TOKENS = 300
SHAPES = {  # name: (frames, height, width)
    "image720": (1, 720, 1280),
    "video480x93": (93, 480, 832),
    "video720x189": (189, 720, 1280),
}


def init_vllm_single_process() -> None:
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method="env://")
    initialize_model_parallel(1, 1)


def cuda_time(fn, min_total_s: float = 2.0, max_repeats: int = 50) -> float:
    """Median of enough timed calls to fill about `min_total_s` (at least 3), after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    repeats = min(max_repeats, max(3, int(min_total_s / (start.elapsed_time(end) / 1e3))))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_peak_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / cuda_time(lambda: a @ b)


def forward_flops(config, gen_tokens: int) -> float:
    """Matmul FLOPs of one generator forward: projections, MLP, attention over prompt + generator keys."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_token = 2 * (h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * inter)
    attention = 4 * gen_tokens * (gen_tokens + PROMPT_TOKENS) * q_dim
    return layers * (gen_tokens * per_token + attention)


def measure(shape: tuple[int, int, int], config, reference, ours, peak: float) -> dict:
    """Both forwards on one (frames, height, width): times, throughput and the velocities' difference."""
    from diffusers.models.transformers import transformer_cosmos3

    from cosmos3_serve.model_executor.generation import patchify, unpatchify, vision_positions
    from cosmos3_serve.model_executor.generator import GeneratorSequence
    from cosmos3_serve.model_executor.kv_export import PromptKV

    frames, height, width = shape
    latent = (1, 48, (frames - 1) // 4 + 1, height // 16, width // 16)
    grid = (latent[2], -(-latent[3] // 2), -(-latent[4] // 2))
    tokens = grid[0] * grid[1] * grid[2]
    latents = torch.randn(latent, device="cuda", dtype=torch.bfloat16)
    text_positions = torch.arange(PROMPT_TOKENS, dtype=torch.float32).expand(3, -1)
    gen_positions = vision_positions(config, grid, PROMPT_TOKENS, 24.0, 4)
    inputs = dict(
        input_ids=torch.randint(0, 150_000, (PROMPT_TOKENS,), device="cuda"),
        text_indexes=torch.arange(PROMPT_TOKENS, device="cuda"),
        position_ids=torch.cat([text_positions, gen_positions], dim=1).cuda(),
        und_len=PROMPT_TOKENS, sequence_length=PROMPT_TOKENS + tokens, vision_tokens=[latents],
        vision_token_shapes=[grid], vision_sequence_indexes=torch.arange(PROMPT_TOKENS, PROMPT_TOKENS + tokens,
                                                                         device="cuda"),
        vision_mse_loss_indexes=torch.arange(PROMPT_TOKENS, PROMPT_TOKENS + tokens, device="cuda"),
        vision_timesteps=torch.full((tokens,), 500.0, device="cuda"),
        vision_noisy_frame_indexes=[torch.arange(grid[0], device="cuda")], return_dict=False,
    )  # fmt: skip
    captured = []
    original = transformer_cosmos3.dispatch_attention_fn

    def recording(query, key, value, *a, is_causal=False, **kw):
        if is_causal:
            captured.append((key[0].clone(), value[0].clone()))
        return original(query, key, value, *a, is_causal=is_causal, **kw)

    with torch.no_grad(), mock.patch.object(transformer_cosmos3, "dispatch_attention_fn", recording):
        expected = reference(**inputs)[0][0]
    prompt_kv = PromptKV(keys=[k for k, _ in captured], values=[v for _, v in captured])
    patches = patchify(latents[0], 2)
    timesteps = torch.full((tokens,), 500.0, device="cuda")
    noisy = torch.ones(tokens, dtype=torch.bool, device="cuda")
    positions = gen_positions.cuda()
    batch = ours.pack(positions, [GeneratorSequence(tokens, prompt_kv)])  # once per batch membership
    with torch.no_grad():
        got = unpatchify(ours(patches, timesteps, noisy, batch)[0], latent[1:], 2)[None]
        t_ours = cuda_time(lambda: ours(patches, timesteps, noisy, batch))
        t_ref = cuda_time(lambda: reference(**inputs))
    flops = forward_flops(config, tokens)
    return {
        "gen_tokens": tokens,
        "ours_s": t_ours,
        "diffusers_s": t_ref,
        "speedup": t_ref / t_ours,
        "ours_tflops": flops / t_ours / 1e12,
        "fraction_of_peak": flops / t_ours / peak,
        "rel_diff": float((got.float() - expected.float()).norm() / expected.float().norm()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config

    torch.manual_seed(0)
    # vLLM's layers and parallel state read the current config; eager, with vLLM's fused kernels (norms, SiLU).
    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))):
        return run(args)


def run(args: argparse.Namespace) -> int:
    from diffusers import Cosmos3OmniTransformer

    from cosmos3_serve.model_executor.checkpoint.generator_config import is_generator_key
    from cosmos3_serve.model_executor.generator import Cosmos3GeneratorTower, GeneratorConfig

    init_vllm_single_process()
    config = GeneratorConfig.from_checkpoint(args.checkpoint)
    raw_config = json.loads((Path(args.checkpoint) / "transformer" / "config.json").read_text())
    raw_config = {k: v for k, v in raw_config.items() if not k.startswith("_")}
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        reference = Cosmos3OmniTransformer(**raw_config).eval()
        ours = Cosmos3GeneratorTower(config).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in reference.parameters():  # random weights with unit-scale activations
            p.normal_(0, 1.0 / max(p.shape[-1], 1) ** 0.5) if p.ndim > 1 else p.data.normal_(1.0, 0.05)
    ours.load_weights((k, v) for k, v in reference.state_dict().items() if is_generator_key(k))

    peak = matmul_peak_flops()
    results = {}
    for name in args.shapes.split(","):
        results[name] = measure(SHAPES[name], config, reference, ours, peak)
        torch.cuda.empty_cache()

    print(f"\ngenerator forward, Nano shape, bf16, {PROMPT_TOKENS} prompt tokens; matmul peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'shape':14}{'tokens':>8}{'diffusers s':>13}{'ours s':>10}{'speedup':>9}{'TFLOP/s':>9}{'of peak':>9}{'rel diff':>10}")
    for name, r in results.items():
        print(f"{name:14}{r['gen_tokens']:8d}{r['diffusers_s']:13.4f}{r['ours_s']:10.4f}{r['speedup']:9.2f}"
              f"{r['ours_tflops']:9.0f}{r['fraction_of_peak']:9.2f}{r['rel_diff']:10.4f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
