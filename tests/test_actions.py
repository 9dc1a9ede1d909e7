"""Action modes on the generator: forward dynamics, policy and inverse dynamics equal diffusers' `Cosmos3OmniPipeline`
(video latents, actions and decoded frames, CFG on and off, float32); prompts, canvases and conditioning clips as
the reference builds them; action requests batch with any others; bad action inputs are refused by name."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.model_executor.generation_client import Cosmos3Generator, GenerationResult
from tests import media

ATOL = 1e-4
PROMPT, NEGATIVE = "Push the T block to the goal", "blurry, low quality"
DOMAIN = "pusht"  # the tiny checkpoint's action head is 8 wide: pusht's actions (2 wide) fit
CHUNK = 4  # 5 frames: 2 latent frames
# 48x80 px (3x5 latents: an odd patch grid) lands on the 192x320 canvas of tier 256, right and bottom padded.
IMAGE = media.smooth_image(seed=21, height=48, width=80)
VIDEO = [Image.fromarray(frame) for frame in media.smooth_video(seed=22, num_frames=6, height=48, width=80)]
ACTIONS = np.random.default_rng(23).standard_normal((CHUNK - 1, 2)).astype(np.float32)  # the last one repeats
CONDITION = {"forward_dynamics": {"image": IMAGE}, "policy": {"image": IMAGE}, "inverse_dynamics": {"video": VIDEO}}


@pytest.fixture(scope="module")
def generator(tiny_checkpoint: Path, vllm_reasoner) -> Cosmos3Generator:
    return Cosmos3Generator(tiny_checkpoint, vllm_reasoner)


def action_request(mode: str, guidance_scale: float = 6.0, steps: int = 3, seed: int = 5, **changes) -> GenerationRequest:
    request = GenerationRequest(
        PROMPT, NEGATIVE, fps=16.0, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
        action_mode=mode, action_domain=DOMAIN, action_chunk_size=CHUNK, action_resolution_tier=256,
        actions=ACTIONS if mode == "forward_dynamics" else None, **CONDITION[mode],
    )  # fmt: skip
    return dataclasses.replace(request, **changes)


def reference(pipeline, request: GenerationRequest, output_type: str = "latent"):
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition

    action = CosmosActionCondition(
        mode=request.action_mode, chunk_size=request.action_chunk_size, domain_name=request.action_domain,
        resolution_tier=request.action_resolution_tier, image=request.image, video=request.video,
        raw_actions=None if request.actions is None else torch.from_numpy(request.actions),
        view_point=request.action_view_point,
    )  # fmt: skip
    return pipeline(request.prompt, negative_prompt=request.negative_prompt, action=action, fps=request.fps,
                    num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                    generator=torch.Generator().manual_seed(request.seed), output_type=output_type)  # fmt: skip


def run(generator: Cosmos3Generator, request: GenerationRequest, decode: bool = False) -> GenerationResult:
    return generator.generate({"one": request}, decode=decode)["one"]


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("mode", ["forward_dynamics", "policy", "inverse_dynamics"])
def test_video_and_actions_equal_the_reference(generator, diffusers_pipeline, mode: str, guidance_scale: float) -> None:
    request = action_request(mode, guidance_scale)
    ours = run(generator, request)
    theirs = reference(diffusers_pipeline, request)
    if mode == "inverse_dynamics":  # video -> actions: the clip is not generated
        assert ours.video is None
    else:
        assert ours.video.shape == theirs.video.shape == (1, 48, 2, 3, 5)  # the content's latents, no padding
        assert (ours.video - theirs.video).abs().max() <= ATOL
        assert theirs.video[:, :, 1:].abs().mean() > 0.1  # a real signal, not zeros
    if mode == "forward_dynamics":  # the given actions drive the video; none are generated
        assert ours.actions is None and theirs.action is None
    else:
        [expected] = theirs.action
        assert ours.actions.shape == expected.shape == (CHUNK, 2)  # cropped to the embodiment's width
        assert (ours.actions - expected).abs().max() <= ATOL
        assert expected.abs().mean() > 0.1


@pytest.mark.parametrize("mode", ["forward_dynamics", "policy"])
def test_decoded_frames_equal_the_reference(generator, diffusers_pipeline, mode: str) -> None:
    request = action_request(mode, steps=2, seed=8)
    ours = run(generator, request, decode=True)
    theirs = reference(diffusers_pipeline, request, output_type="np")  # [T, H, W, 3] in [0, 1]
    assert ours.video.shape == (CHUNK + 1, 48, 80, 3) and ours.video.dtype == torch.uint8
    assert (ours.video.float() - torch.from_numpy(theirs.video) * 255).abs().max() <= 1.0  # rounding to 8 bits
    if mode == "policy":
        assert (ours.actions - theirs.action[0]).abs().max() <= ATOL


def test_action_requests_batch_with_any_other(generator) -> None:
    requests = {
        "forward": action_request("forward_dynamics", seed=1),
        "policy-no-cfg": action_request("policy", guidance_scale=1.0, steps=4, seed=2),
        "inverse": action_request("inverse_dynamics", steps=2, seed=3),
        "image": GenerationRequest("A red cube.", None, num_frames=1, height=32, width=32, num_inference_steps=3, seed=4),
    }
    together = generator.generate(requests)
    for request_id, request in requests.items():
        alone = run(generator, request)
        for name in ("video", "actions"):
            mixed, single = getattr(together[request_id], name), getattr(alone, name)
            assert (mixed is None) == (single is None), (request_id, name)
            # Clips of one shape share a VAE encoder batch: float rounding differs by ~1e-5, leakage would not.
            assert mixed is None or (mixed - single).abs().max() <= 1e-4, (request_id, name)


@pytest.mark.parametrize("view_point", ["ego_view", "wrist_view", None])
@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_prompt_token_ids_equal_the_reference(generator, diffusers_pipeline, view_point, negative) -> None:
    request = action_request("policy", negative_prompt=negative, action_view_point=view_point)
    ours = generator.prompts.context(request)
    theirs = diffusers_pipeline.tokenize_prompt(PROMPT, negative, num_frames=CHUNK + 1, height=192, width=320, fps=16.0,
                                                action_mode="policy", action_view_point=view_point)  # fmt: skip
    assert (request.spec.height, request.spec.width) == (192, 320)
    assert ours == list(theirs)


@pytest.mark.parametrize(
    "description, num_frames, fps, height, width",
    [("", 17, 16.0, 480, 832), ("Wave!", 2000, 16.0, 640, 640), ("  pick the cube  ", 9, 30.0, 1280, 704)],
)
def test_action_caption_equals_the_reference(description: str, num_frames: int, fps: float, height: int, width: int) -> None:
    from diffusers import Cosmos3OmniPipeline

    from cosmos3_serve.sampling.prompts import PromptSpec, action_caption

    for view_point in ("third_person_view", None):
        ours = action_caption(description, view_point, PromptSpec(num_frames, height, width, fps))
        theirs = Cosmos3OmniPipeline._build_action_json_prompt(description, view_point=view_point, num_frames=num_frames,
                                                               fps=fps, height=height, width=width)  # fmt: skip
        assert ours == theirs


def test_embodiments_and_canvases_equal_the_reference() -> None:
    from diffusers.pipelines.cosmos import pipeline_cosmos3_omni as reference_module
    from diffusers.video_processor import VideoProcessor

    from cosmos3_serve.sampling import actions

    assert actions.EMBODIMENT_DOMAIN_IDS == reference_module._EMBODIMENT_TO_DOMAIN_ID
    assert actions.EMBODIMENT_ACTION_DIMS == reference_module._EMBODIMENT_TO_RAW_ACTION_DIM
    assert actions.VIEW_POINT_FRAMING == reference_module._ACTION_VIEWPOINT_TEMPLATES
    for tier, bins in reference_module._ACTION_RESOLUTION_BINS.items():
        for height in range(16, 1400, 48):
            for width in range(16, 1400, 80):
                expected = VideoProcessor.classify_height_width_bin(height, width, ratios=bins)
                assert actions.canvas_size((height, width), int(tier)) == expected, (tier, height, width)


@pytest.mark.parametrize(
    "height, width, num_frames, tier",
    [(48, 80, 5, 256),  # padded, replicated (the padding is wider than the content)
     (176, 304, 3, 256),  # padded, reflected
     (420, 700, 5, 256),  # downscaled (bicubic), then padded
     (250, 250, 2, 480)],  # rounded down to multiples of 16, a single frame repeated
)  # fmt: skip
def test_conditioning_clip_equals_the_reference(diffusers_pipeline, height: int, width: int, num_frames: int, tier: int) -> None:
    from cosmos3_serve.sampling.actions import action_source_size, canvas_size
    from cosmos3_serve.sampling.conditioning import action_conditioning_clip

    frames = [Image.fromarray(f) for f in media.smooth_video(seed=height, num_frames=3, height=height, width=width)]
    frames = frames[:1] if num_frames == 2 else frames
    canvas = canvas_size(action_source_size([frame.size for frame in frames]), tier)
    ours, content = action_conditioning_clip(frames, num_frames, canvas)
    theirs, image_size, *theirs_canvas = diffusers_pipeline._prepare_action_video_conditioning(
        frames, tier, num_frames, device="cpu", dtype=torch.float32
    )
    assert tuple(theirs_canvas) == canvas and tuple(image_size[2:].int().tolist()) == content
    assert ours.shape == theirs.shape == (1, 3, num_frames, *canvas)
    assert (ours - theirs).abs().max() <= 1e-6


def test_domain_aware_action_heads_equal_the_reference(vllm_reasoner, diffusers_pipeline) -> None:
    [tower] = vllm_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor.tower)  # in-process engine
    reference_tower = diffusers_pipeline.transformer
    domains = torch.tensor([4, 0, 31, 4, 7, 20])
    actions = torch.randn(len(domains), reference_tower.action_dim, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(len(domains), reference_tower.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(tower.action_proj_in(actions, domains), reference_tower.action_proj_in(actions, domains),
                              atol=1e-6)  # fmt: skip
        assert torch.allclose(tower.action_proj_out(hidden, domains), reference_tower.action_proj_out(hidden, domains),
                              atol=1e-6)  # fmt: skip
    assert torch.equal(tower.action_modality_embed, reference_tower.action_modality_embed)


def _frames(size: tuple[int, int], count: int = 5) -> list[Image.Image]:
    return [Image.new("RGB", size)] * count


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(action_mode="world_model"), "action_mode"),
        (dict(action_domain="libero"), "action_domain"),  # no fixed action width
        (dict(action_domain="ur5"), "action_domain"),
        (dict(action_chunk_size=0), "action_chunk_size"),
        (dict(action_chunk_size=None), "action_chunk_size"),
        (dict(action_resolution_tier=360), "action_resolution_tier"),
        (dict(action_view_point="top_view"), "action_view_point"),
        (dict(actions=None), "actions"),
        (dict(actions=np.zeros((4, 3), np.float32)), "actions"),  # pusht actions are 2 wide
        (dict(actions=np.zeros((0, 2), np.float32)), "actions"),
        (dict(actions=np.zeros(2, np.float32)), "actions"),
        (dict(actions=np.full((4, 2), np.nan, np.float32)), "actions"),
        (dict(image=None), "image"),
        (dict(image=Image.new("RGB", (8, 40))), "image"),
        (dict(video=VIDEO), "video"),  # and an image
        (dict(action_mode="inverse_dynamics", actions=None, image=None, video=_frames((80, 48)) + _frames((64, 48))),
         "video"),  # frames of different sizes
        (dict(action_mode="inverse_dynamics", actions=None), "video"),  # an image: inverse dynamics needs a video
        (dict(action_mode="policy"), "actions"),  # only forward dynamics takes actions
        (dict(reason_first=True), "reason_first"),
        (dict(action_mode=None), "action_domain"),  # action inputs without an action mode
    ],
)  # fmt: skip
def test_invalid_action_inputs_name_the_field(changes: dict, field: str) -> None:
    request = dataclasses.replace(action_request("forward_dynamics"), **changes)
    invalid = request.invalid_field()
    assert invalid is not None and invalid[0] == field, invalid


def test_an_embodiment_the_action_head_cannot_serve_is_refused_before_any_prefill(generator) -> None:
    prefilled = generator.prompt_token_counts.total
    wide = action_request("policy", action_domain="bridge_orig_lerobot")  # 10 wide, the tiny head 8
    with pytest.raises(ValueError, match="action_domain"):
        generator.generate({"wide": wide})
    with pytest.raises(ValueError, match="actions"):
        generator.generate({"bad": action_request("forward_dynamics", actions=None)})
    assert generator.prompt_token_counts.total == prefilled


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosmos3_serve.server.cli", "generate", *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_cli_writes_the_video_and_the_actions(generator, tiny_checkpoint: Path, tmp_path: Path) -> None:
    import av

    from cosmos3_serve.server.encoding import mp4_bytes

    image, clip = tmp_path / "first.png", tmp_path / "clip.mp4"
    IMAGE.save(image)
    clip.write_bytes(mp4_bytes(np.stack([np.asarray(frame) for frame in VIDEO]), 16.0))
    common = [str(tiny_checkpoint), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--action-domain", DOMAIN,
              "--action-chunk-size", str(CHUNK), "--action-resolution-tier", "256", "--fps", "16",
              "--num-inference-steps", "2", "--dtype", "float32"]  # fmt: skip
    result = _cli(*common, "--action-mode", "policy", "--image", str(image), "--out", str(tmp_path / "policy.mp4"),
                  "--actions-out", str(tmp_path / "policy.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with av.open(str(tmp_path / "policy.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == CHUNK + 1
    written = torch.tensor(json.loads((tmp_path / "policy.json").read_text()))
    expected = run(generator, action_request("policy", steps=2, seed=0)).actions
    assert written.shape == (CHUNK, 2) and (written - expected).abs().max() <= ATOL

    result = _cli(*common, "--action-mode", "inverse_dynamics", "--video", str(clip), "--out", str(tmp_path / "inverse.npy"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.load(tmp_path / "inverse.npy").shape == (CHUNK, 2)


@pytest.mark.parametrize(
    "mode, out, actions_out, option",
    [("inverse_dynamics", "clip.mp4", None, "--out"),  # it makes actions, no video
     ("policy", "clip.png", None, "--out"),  # a video
     ("forward_dynamics", "clip.mp4", "actions.npy", "--actions-out"),  # forward dynamics makes no actions
     ("policy", "clip.mp4", "actions.txt", "--actions-out")],
)  # fmt: skip
def test_cli_options_name_the_bad_one(tiny_checkpoint: Path, mode: str, out: str, actions_out: str | None,
                                      option: str) -> None:  # fmt: skip
    from cosmos3_serve.server.generate_cli import GenerateOptions, invalid_option

    request = action_request(mode)
    options = GenerateOptions(tiny_checkpoint, Path(out), request, actions_out=Path(actions_out) if actions_out else None)
    assert invalid_option(options).startswith(option)
    options = GenerateOptions(tiny_checkpoint, Path("clip.mp4"), dataclasses.replace(action_request("policy"), actions=ACTIONS))
    assert invalid_option(options).startswith("--actions ")
