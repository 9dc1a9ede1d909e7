"""The generation routes' bodies -> `GenerationRequest`: checkpoint capabilities and the status they map to,
through the server's real error handlers (FastAPI's test client: no engine needed for a refused request)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cosmos3_serve.server.app import install_error_handlers
from cosmos3_serve.server.protocol import CheckpointInfo, ModeUnavailable, VideoGenerateBody, from_video_body
from tests import media

POLICY = {"mode": "policy", "prompt": "Push the T block.", "image": media.png_data_url(media.smooth_image(seed=1)),
          "action_domain": "pusht", "action_chunk_size": 4, "num_inference_steps": 2}  # fmt: skip


@pytest.fixture(scope="module")
def without_action_head(tiny_checkpoint: Path) -> CheckpointInfo:
    info = CheckpointInfo.load(tiny_checkpoint)
    return dataclasses.replace(info, generator=dataclasses.replace(info.generator, action_dim=None))


def test_action_modes_need_the_action_head(tiny_checkpoint: Path, without_action_head: CheckpointInfo) -> None:
    with_head = CheckpointInfo.load(tiny_checkpoint)
    assert set(with_head.modes()) - set(without_action_head.modes()) == {
        "forward_dynamics", "policy", "inverse_dynamics"}  # fmt: skip
    mode, request = from_video_body(VideoGenerateBody(**POLICY), with_head)
    assert mode == "policy" and request.action_domain == "pusht"
    with pytest.raises(ModeUnavailable, match="no action head"):
        from_video_body(VideoGenerateBody(**POLICY), without_action_head)


def test_a_mode_the_checkpoint_lacks_is_a_400(without_action_head: CheckpointInfo) -> None:
    app = FastAPI()

    @app.post("/v1/video/generate")
    def generate(body: VideoGenerateBody) -> dict:
        from_video_body(body, without_action_head)
        return {}

    install_error_handlers(app)
    response = TestClient(app).post("/v1/video/generate", json=POLICY)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "mode" and "action head" in response.json()["error"]["message"]


def test_a_schedule_that_repeats_a_timestep_is_refused_by_field(tiny_checkpoint: Path) -> None:
    """At flow shift 10, 101 UniPC steps repeat an integer timestep (diffusers' solver fails on its last step);
    100 steps, or 101 at a smaller shift, run."""
    from cosmos3_serve.server.protocol import FieldError

    info = CheckpointInfo.load(tiny_checkpoint)
    body = {"prompt": "x", "num_frames": 1, "height": 32, "width": 32}
    with pytest.raises(FieldError, match="distinct timesteps") as refused:
        from_video_body(VideoGenerateBody(**body, num_inference_steps=101), info)
    assert refused.value.field == "num_inference_steps"
    for fine in ({"num_inference_steps": 100}, {"num_inference_steps": 101, "flow_shift": 3.0}):
        from_video_body(VideoGenerateBody(**body, **fine), info)


def test_nim_resolution_tiers_keep_their_area_at_each_aspect() -> None:
    from cosmos3_serve.server.nim_protocol import resolution_size

    assert resolution_size("720") == resolution_size("720_16_9") == (720, 1280)
    assert resolution_size("720_1_1") == (960, 960) and resolution_size("720_9_16") == (1280, 720)
    assert resolution_size("480_16_9") == (480, 832) and resolution_size("256_16_9") == (256, 448)
    for tier in ("256", "480", "720"):
        for aspect in ("16_9", "1_1", "9_16", "4_3", "3_4"):
            height, width = resolution_size(f"{tier}_{aspect}")
            across, down = (int(side) for side in aspect.split("_"))
            assert height % 16 == 0 and width % 16 == 0
            assert abs(width / height - across / down) < 0.05  # the aspect, within a 16-pixel rounding
            assert abs(height * width / resolution_size(tier)[0] / resolution_size(tier)[1] - 1) < 0.05  # the area
