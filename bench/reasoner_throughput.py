"""Reasoner throughput: our vLLM plugin against stock vLLM's `Cosmos3ForConditionalGeneration`, same run, same card.

    python bench/reasoner_throughput.py CKPT [--num-requests 256 --input-len 512 --output-len 256] [--json OUT]
        [--decode-only] [--profile] [--[no-]async-scheduling] [--attention-splits N]

CKPT is a configs-only checkpoint (`cosmos3-serve make-tiny CKPT --shape nano`): weights are vLLM's dummy
weights, so the numbers are about kernels and scheduling, not accuracy. Each implementation runs in its own
process: ours with our plugin (entry point `vllm.general_plugins`), stock with the plugin excluded through
vLLM's `VLLM_PLUGINS` allow-list. Measured per implementation:

- throughput: `--num-requests` requests of `--input-len` random tokens, `--output-len` tokens each, ignore EOS;
- batch-1 decode: one request, (time for `output_len` tokens - time for 1 token) / (output_len - 1), and, as a
  cross-check, vLLM's own time per output token of the same requests (engine-core timestamps of the first and
  last token);
- the HBM roofline of batch-1 decode: bytes of the language-model weights read per token (everything but the
  embedding table, of which one row is read) over the device-to-device copy bandwidth measured in the same run
  (each process measures it; the higher of the two, since noise only lowers it);
- with `--profile`: the GPU kernels of `PROFILE_STEPS` batch-1 decode steps (PyTorch profiler in the engine
  process), per step: GPU busy time split into GEMV, attention, K/V-cache writes and other kernels, and the time
  the GPU sits idle between kernels.

`--decode-only` skips the throughput run. Async scheduling is vLLM's default unless `--[no-]async-scheduling`.
`--attention-splits N` caps FlashAttention's KV splits under CUDA graphs (both implementations): 1 has no
split-combine kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STOCK_PLUGINS = "lora_filesystem_resolver"  # any allow-list without ours loads no cosmos3-serve code
PROFILE_STEPS = 64
# First match wins: FlashAttention 3's kernels are CUTLASS kernels too; ours (`decode_attention`) also writes the
# K/V cache and normalizes q / k.
KERNEL_CLASSES = (
    ("kv_cache_write", ("reshape_and_cache",)),
    ("attention", ("flash", "fmha", "_decode_attention_kernel")),
    ("gemv", ("gemv", "gemm", "nvjet", "cutlass", "xmma", "splitk")),
)


def copy_bandwidth_bytes_per_s(num_bytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (median of `repeats`)."""
    import torch

    src = torch.randn(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[3:])
    return 2 * num_bytes / times[len(times) // 2]


def decode_weight_bytes(worker) -> int:
    """Bytes of language-model weights one decode step reads (the embedding table contributes one row only)."""
    model = worker.model_runner.get_model()
    total = 0
    for name, param in model.named_parameters():
        if name.startswith("visual.") or "embed_tokens" in name:
            continue
        total += param.numel() * param.element_size()
    return total


def start_kernel_trace(worker) -> None:
    import torch

    worker.bench_kernel_trace = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    worker.bench_kernel_trace.start()


def stop_kernel_trace(worker) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of the GPU kernels, copies and memsets since `start_kernel_trace`, by start."""
    import tempfile

    trace = worker.bench_kernel_trace
    del worker.bench_kernel_trace
    trace.stop()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        trace.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    gpu = [(e["name"], e["ts"], e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(gpu, key=lambda event: event[1])


def kernel_class(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith(("memcpy", "memset")):
        return "memcpy_memset"
    for label, needles in KERNEL_CLASSES:
        if any(needle in lowered for needle in needles):
            return label
    return "other"


def decode_step_profile(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """Per decode step (ms): GPU busy time by kernel class, idle time between kernels, and the top kernels."""
    busy = 0.0
    covered_to = kernels[0][1]
    for _, start, duration in kernels:  # union of the intervals: copies on other streams may overlap kernels
        busy += max(0.0, start + duration - max(start, covered_to))
        covered_to = max(covered_to, start + duration)
    window = covered_to - kernels[0][1]
    per_class: dict[str, float] = {}
    per_name: dict[str, list[float]] = {}
    for name, _, duration in kernels:
        per_class[kernel_class(name)] = per_class.get(kernel_class(name), 0.0) + duration
        per_name.setdefault(name, []).append(duration)
    top = sorted(per_name.items(), key=lambda item: -sum(item[1]))[:15]
    top_kernels = [
        {"name": name[:120], "class": kernel_class(name), "per_step": len(durations) / steps,
         "mean_us": sum(durations) / len(durations)}
        for name, durations in top
    ]  # fmt: skip
    return {
        "steps": steps,
        "window_ms": window / steps / 1e3,
        "busy_ms": busy / steps / 1e3,
        "idle_ms": (window - busy) / steps / 1e3,
        "kernels_per_step": len(kernels) / steps,
        "class_ms": {label: total / steps / 1e3 for label, total in sorted(per_class.items())},
        "top_kernels": top_kernels,
    }


def run_one(args: argparse.Namespace) -> dict:
    import numpy as np
    from vllm import LLM, SamplingParams

    llm = LLM(
        args.checkpoint,
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=args.input_len + args.output_len + 16,
        gpu_memory_utilization=0.85,
        limit_mm_per_prompt={"image": 0, "video": 0},
        async_scheduling=args.async_scheduling,
        disable_log_stats=False,  # per-request metrics: vLLM's own time per output token
        seed=0,
        **({} if args.attention_splits is None else
           {"attention_config": {"flash_attn_max_num_splits_for_cuda_graph": args.attention_splits}}),
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, min(vocab, 150_000), args.input_len).tolist()}
               for _ in range(args.num_requests)]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm up; also puts the decode prompts in the prefix cache
    result = {}

    if not args.decode_only:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        result.update(throughput_output_tok_s=output_tokens / elapsed, elapsed_s=elapsed)

    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    decode_times, tpots = [], []
    for prompt in prompts[:5]:
        t0 = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        t1 = time.perf_counter()
        [output] = llm.generate([prompt], params, use_tqdm=False)
        t2 = time.perf_counter()
        decode_times.append(((t2 - t1) - (t1 - t0)) / (args.output_len - 1))
        stats = output.metrics
        tpots.append((stats.last_token_ts - stats.first_token_ts) / (stats.num_generation_tokens - 1))
    decode_s = sorted(decode_times)[len(decode_times) // 2]
    tpot_s = sorted(tpots)[len(tpots) // 2]

    if args.profile:
        steps = SamplingParams(temperature=0.0, max_tokens=PROFILE_STEPS, ignore_eos=True)
        llm.collective_rpc(start_kernel_trace)
        start = time.perf_counter()
        llm.generate([prompts[0]], steps, use_tqdm=False)
        profiled_wall = time.perf_counter() - start
        [kernels] = llm.collective_rpc(stop_kernel_trace)
        result["decode_profile"] = decode_step_profile(kernels, PROFILE_STEPS)
        result["decode_profile"]["wall_ms"] = profiled_wall / PROFILE_STEPS * 1e3

    [weight_bytes] = llm.collective_rpc(decode_weight_bytes)
    [model_class] = llm.collective_rpc(lambda worker: type(worker.model_runner.get_model()).__name__)
    bandwidth = copy_bandwidth_bytes_per_s()
    return result | {
        "model_class": model_class,
        "async_scheduling": llm.llm_engine.vllm_config.scheduler_config.async_scheduling,
        "batch1_decode_tok_s": 1.0 / decode_s,
        "batch1_tpot_ms": tpot_s * 1e3,
        "decode_weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_s": bandwidth,
        "roofline_decode_tok_s": bandwidth / weight_bytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="overlap scheduling with the forward (default: vLLM's default)")
    parser.add_argument("--decode-only", action="store_true", help="skip the throughput run")
    parser.add_argument("--profile", action="store_true", help="GPU time split of batch-1 decode steps")
    parser.add_argument("--attention-splits", type=int, default=None,
                        help="FlashAttention's most KV splits under CUDA graphs, both implementations (vLLM's "
                             "`attention_config.flash_attn_max_num_splits_for_cuda_graph`; default vLLM's, 32)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--impl", choices=["ours", "stock"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.impl is not None:  # child process: one implementation
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0

    results = {}
    for impl in ("stock", "ours"):
        env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # collective_rpc with our probe functions
        if impl == "stock":
            env["VLLM_PLUGINS"] = STOCK_PLUGINS
        else:
            env.pop("VLLM_PLUGINS", None)
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--impl", impl], env=env, capture_output=True, text=True
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            print(child.stdout[-3000:], child.stderr[-5000:], file=sys.stderr)
            return 1
        results[impl] = json.loads(lines[-1][len("RESULT ") :])
        if args.json:  # after each implementation, so a failing second one keeps the first
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "results": results}, fh, indent=2)

    ours, stock = results["ours"], results["stock"]
    workload = f"{args.num_requests} x ({args.input_len} in, {args.output_len} out)"
    if args.decode_only:
        workload = "batch-1 decode only"
    print(f"\nreasoner, {workload}, bf16, dummy weights, async scheduling {ours['async_scheduling']}")
    print(f"{'':28}{'stock vLLM':>14}{'cosmos3-serve':>16}{'ratio':>8}")
    rows = [("batch1_decode_tok_s", "batch-1 decode (tok/s)")]
    if not args.decode_only:
        rows.insert(0, ("throughput_output_tok_s", "throughput (out tok/s)"))
    for key, label in rows:
        print(f"{label:28}{stock[key]:14.1f}{ours[key]:16.1f}{ours[key] / stock[key]:8.3f}")
    print(f"{'vLLM TPOT (ms)':28}{stock['batch1_tpot_ms']:14.3f}{ours['batch1_tpot_ms']:16.3f}")
    bandwidth = max(stock["copy_bandwidth_bytes_s"], ours["copy_bandwidth_bytes_s"])
    roofline = bandwidth / ours["decode_weight_bytes"]
    print(f"{'HBM roofline (tok/s)':28}{roofline:30.1f}   (weights {ours['decode_weight_bytes'] / 1e9:.2f} GB, "
          f"copy {bandwidth / 1e12:.2f} TB/s, the higher of {stock['copy_bandwidth_bytes_s'] / 1e12:.2f} and "
          f"{ours['copy_bandwidth_bytes_s'] / 1e12:.2f})")
    print(f"{'batch-1 / roofline':28}{stock['batch1_decode_tok_s'] / roofline:14.3f}"
          f"{ours['batch1_decode_tok_s'] / roofline:16.3f}")
    print(f"model classes: stock {stock['model_class']}, ours {ours['model_class']}")
    if args.profile:
        print_profiles(stock, ours)
    return 0


def print_profiles(stock: dict, ours: dict) -> None:
    profiles = stock["decode_profile"], ours["decode_profile"]
    title = f"one decode step, ms (mean of {PROFILE_STEPS} profiled steps)"
    print(f"\n{title:56}{'stock vLLM':>14}{'cosmos3-serve':>16}")
    rows = [("wall_ms", "wall clock"), ("window_ms", "GPU window"), ("busy_ms", "GPU busy")]
    rows += [(label, f"  {label}") for label in sorted({label for p in profiles for label in p["class_ms"]})]
    rows += [("idle_ms", "GPU idle between kernels")]
    for key, label in rows:
        values = [p.get(key, p["class_ms"].get(key, 0.0)) for p in profiles]
        print(f"{label:56}{values[0]:14.3f}{values[1]:16.3f}")
    counts = [p["kernels_per_step"] for p in profiles]
    print(f"{'kernels per step':56}{counts[0]:14.1f}{counts[1]:16.1f}")
    gemv_tb_s = [result["decode_weight_bytes"] / (p["class_ms"]["gemv"] * 1e-3) / 1e12
                 for result, p in zip((stock, ours), profiles)]  # fmt: skip
    print(f"{'GEMV read bandwidth, TB/s (weights / GEMV time)':56}{gemv_tb_s[0]:14.2f}{gemv_tb_s[1]:16.2f}")
    print("\ntop kernels (cosmos3-serve): per step, mean us, class, name")
    for kernel in ours["decode_profile"]["top_kernels"]:
        print(f"  {kernel['per_step']:6.1f} {kernel['mean_us']:8.2f}  {kernel['class']:15} {kernel['name']}")


if __name__ == "__main__":
    sys.exit(main())
