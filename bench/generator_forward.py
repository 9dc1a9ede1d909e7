"""Generator forward: our tower (vLLM layers, FA3 varlen, prompt K/V given) against diffusers' full
`Cosmos3OmniTransformer` forward on the same inputs and the same random weights, and against the kernel floor,
all in one run on one card.

    python bench/generator_forward.py CKPT [--shapes image720,image720x8,video480x93,video720x189]
        [--variants bf16,fp8,fp8-attention] [--json OUT]

CKPT is a configs-only checkpoint (`cosmos3-serve make-tiny CKPT --shape nano`); weights are random (bf16).
For each shape: median forward time of diffusers, of ours (eager, and as a CUDA graph for batches of up to
`GRAPH_MAX_TOKENS` tokens), achieved TFLOP/s and the fraction of the bf16 matmul peak measured in this run, the
relative difference of the velocities (ours vs diffusers, both bf16), the kernel floor and where our forward's GPU
time goes (profiler: GEMMs, attention, other kernels).

Variants (each its own tower, on the same random weights): `bf16`; `fp8`, the tower as `serve --precision fp8`
quantizes a 16-bit checkpoint at load (FP8 weights with per-tensor scales, dynamic per-tensor activation scales);
`fp8-attention`, that tower with `--generator-attention fp8`. For each: forward time against its own kernel floor
and against bf16, the velocities' difference from diffusers' bf16, weight memory and the forward's peak.

Kernel floor of a shape = layers x (the four GEMMs of a layer at its token count + FA3 varlen attention over its
packed layout), each timed alone on random operands of the real shapes: what the forward would cost if nothing
but those kernels ran, back to back. FP8 GEMMs are the faster of `torch._scaled_mm` and vLLM's CUTLASS kernel on
e4m3 operands (activations already quantized); FP8 attention is FA3's FP8 kernel on e4m3 inputs.
`image720x8` is eight 720p images in one packed forward; diffusers runs
them one at a time (8 x its single-image forward, timed in the same row).
diffusers recomputes the reasoner's prompt K/V inside every forward; ours takes them from the export, as in
serving (the prompt's K/V are captured from diffusers' own forward, so both attend to the same keys).

diffusers is timed at its best: in a process of its own without vLLM, alone on the card, before this process
touches the GPU (`--reference-only`), so that neither our tower's memory nor vLLM's settings change its time. The
allocator's retries (`num_alloc_retries`) of both processes are printed; `--also-in-process` times it in this
process too, for the comparison, as vLLM leaves PyTorch (cuDNN's attention kernel turned off at vLLM's import) and
with cuDNN's attention turned back on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

PROMPT_TOKENS = 300
SHAPES = {  # name: (frames, height, width, sequences packed in one forward)
    "image720": (1, 720, 1280, 1),
    "image720x8": (1, 720, 1280, 8),
    "video480x93": (93, 480, 832, 1),
    "video720x189": (189, 720, 1280, 1),
}
KERNEL_CLASSES = (("attention", ("flash",)), ("gemm", ("gemm", "nvjet", "xmma", "cutlass")))  # first match wins


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


def kernel_floor(config, tokens: int, layout, fp8_gemms: bool = False, fp8_attention: bool = False) -> dict:
    """Layers x (qkv, o, gate_up and down GEMMs at `tokens` rows + FA3 varlen attention over `layout`), each kernel
    timed alone on random operands of the real shapes (seconds): bf16, or e4m3 where asked."""
    from cosmos3_serve.model_executor.varlen_attention import varlen_attention

    h, inter, heads, kv_heads, head_dim = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                                           config.num_key_value_heads, config.head_dim)  # fmt: skip
    gemms = {"qkv": (h, (heads + 2 * kv_heads) * head_dim), "o": (heads * head_dim, h), "gate_up": (h, 2 * inter),
             "down": (inter, h)}  # fmt: skip
    times = {}
    with torch.device("cuda"):
        for name, (k, n) in gemms.items():
            times[name] = fp8_gemm_time(tokens, k, n) if fp8_gemms else gemm_time(tokens, k, n)
        keys_total = layout.key_order.numel()
        q = torch.randn(tokens, heads, head_dim, dtype=torch.bfloat16)
        keys, values = (torch.randn(keys_total, kv_heads, head_dim, dtype=torch.bfloat16) for _ in range(2))
        times["attention"] = (fp8_attention_time(q, keys, values, layout) if fp8_attention else
                              cuda_time(lambda: varlen_attention(q, keys, values, layout), min_total_s=0.3))
    layer = sum(times.values())
    return {"floor_s": config.num_hidden_layers * layer, "per_layer_s": times,
            "gemm_s": config.num_hidden_layers * (layer - times["attention"]),
            "attention_s": config.num_hidden_layers * times["attention"]}  # fmt: skip


def gemm_time(m: int, k: int, n: int) -> float:
    """Seconds of one bf16 `[m, k] x [k, n]` GEMM as the tower's linear layers call it (`F.linear`)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    return cuda_time(lambda: F.linear(x, w), min_total_s=0.3)


