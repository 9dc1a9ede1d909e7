"""`--generator-parallel` on the GPUs of one host (NCCL, bf16), against the same requests on one GPU in the same
processes (`tests.generator_parallel_probe`): on two GPUs CFG branches on different GPUs (cfg=2), Ulysses over
both (sp=2) and the default tower shards; on four also cfg=2,sp=2 (whole towers) and cfg=2 with the tower in two
shards per group. The tiny checkpoint's two key / value heads leave Ulysses inside sharded towers to the CPU test
(`tests/test_generator_parallel.py`, four heads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor.request import GenerationRequest
from tests.generator_parallel_probe import run_probe
from tests.test_actions import action_request

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]  # fmt: skip

REL_TOL = 2e-2  # ||split - one GPU|| / ||one GPU||: bf16 sums in other shapes and orders over 3 steps
PROMPT, NEGATIVE = "A robot arm picks up a red cube.", "blurry, low quality"
WORLD = 4 if torch.cuda.device_count() >= 4 else 2
DEGREES = ("cfg=2", "sp=2", "tp") if WORLD == 2 else ("cfg=2,sp=2", "cfg=2", "tp")


@pytest.fixture(scope="module")
def runs(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    requests = {
        "image-cfg": GenerationRequest(PROMPT, NEGATIVE, height=64, width=96, num_inference_steps=3, seed=1),
        "video": GenerationRequest(PROMPT, None, num_frames=9, height=64, width=96, num_inference_steps=3, seed=2,
                                   guidance_scale=1.0),  # fmt: skip
        "policy": action_request("policy", steps=3, seed=3),
    }
    result = run_probe(tiny_checkpoint, requests, WORLD, "cuda", list(DEGREES), tmp_path_factory.mktemp("gpus"))
    return {**result, "requests": requests}


def _close(got: torch.Tensor | None, expected: torch.Tensor | None) -> bool:
    if got is None or expected is None:
        return got is None and expected is None
    return float((got.float() - expected.float()).norm() / expected.float().norm()) <= REL_TOL


@pytest.mark.parametrize("degrees", DEGREES)
def test_gpus_equal_one(degrees: str, runs) -> None:
    ranks, one = runs["ranks"][degrees], runs["one"]
    assert all(rank["errors"] == {} for rank in ranks)
    for rank in ranks:
        for request_id, (video, actions) in rank["finished"].items():
            assert _close(video, one[request_id][0]) and _close(actions, one[request_id][1]), request_id
    collected = [set(rank["collected"]) for rank in ranks]
    assert set().union(*collected) == set(runs["requests"]) and sum(map(len, collected)) == len(runs["requests"])
