"""The reasoner plugin inside HTTP servers: plain `vLLM` (our plugin loads through its entry point) and
`cosmos3-serve serve`, each deployed with video-token pruning. Pruning shows in `usage.prompt_tokens`; the K/V
export connector is available by name in plain vLLM."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cosmos3_serve.model_executor import vllm_compat
from cosmos3_serve.model_executor.kv_export import EXPORT_PARAM
from cosmos3_serve.model_executor.plugin import KV_EXPORT_CONNECTOR
from tests import media
from tests.server_process import EAGER, ServerProcess, free_port

FRAMES, SIDE, FPS = 16, 64, 4
TOKENS_PER_PATCH = (SIDE // 32) ** 2  # 16 px patches merged 2x2


def _video_messages() -> list[dict]:
    frames = media.smooth_video(seed=4, num_frames=FRAMES, height=SIDE, width=SIDE)
    return [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": media.mp4_data_url(frames, fps=FPS)}},
        {"type": "text", "text": "What happens in the video?"}]}]  # fmt: skip


def _chat_prompt_tokens(base_url: str, model: str) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=model, messages=_video_messages(), max_tokens=2, temperature=0)
    return reply.usage.prompt_tokens


@dataclass(frozen=True)
class Unpruned:
    prompt_tokens: int
    video_tokens: int

    @property
    def temporal_patches(self) -> int:
        return self.video_tokens // TOKENS_PER_PATCH


@pytest.fixture(scope="module")
def unpruned(vllm_reasoner) -> Unpruned:
    """The same chat request without pruning (the in-process engine samples frames from the MP4 the same way)."""
    from vllm import SamplingParams

    prompt = vllm_reasoner.chat(_video_messages(), SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
    video_token_id = vllm_reasoner.llm_engine.model_config.hf_config.video_token_id
    return Unpruned(prompt_tokens=len(prompt), video_tokens=prompt.count(video_token_id))


@pytest.fixture(scope="module")
def plain_vllm_with_evs(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    port = free_port()
    connector = json.dumps({"kv_connector": KV_EXPORT_CONNECTOR, "kv_role": "kv_producer"})
    server = ServerProcess(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_checkpoint),
         "--port", str(port), "--dtype", "float32", "--max-model-len", "4096", "--gpu-memory-utilization", "0.2", "--kv-transfer-config", connector,
         *[arg for k, v in vllm_compat.video_pruning_kwargs(0.75, "evs").items() for arg in (f"--{k.replace('_', '-')}", str(v))]],
        port,
    )  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_evs_in_plain_vllm_prunes_the_expected_tokens(plain_vllm_with_evs, tiny_checkpoint, unpruned: Unpruned):
    assert unpruned.temporal_patches >= 4
    retained = max(TOKENS_PER_PATCH, int(unpruned.video_tokens * 0.25))  # EVS keeps the first frame whole
    pruned = _chat_prompt_tokens(plain_vllm_with_evs.base_url, str(tiny_checkpoint))
    assert unpruned.prompt_tokens - pruned == unpruned.video_tokens - retained


def test_plain_vllm_exports_kv_through_our_connector(plain_vllm_with_evs, tiny_checkpoint) -> None:
    body = {"model": str(tiny_checkpoint), "prompt": [5, 6, 7, 8, 9], "max_tokens": 1,
            "kv_transfer_params": {EXPORT_PARAM: "plain-vllm"}}  # fmt: skip
    reply = httpx.post(f"{plain_vllm_with_evs.base_url}/v1/completions", json=body, timeout=60).json()
    assert reply["kv_transfer_params"] == {EXPORT_PARAM: "plain-vllm", "num_prompt_tokens": 5}


@pytest.mark.skipif("vidcom2" not in vllm_compat.VIDEO_PRUNING_METHODS, reason="VidCom2 needs vLLM >= 0.32")
def test_vidcom2_through_cosmos3_serve(tiny_checkpoint: Path, unpruned: Unpruned) -> None:
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "cosmos3_serve.server.cli", "serve", str(tiny_checkpoint), "--port", str(port),
         "--precision", "fp32", "--max-model-len", "4096", *EAGER, "--gpu-memory-utilization", "0.2",
         "--video-pruning-rate", "0.5",
         "--video-pruning-method", "vidcom2"],
        port,
    )  # fmt: skip
    try:
        server.wait_ready(path="/v1/health/ready")
        pruned = _chat_prompt_tokens(server.base_url, tiny_checkpoint.name)
    finally:
        server.stop()
    retained = max(unpruned.temporal_patches, int(unpruned.video_tokens * 0.5))  # VidCom2: >= 1 token per frame
    assert unpruned.prompt_tokens - pruned == unpruned.video_tokens - retained