def fp8_gemm_time(m: int, k: int, n: int) -> float:
    """Seconds of one e4m3 `[m, k] x [k, n]` GEMM with per-tensor scales and a bf16 output: the faster of
    PyTorch's `_scaled_mm` and vLLM's CUTLASS kernel."""
    from vllm import _custom_ops as ops

    x = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    w_t = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t()  # column-major [k, n], as both kernels want
    one = torch.ones((), device="cuda")
    candidates = [lambda: torch._scaled_mm(x, w_t, one, one, out_dtype=torch.bfloat16)]
    if hasattr(ops, "cutlass_scaled_mm"):
        candidates.append(lambda: ops.cutlass_scaled_mm(x, w_t, one.view(1, 1), one.view(1, 1), torch.bfloat16))
    return min(cuda_time(fn, min_total_s=0.3) for fn in candidates)


def fp8_attention_time(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout) -> float:
    """Seconds of FA3's FP8 varlen kernel alone on e4m3 inputs (their quantization not included)."""
    from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, keys, values))
    descale = torch.ones(layout.cu_seqlens_q.shape[0] - 1, keys.shape[1], device="cuda")
    return cuda_time(lambda: flash_attn_varlen_func(
        q8, k8, v8, max_seqlen_q=layout.max_seqlen_q, cu_seqlens_q=layout.cu_seqlens_q,
        max_seqlen_k=layout.max_seqlen_k, cu_seqlens_k=layout.cu_seqlens_k, causal=False, fa_version=3,
        q_descale=descale, k_descale=descale, v_descale=descale), min_total_s=0.3)  # fmt: skip


def kernel_class(name: str) -> str:
    lowered = name.lower()
    return next((label for label, needles in KERNEL_CLASSES if any(n in lowered for n in needles)), "other")


