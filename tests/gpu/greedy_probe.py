"""Greedy tokens of the tiny checkpoint from one vLLM engine (CUDA graphs, bf16) in a process of its own, and their
comparison: how the GPU tests show that a kernel swap leaves the reasoner's answers unchanged.

A test module runs `run_probe(module, ...)` for each variant; `module`'s `main()` patches the reasoner for its
variant, builds `probe_engine(checkpoint)` and writes `greedy_outputs(llm)` (plus what it counts) to a JSON file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

PROMPTS = ("A robot arm picks up a red cube.", "Describe the scene:", "The weather today is", "Once upon a time")
MAX_TOKENS, TOP_LOGPROBS = 24, 5
# Where two engines' greedy tokens part, the reference engine's logprobs of both tokens must be this close: a tie
# that bf16 rounding may break either way (random tiny weights). Before it, same top-1 logprob within LOGPROB_ATOL.
TIE_LOGPROB = 0.05
LOGPROB_ATOL = 0.1


def run_probe(module: str, checkpoint: Path, variant: str, tmp_path: Path) -> dict:
    """`python -m module CHECKPOINT VARIANT OUT.json` with the engine in that process and no compile cache (vLLM
    would load the other variant's compiled graph: same config and sources); its JSON."""
    out = tmp_path / f"{variant}.json"
    torch.cuda.empty_cache()  # this process's cached blocks: the probe's engine sizes itself from free memory
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_DISABLE_COMPILE_CACHE": "1"}
    subprocess.run([sys.executable, "-m", module, str(checkpoint), variant, str(out)], env=env,
                   cwd=Path(__file__).parents[2], check=True, timeout=1200)  # fmt: skip
    return json.loads(out.read_text())


def probe_engine(checkpoint: str):
    from vllm import LLM

    return LLM(checkpoint, dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.2, seed=0,
               max_num_seqs=len(PROMPTS), limit_mm_per_prompt={"image": 1, "video": 1})  # fmt: skip


def greedy_outputs(llm) -> dict[str, list[dict]]:
    """Tokens and top logprobs of `PROMPTS`, one request at a time (M = 1 decode) and all at once."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)

    def greedy(outputs) -> list[dict]:
        return [{"tokens": list(o.outputs[0].token_ids),
                 "logprobs": [{str(t): e.logprob for t, e in step.items()} for step in o.outputs[0].logprobs]}
                for o in outputs]  # fmt: skip

    return {"one_at_a_time": [greedy(llm.generate([prompt], params, use_tqdm=False))[0] for prompt in PROMPTS],
            "batched": greedy(llm.generate(list(PROMPTS), params, use_tqdm=False))}  # fmt: skip


def assert_same_greedy_up_to_ties(ours: dict, reference: dict) -> None:
    """Both probes' `greedy_outputs` agree, request by request, up to the first near-tie of the reference."""
    for mode in ("one_at_a_time", "batched"):
        for our_output, expected_output in zip(ours[mode], reference[mode], strict=True):
            _assert_same_sequence(our_output, expected_output)


def _assert_same_sequence(ours: dict, reference: dict) -> None:
    for step, (token, expected) in enumerate(zip(ours["tokens"], reference["tokens"])):
        top = {int(t): lp for t, lp in reference["logprobs"][step].items()}
        if token != expected:  # only where the reference had a near-tie, and then the sequences part
            assert token in top and top[expected] - top[token] <= TIE_LOGPROB, (step, token, expected, top)
            return
        assert abs(ours["logprobs"][step][str(token)] - top[token]) <= LOGPROB_ATOL, (step, token)
