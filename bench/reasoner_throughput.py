"""Reasoner throughput: our vLLM plugin against stock vLLM's `Cosmos3ForConditionalGeneration`, same run, same card.

    python bench/reasoner_throughput.py CKPT [--num-requests 256 --input-len 512 --output-len 256] [--json OUT]

CKPT is a configs-only checkpoint (`cosmos3-serve make-tiny CKPT --shape nano`): weights are vLLM's dummy
weights, so the numbers are about kernels and scheduling, not accuracy. Each implementation runs in its own
process: ours with our plugin (entry point `vllm.general_plugins`), stock with the plugin excluded through
vLLM's `VLLM_PLUGINS` allow-list. Measured per implementation:

- throughput: `--num-requests` requests of `--input-len` random tokens, `--output-len` tokens each, ignore EOS;
- batch-1 decode: one request, (time for `output_len` tokens - time for 1 token) / (output_len - 1);
- the HBM roofline of batch-1 decode: bytes of the language-model weights read per token (everything but the
  embedding table, of which one row is read) over the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STOCK_PLUGINS = "lora_filesystem_resolver"  # any allow-list without ours loads no cosmos3-serve code


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
        seed=0,
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, min(vocab, 150_000), args.input_len).tolist()}
               for _ in range(args.num_requests)]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm up

    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)

    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    decode_times = []
    for prompt in prompts[:5]:
        t0 = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        t2 = time.perf_counter()
        decode_times.append(((t2 - t1) - (t1 - t0)) / (args.output_len - 1))
    decode_s = sorted(decode_times)[len(decode_times) // 2]

    [weight_bytes] = llm.collective_rpc(decode_weight_bytes)
    [model_class] = llm.collective_rpc(lambda worker: type(worker.model_runner.get_model()).__name__)
    bandwidth = copy_bandwidth_bytes_per_s()
    return {
        "model_class": model_class,
        "throughput_output_tok_s": output_tokens / elapsed,
        "elapsed_s": elapsed,
        "batch1_decode_tok_s": 1.0 / decode_s,
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
    parser.add_argument("--async-scheduling", action="store_true", help="overlap scheduling with the forward")
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

    ours, stock = results["ours"], results["stock"]
    mode = ", async scheduling" if args.async_scheduling else ""
    print(f"\nreasoner, {args.num_requests} x ({args.input_len} in, {args.output_len} out), bf16, dummy weights{mode}")
    print(f"{'':28}{'stock vLLM':>14}{'cosmos3-serve':>16}{'ratio':>8}")
    for key, label in (("throughput_output_tok_s", "throughput (out tok/s)"),
                       ("batch1_decode_tok_s", "batch-1 decode (tok/s)")):  # fmt: skip
        print(f"{label:28}{stock[key]:14.1f}{ours[key]:16.1f}{ours[key] / stock[key]:8.3f}")
    roofline = ours["roofline_decode_tok_s"]
    print(f"{'HBM roofline (tok/s)':28}{roofline:30.1f}   "
          f"(weights {ours['decode_weight_bytes'] / 1e9:.2f} GB, copy {ours['copy_bandwidth_bytes_s'] / 1e12:.2f} TB/s)")
    print(f"{'batch-1 / roofline':28}{stock['batch1_decode_tok_s'] / roofline:14.3f}"
          f"{ours['batch1_decode_tok_s'] / roofline:16.3f}")
    print(f"model classes: stock {stock['model_class']}, ours {ours['model_class']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
