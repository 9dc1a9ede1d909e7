"""The generation routes' bodies -> `GenerationRequest`: checkpoint capabilities and the status they map to,
through the server's real error handlers (FastAPI's test client: no engine needed for a refused request)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cosmos3_serve.model_executor.generator import GeneratorConfig
from cosmos3_serve.server.app import install_error_handlers
from cosmos3_serve.server.protocol import ModeUnavailable, VideoGenerateBody, from_video_body, served_modes
from tests import media

POLICY = {"mode": "policy", "prompt": "Push the T block.", "image": media.png_data_url(media.smooth_image(seed=1)),
          "action_domain": "pusht", "action_chunk_size": 4, "num_inference_steps": 2}  # fmt: skip


@pytest.fixture(scope="module")
def without_action_head(tiny_checkpoint: Path) -> GeneratorConfig:
    return dataclasses.replace(GeneratorConfig.from_checkpoint(tiny_checkpoint), action_dim=None)


def test_action_modes_need_the_action_head(tiny_checkpoint: Path, without_action_head: GeneratorConfig) -> None:
    with_head = GeneratorConfig.from_checkpoint(tiny_checkpoint)
    assert set(served_modes(with_head)) - set(served_modes(without_action_head)) == {
        "forward_dynamics", "policy", "inverse_dynamics"}  # fmt: skip
    mode, request = from_video_body(VideoGenerateBody(**POLICY), with_head)
    assert mode == "policy" and request.action_domain == "pusht"
    with pytest.raises(ModeUnavailable, match="no action head"):
        from_video_body(VideoGenerateBody(**POLICY), without_action_head)


def test_a_mode_the_checkpoint_lacks_is_a_400(without_action_head: GeneratorConfig) -> None:
    app = FastAPI()

    @app.post("/v1/video/generate")
    def generate(body: VideoGenerateBody) -> dict:
        from_video_body(body, without_action_head)
        return {}

    install_error_handlers(app)
    response = TestClient(app).post("/v1/video/generate", json=POLICY)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "mode" and "action head" in response.json()["error"]["message"]