def gpu_time_split(fn) -> dict:
    """GPU time of one call of `fn` by kernel class (ms), kernel count and the top kernels, from PyTorch's
    profiler (the call runs once more first, outside the trace)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        trace.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    kernels = [(e["name"], e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    split: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for name, duration_us in kernels:
        split[kernel_class(name)] = split.get(kernel_class(name), 0.0) + duration_us / 1e3
        by_name[name] = by_name.get(name, 0.0) + duration_us / 1e3
    top = sorted(by_name.items(), key=lambda item: -item[1])[:8]
    return {"class_ms": split, "busy_ms": sum(split.values()), "kernels": len(kernels),
            "top_kernels_ms": [{"name": name[:100], "ms": ms} for name, ms in top]}  # fmt: skip


def reference_inputs(shape: tuple[int, int, int, int], config) -> tuple[dict, tuple, tuple, torch.Tensor]:
    """diffusers' forward arguments for one sequence of `shape` (random latents, `PROMPT_TOKENS` random prompt
    tokens): (inputs, latent shape, token grid, generator positions)."""
    from cosmos3_serve.model_executor.positions import vision_positions

    frames, height, width, _ = shape
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
    return inputs, latent, grid, gen_positions


def time_reference(shape: tuple[int, int, int, int], config, reference) -> dict:
    """diffusers' forward time of `shape` (its sequences one at a time) and the allocator's retries meanwhile."""
    inputs = reference_inputs(shape, config)[0]
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    with torch.no_grad():
        seconds = shape[3] * cuda_time(lambda: reference(**inputs))
    return {"diffusers_s": seconds, "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries}


VARIANTS = {"bf16": ("bf16", "bf16"), "fp8": ("fp8", "bf16"), "fp8-attention": ("fp8", "fp8")}  # (GEMMs, attn)


def measure(shape: tuple[int, int, int, int], config, reference, towers: dict, variants: list[str], peak: float,
            clean: dict, also_in_process: bool) -> dict:  # fmt: skip
    """One (frames, height, width, sequences) shape: diffusers (its time `clean` from the clean process, and from
    this one with `also_in_process`), then each variant of ours (`towers`: by GEMM precision)."""
    from diffusers.models.transformers import transformer_cosmos3

    from cosmos3_serve.model_executor.generator import GeneratorSequence
    from cosmos3_serve.model_executor.kv_export import PromptKV

    copies = shape[3]
    inputs, latent, grid, gen_positions = reference_inputs(shape, config)
    latents = inputs["vision_tokens"][0]
    tokens = grid[0] * grid[1] * grid[2]
    captured = []
    original = transformer_cosmos3.dispatch_attention_fn

    def recording(query, key, value, *a, is_causal=False, **kw):
        if is_causal:
            captured.append((key[0].clone(), value[0].clone()))
        return original(query, key, value, *a, is_causal=is_causal, **kw)

    with torch.no_grad(), mock.patch.object(transformer_cosmos3, "dispatch_attention_fn", recording):
        expected = reference(**inputs)[0][0]
    prompt_kv = PromptKV.from_layers([k for k, _ in captured], [v for _, v in captured])
    result = {"gen_tokens": tokens * copies, "sequences": copies, "diffusers_s": clean["diffusers_s"],
              "diffusers_alloc_retries": clean["alloc_retries"], "variants": {}}  # fmt: skip
    if also_in_process:
        shared = time_reference(shape, config, reference)
        result.update(diffusers_in_process_s=shared["diffusers_s"], in_process_alloc_retries=shared["alloc_retries"])
        # vLLM's CUDA platform turns PyTorch's cuDNN attention off at import; diffusers' native attention uses it
        torch.backends.cuda.enable_cudnn_sdp(True)
        try:
            result["diffusers_in_process_cudnn_sdp_s"] = time_reference(shape, config, reference)["diffusers_s"]
        finally:
            torch.backends.cuda.enable_cudnn_sdp(False)
    flops = forward_flops(config, tokens) * copies
    sequences = [GeneratorSequence(tokens, prompt_kv)] * copies
    for name in variants:
        gemms, attention = VARIANTS[name]
        tower = towers[gemms]
        tower.set_attention_precision(attention)
        row = measure_variant(tower, latents, latent, gen_positions, sequences, expected, config)
        row.update(kernel_floor(config, tokens * copies, row.pop("layout"), fp8_gemms=gemms == "fp8",
                                fp8_attention=attention == "fp8"))  # fmt: skip
        best = min(row["ours_s"], row.get("graphed_s", float("inf")))
        row.update(best_s=best, speedup=result["diffusers_s"] / best, ours_tflops=flops / best / 1e12,
                   fraction_of_peak=flops / best / peak, of_floor=best / row["floor_s"])  # fmt: skip
        result["variants"][name] = row
        torch.cuda.empty_cache()
    return result


def measure_variant(ours, latents: torch.Tensor, latent: tuple, gen_positions: torch.Tensor, sequences: list,
                    expected: torch.Tensor, config) -> dict:  # fmt: skip
    """Our tower on the packed `sequences`: eager and graphed time, GPU time split, velocities vs diffusers' bf16
    (`expected`), weight bytes and the forward's peak memory beyond what was allocated before it."""
    from cosmos3_serve.model_executor.generator import GRAPH_MAX_TOKENS, CapturedForward
    from cosmos3_serve.model_executor.positions import patchify, unpatchify

    copies, tokens = len(sequences), sequences[0].num_tokens
    total = tokens * copies
    patches = patchify(latents[0], 2).repeat(copies, 1)
    timesteps = torch.full((total,), 500.0, device="cuda")
    noisy = torch.ones(total, dtype=torch.bool, device="cuda")
    positions = gen_positions.cuda().repeat(1, copies)
    batch = ours.pack(positions, sequences)  # once per batch membership
    row = {"layout": batch.attention, "weights_gib": sum(t.numel() * t.element_size() for t in
                                                         [*ours.parameters(), *ours.buffers()]) / 2**30}  # fmt: skip
    with torch.no_grad():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        got = ours(patches, timesteps, noisy, batch)[0][:tokens]
        torch.cuda.synchronize()
        row["forward_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        row["rel_diff"] = _rel_diff(unpatchify(got, latent[1:], 2)[None], expected)
        row["ours_s"] = cuda_time(lambda: ours(patches, timesteps, noisy, batch))
        row["profile"] = gpu_time_split(lambda: ours(patches, timesteps, noisy, batch))
        if total <= GRAPH_MAX_TOKENS:
            try:
                graphed = CapturedForward(ours, batch, patches, timesteps, noisy)
            except RuntimeError as error:  # report it; the other measurements stand
                row["graph_error"] = str(error)[:500]
            else:
                eager = ours(patches, timesteps, noisy, batch)[0]
                row["graph_vs_eager_rel_diff"] = _rel_diff(graphed(patches, timesteps, noisy)[0], eager)
                row["graphed_s"] = cuda_time(lambda: graphed(patches, timesteps, noisy))
                row["graphed_profile"] = gpu_time_split(lambda: graphed(patches, timesteps, noisy))
                del graphed
    return row


def _rel_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--variants", default="bf16,fp8,fp8-attention", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--json", default=None)
    parser.add_argument("--reference-only", action="store_true",
                        help="time diffusers alone in this process and write its times to --json")
    parser.add_argument("--also-in-process", action="store_true",
                        help="time diffusers beside our tower too (the clean process's time stays the reported one)")
    args = parser.parse_args()
    if args.reference_only:
        return run_reference(args)

    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config

    torch.manual_seed(0)
    # vLLM's layers and parallel state read the current config; eager, with vLLM's fused kernels (SiLU).
    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))):
        return run(args)


