"""`--generator-parallel`: the generator's work split over four CPU ranks (gloo), against the same requests on one
rank: CFG branches on different ranks and each sequence's tokens split by Ulysses (cfg=2,sp=2: the whole tower on
every rank; token counts that do not divide by 2), CFG branches or Ulysses composed with tensor parallelism (cfg=2
or sp=2: each half of the ranks holds the tower in two shards), and the default (the tower sharded over all four).
Each rank gets its tensor-parallel shard of the prompts' K/V, as vLLM's workers export them, and gathers its tower
shard's heads once per request; finished requests' results are dealt to the ranks in turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor.request import GenerationRequest
from tests.generator_parallel_probe import run_probe
from tests.test_actions import action_request

ATOL = 1e-4  # float32: the same sums in other shapes and orders
PROMPT, NEGATIVE = "A robot arm picks up a red cube.", "blurry, low quality"
WORLD = 4
# degrees: (Ulysses, CFG branches, tower shards)
DEGREES = {"cfg=2,sp=2": (True, True, 1), "cfg=2": (False, True, 2), "sp=2": (True, False, 2), "tp": (False, False, 4)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four key / value heads: one per rank of four, so Ulysses and tower shards compose (sp=2 x 2 shards)."""
    from cosmos3_serve.model_executor.checkpoint.writer import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-kv4", shape="tiny-kv4", vocab="compact",
                            action=True, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def requests() -> dict[str, GenerationRequest]:
    return {
        "image-cfg": GenerationRequest(PROMPT, NEGATIVE, height=32, width=64, num_inference_steps=3, seed=1),
        "video": GenerationRequest(PROMPT, None, num_frames=9, height=32, width=96, num_inference_steps=3, seed=2,
                                   guidance_scale=1.0),  # fmt: skip
        "policy": action_request("policy", steps=3, seed=3),
    }


@pytest.fixture(scope="module")
def runs(checkpoint: Path, requests, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per degrees, each rank's results, and the one-rank results (one probe: every executor in the same four
    processes, one after the other)."""
    return run_probe(checkpoint, requests, WORLD, "cpu", list(DEGREES), tmp_path_factory.mktemp("ranks"))


def _close(got: torch.Tensor | None, expected: torch.Tensor | None) -> bool:
    if got is None or expected is None:
        return got is None and expected is None
    return float((got - expected).abs().max()) <= ATOL


@pytest.mark.parametrize("degrees", DEGREES)
def test_four_ranks_equal_one(degrees: str, runs, requests) -> None:
    ranks, one = runs["ranks"][degrees], runs["one"]
    assert set(one) == set(requests) and all(one[i][0] is not None for i in one)
    assert all(rank["errors"] == {} for rank in ranks)
    ulysses, branches, shards = DEGREES[degrees]
    assert ranks[0]["split"] == {"ulysses": ulysses, "branches": branches, "tower_shards": shards}
    if ulysses:
        assert sum(ranks[0]["tokens"].values()) % 2, ranks[0]["tokens"]  # uneven shards
    for rank in ranks:  # every rank steps every request: the same outputs everywhere
        for request_id, (video, actions) in rank["finished"].items():
            assert _close(video, one[request_id][0]) and _close(actions, one[request_id][1]), request_id
    collected = [set(rank["collected"]) for rank in ranks]
    assert set().union(*collected) == set(requests) and sum(map(len, collected)) == len(requests)
