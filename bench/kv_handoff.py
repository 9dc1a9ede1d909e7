"""Reasoner K/V handoff per generation request against one denoising step, on one vLLM engine with the
generator in its worker (as the server runs it), in one run.

    python bench/kv_handoff.py CKPT [--size 1280x720] [--requests 5] [--json OUT]

CKPT is a configs-only checkpoint (`cosmos3-serve make-tiny CKPT --shape nano`); vLLM's dummy weights, bf16, eager
reasoner. The request: text->image (`--size`), guidance 6, so two prompts (conditional, unconditional). Its
handoff is what hands its prompts' K/V from the reasoner to the generator:

- export: the K/V connector copies each prompt's blocks out of every layer's paged cache into the store
  (`Cosmos3KVExportConnector.wait_for_save`): the connector's own readers timed inside the worker, GPU
  synchronised, at the request's prompt lengths. Cross-check: the same prompts' prefill with and without export
  (fresh random tokens of the same lengths, one prompt at a time).
- admit: the `cosmos3_admit` call (K/V out of the store, initial latents, positions, scheduler), wall time from
  the driver through the engine's RPC.

One denoising step: `cosmos3_step` with that request alone, wall time from the driver, median of the steps after
the first (the first also builds the batch's rotary tables and attention layout: reported as `first_step_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with the probe below

PROMPT = "A robot arm picks up a red cube from a wooden table and places it in a blue bowl."
STEPS = 8


def time_export(worker, prompt_lengths: list[int], repeats: int = 20) -> float:
    """Seconds (median) to read prompts of `prompt_lengths` tokens out of every layer's paged cache, as the
    connector's export does (any blocks: the copy does not depend on what they hold)."""
    import torch
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    block_size = connector._block_size

    def export() -> None:
        for tokens in prompt_lengths:
            index = connector._readers[0].block_index(list(range(1, -(-tokens // block_size) + 1)))
            [reader.read(index, tokens) for reader in connector._readers]

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    export()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        export()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefill_seconds(llm, prompts: list[list[int]], export: bool) -> float:
    """Wall time of prefilling `prompts` one at a time, as generation contexts (exported) or plain requests."""
    from vllm import SamplingParams

    from cosmos3_serve.model_executor import kv_export
    from cosmos3_serve.model_executor.generation_client import new_export_keys

    total = 0.0
    for ids, key in zip(prompts, new_export_keys(len(prompts))):
        extra = kv_export.generation_context_args(key) if export else None
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, extra_args=extra), use_tqdm=False)
        total += time.perf_counter() - start
        if export:
            llm.collective_rpc("cosmos3_forget_exports", args=([key],))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of the text->image request")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    from cosmos3_serve.model_executor import kv_export
    from cosmos3_serve.model_executor.generation import GenerationRequest
    from cosmos3_serve.model_executor.generation_client import Cosmos3Generator, new_export_keys
    from cosmos3_serve.model_executor.worker_extension import generation_engine_args, request_to_payload

    llm = LLM(args.checkpoint, load_format="dummy", dtype="bfloat16", enforce_eager=True, max_model_len=4096,
              gpu_memory_utilization=args.gpu_memory_utilization, limit_mm_per_prompt={"image": 0, "video": 0},
              seed=0, **generation_engine_args())  # fmt: skip
    generator = Cosmos3Generator(args.checkpoint, llm)
    width, height = (int(side) for side in args.size.split("x"))
    request = GenerationRequest(PROMPT, num_frames=1, height=height, width=width, num_inference_steps=STEPS)
    prompts = generator.prompts.context(request)
    lengths = [len(ids) for ids in prompts]

    admits, first_steps, steps = [], [], []
    for i in range(args.requests + 1):  # the first is a warm-up
        keys = new_export_keys(len(prompts))
        params = [SamplingParams(max_tokens=1, extra_args=kv_export.generation_context_args(key)) for key in keys]
        llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        start = time.perf_counter()
        llm.collective_rpc("cosmos3_admit", args=([(f"r{i}", request_to_payload(request), keys)],))
        admitted = time.perf_counter()
        step_times = []
        for _ in range(STEPS):
            begin = time.perf_counter()
            llm.collective_rpc("cosmos3_step")
            step_times.append(time.perf_counter() - begin)
        llm.collective_rpc("cosmos3_take", args=([f"r{i}"], False))
        if i:
            admits.append(admitted - start)
            first_steps.append(step_times[0])
            steps += step_times[1:]

    [export_s] = llm.collective_rpc(time_export, args=(lengths,))[:1]
    rng, vocab = np.random.default_rng(0), min(llm.llm_engine.model_config.get_vocab_size(), 100_000)
    fresh = [[rng.integers(0, vocab, n).tolist() for n in lengths] for _ in range(args.requests)]
    prefill_s = [prefill_seconds(llm, ids, export=False) for ids in fresh]
    fresh = [[rng.integers(0, vocab, n).tolist() for n in lengths] for _ in range(args.requests)]
    prefill_export_s = [prefill_seconds(llm, ids, export=True) for ids in fresh]

    admit_s, step_s = statistics.median(admits), statistics.median(steps)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "request": f"text2image {width}x{height}, guidance 6 (2 prompts)",
        "prompt_tokens": lengths,
        "export_s": export_s,
        "export_by_difference_s": statistics.median(prefill_export_s) - statistics.median(prefill_s),
        "prefill_s": statistics.median(prefill_s),
        "admit_s": admit_s,
        "handoff_s": export_s + admit_s,
        "step_s": step_s,
        "first_step_s": statistics.median(first_steps),
        "handoff_of_step": (export_s + admit_s) / step_s,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nK/V handoff per request, {result['request']}, prompts of {lengths} tokens, {result['device']}")
    for key in ("export_s", "export_by_difference_s", "admit_s", "handoff_s", "step_s", "first_step_s", "prefill_s"):
        print(f"  {key:24}{result[key] * 1e3:10.2f} ms")
    print(f"  {'handoff / step':24}{result['handoff_of_step']:10.3f}   (goal <= 0.02)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