def build_reference(checkpoint: str):
    """diffusers' `Cosmos3OmniTransformer` of `checkpoint`'s config on the GPU, bf16, random weights with
    unit-scale activations."""
    from diffusers import Cosmos3OmniTransformer

    raw_config = json.loads((Path(checkpoint) / "transformer" / "config.json").read_text())
    raw_config = {k: v for k, v in raw_config.items() if not k.startswith("_")}
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        reference = Cosmos3OmniTransformer(**raw_config).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 1.0 / max(p.shape[-1], 1) ** 0.5) if p.ndim > 1 else p.data.normal_(1.0, 0.05)
    return reference


def run_reference(args: argparse.Namespace) -> int:
    """The clean process: diffusers alone on the card (no vLLM imported), each shape timed, the times written to
    `args.json`."""
    from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig

    config = GeneratorConfig.from_checkpoint(args.checkpoint)
    reference = build_reference(args.checkpoint)
    times = {}
    for name in args.shapes.split(","):
        times[name] = time_reference(SHAPES[name], config, reference)
        torch.cuda.empty_cache()
        Path(args.json).write_text(json.dumps(times))
    return 0


def clean_reference_times(args: argparse.Namespace) -> dict:
    """diffusers' times from a process of its own (this one has not touched the GPU yet)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "reference.json"
        subprocess.run([sys.executable, __file__, args.checkpoint, "--reference-only", "--shapes", args.shapes,
                        "--json", str(out)], check=True)  # fmt: skip
        return json.loads(out.read_text())


def engine_config(checkpoint: str, precision: str):
    """The vLLM config that `serve CKPT --precision PRECISION --load-format dummy` gives its workers."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from cosmos3_serve.quant.precision import precision_engine_args

    load_general_plugins()
    return EngineArgs(model=checkpoint, load_format="dummy", max_model_len=4096,
                      **precision_engine_args(precision, Path(checkpoint))).create_engine_config()  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from cosmos3_serve.model_executor.checkpoint.generator_config import is_generator_key
    from cosmos3_serve.model_executor.generator import GeneratorConfig
    from cosmos3_serve.model_executor.tower_loading import load_tower

    variants = args.variants.split(",")
    clean = clean_reference_times(args)
    init_vllm_single_process()
    config = GeneratorConfig.from_checkpoint(args.checkpoint)
    reference = build_reference(args.checkpoint)
    towers = {}
    for gemms in dict.fromkeys(VARIANTS[name][0] for name in variants):  # the same weights, built as serving builds
        weights = ((k, v) for k, v in reference.state_dict().items() if is_generator_key(k))
        towers[gemms] = load_tower(args.checkpoint, engine_config(args.checkpoint, gemms), torch.device("cuda"),
                                   weights=weights).eval()  # fmt: skip

    peak = matmul_peak_flops()
    report = {"device": torch.cuda.get_device_name(), "peak_flops": peak, "results": {}}
    for name in args.shapes.split(","):
        report["results"][name] = measure(SHAPES[name], config, reference, towers, variants, peak, clean[name],
                                          args.also_in_process)  # fmt: skip
        torch.cuda.empty_cache()
        if args.json:  # after every shape: a later shape running out of memory keeps the earlier ones
            Path(args.json).write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    results = report["results"]
    print(f"\ngenerator forward, Nano shape, {PROMPT_TOKENS} prompt tokens per sequence, {report['device']}; "
          f"bf16 matmul peak {report['peak_flops'] / 1e12:.0f} TFLOP/s; seconds per forward; speedup: diffusers "
          "bf16 / ours; rel diff: velocities vs diffusers bf16")  # fmt: skip
    print(f"{'shape':14}{'variant':>14}{'tokens':>8}{'diffusers':>11}{'ours':>9}{'graphed':>9}{'floor':>9}"
          f"{'of floor':>9}{'vs bf16':>8}{'speedup':>9}{'TFLOP/s':>9}{'rel diff':>9}{'weights':>9}{'peak':>7}")
    for name, r in results.items():
        bf16 = r["variants"].get("bf16")
        for variant, v in r["variants"].items():
            graphed = f"{v['graphed_s']:9.4f}" if "graphed_s" in v else f"{'-':>9}"
            versus = f"{bf16['best_s'] / v['best_s']:8.2f}" if bf16 else f"{'-':>8}"
            print(f"{name:14}{variant:>14}{r['gen_tokens']:8d}{r['diffusers_s']:11.4f}{v['ours_s']:9.4f}{graphed}"
                  f"{v['floor_s']:9.4f}{v['of_floor']:9.2f}{versus}{v['speedup']:9.2f}{v['ours_tflops']:9.0f}"
                  f"{v['rel_diff']:9.4f}{v['weights_gib']:9.2f}{v['forward_peak_gib']:7.2f}")  # fmt: skip
    print("\nkernel floor (GEMMs + attention) and our eager forward's GPU time, ms per forward")
    print(f"{'shape':14}{'variant':>14}{'floor gemm':>11}{'floor attn':>11}{'gemm':>9}{'attn':>9}{'other':>9}"
          f"{'busy':>9}{'wall':>9}{'kernels':>8}")  # fmt: skip
    for name, r in results.items():
        for variant, v in r["variants"].items():
            split = v["profile"]["class_ms"]
            print(f"{name:14}{variant:>14}{v['gemm_s'] * 1e3:11.1f}{v['attention_s'] * 1e3:11.1f}"
                  f"{split.get('gemm', 0):9.1f}{split.get('attention', 0):9.1f}{split.get('other', 0):9.1f}"
                  f"{v['profile']['busy_ms']:9.1f}{v['ours_s'] * 1e3:9.1f}{v['profile']['kernels']:8d}")  # fmt: skip
    print("\ndiffusers' forward, s: alone in its own process (reported above), beside our towers (vLLM imported: "
          "cuDNN attention off), and beside them with cuDNN attention back on; allocator retries")
    for name, r in results.items():
        shared = (f"{r['diffusers_in_process_s']:9.4f}{r['in_process_alloc_retries']:9d}"
                  f"{r['diffusers_in_process_cudnn_sdp_s']:9.4f}") if (
            "diffusers_in_process_s" in r) else f"{'-':>9}{'-':>9}{'-':>9}"
        print(f"{name:14}{r['diffusers_s']:9.4f}{r['diffusers_alloc_retries']:9d}{shared}")
    if "image720" in results and "image720x8" in results:
        for variant, batch in results["image720x8"]["variants"].items():
            single = results["image720"]["variants"][variant]
            print(f"8 images batched, {variant}: {batch['best_s'] / 8 * 1e3:.1f} ms per image vs the single-image "
                  f"floor {single['floor_s'] * 1e3:.1f} ms ({batch['best_s'] / 8 / single['floor_s']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
