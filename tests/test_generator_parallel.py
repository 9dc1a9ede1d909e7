"""`--generator-parallel`: the generator's work split by sequence over two CPU ranks (gloo), CFG branches on
different ranks (cfg=2) or each sequence's tokens split by Ulysses (sp=2, token counts that do not divide by 2),
against the same requests on one rank. Each rank gets its tensor-parallel shard of the prompts' K/V, as vLLM's
workers export them, and gathers the heads once per request; finished requests' results are dealt to the ranks
in turn."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor.request import GenerationRequest
from tests.test_actions import action_request

ATOL = 1e-4  # float32: the same sums in other shapes and orders
PROMPT, NEGATIVE = "A robot arm picks up a red cube.", "blurry, low quality"


@pytest.fixture(scope="module")
def requests() -> dict[str, GenerationRequest]:
    return {
        "image-cfg": GenerationRequest(PROMPT, NEGATIVE, height=32, width=64, num_inference_steps=3, seed=1),
        "video": GenerationRequest(PROMPT, None, num_frames=9, height=32, width=96, num_inference_steps=3, seed=2,
                                   guidance_scale=1.0),  # fmt: skip
        "policy": action_request("policy", steps=3, seed=3),
    }


@pytest.fixture(scope="module")
def prompt_kv(tiny_checkpoint: Path, requests) -> dict[str, list[torch.Tensor]]:
    from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig

    config = GeneratorConfig.from_checkpoint(tiny_checkpoint)
    generator = torch.Generator().manual_seed(0)
    shape = (config.num_hidden_layers, 2)
    tail = (config.num_key_value_heads, config.head_dim)
    return {request_id: [torch.randn(*shape, 5 + 3 * i + b, *tail, generator=generator)
                         for b in range(2 if request.uses_cfg else 1)]
            for i, (request_id, request) in enumerate(requests.items())}  # fmt: skip


@pytest.fixture(scope="module")
def one_rank(tiny_checkpoint: Path, vllm_reasoner, requests, prompt_kv) -> dict:
    from cosmos3_serve.model_executor.diffusion_executor import DiffusionExecutor
    from cosmos3_serve.model_executor.kv_export import PromptKV

    [device] = vllm_reasoner.collective_rpc(lambda worker: worker.device)
    executor = DiffusionExecutor(tiny_checkpoint, vllm_reasoner.llm_engine.vllm_config, device)
    assert executor.admit([(i, r, [PromptKV(kv) for kv in prompt_kv[i]], False) for i, r in requests.items()]) == {}
    while executor.active:
        executor.step()
    return {request_id: (o.video, o.actions) for request_id, o in executor.take(list(requests)).items()}


DEGREES = ("cfg=2", "sp=2")


@pytest.fixture(scope="module")
def two_ranks(tiny_checkpoint: Path, requests, prompt_kv, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per degrees, each rank's results (one probe: both executors in the same two processes)."""
    folder = tmp_path_factory.mktemp("two-ranks")
    torch.save({"requests": requests, "prompt_kv": prompt_kv}, folder / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    subprocess.run([sys.executable, "-m", "tests.generator_parallel_probe", str(tiny_checkpoint), str(folder / "in.pt"),
                    str(folder / "out"), *DEGREES], check=True, env=env, timeout=600)  # fmt: skip
    return {degrees: [torch.load(folder / f"out.{degrees}.{rank}", weights_only=False) for rank in range(2)]
            for degrees in DEGREES}  # fmt: skip


def _close(got: torch.Tensor | None, expected: torch.Tensor | None) -> bool:
    if got is None or expected is None:
        return got is None and expected is None
    return float((got - expected).abs().max()) <= ATOL


@pytest.mark.parametrize("degrees", DEGREES)
def test_two_ranks_split_by_sequence_equal_one(degrees: str, two_ranks, requests, one_rank) -> None:
    ranks = two_ranks[degrees]
    assert all(rank["errors"] == {} for rank in ranks)
    assert ranks[0]["split"] == {"ulysses": degrees == "sp=2", "branches": degrees == "cfg=2"}
    if degrees == "sp=2":
        assert sum(ranks[0]["tokens"].values()) % 2, ranks[0]["tokens"]  # uneven shards
    for rank in ranks:  # every rank steps every request: the same outputs everywhere
        for request_id, (video, actions) in rank["finished"].items():
            assert _close(video, one_rank[request_id][0]) and _close(actions, one_rank[request_id][1]), request_id
    collected = [set(rank["collected"]) for rank in ranks]
    assert collected[0] | collected[1] == set(requests) and not collected[0] & collected[1] and all(collected)
