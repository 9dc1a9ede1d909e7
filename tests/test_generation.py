"""The generator sidecar on the reasoner's exported K/V: text -> image, text -> video, image -> video and
video -> video latents equal diffusers' `Cosmos3OmniPipeline` for the same seed (float32, CFG on and off);
the reasoner runs once per request; mixed batches, cancellation and prefix caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor.diffusion_executor import DiffusionExecutor
from cosmos3_serve.model_executor.generation_client import Cosmos3Generator
from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.model_executor.vae_io import VaeCodec
from cosmos3_serve.sampling.prompts import PromptSpec, cfg_token_ids

LATENT_ATOL = 1e-4
PROMPT, NEGATIVE = "A robot arm picks up a red cube.", "blurry, low quality"


@pytest.fixture(scope="module")
def generator(tiny_checkpoint: Path, vllm_reasoner) -> Cosmos3Generator:
    return Cosmos3Generator(tiny_checkpoint, vllm_reasoner)


@pytest.mark.parametrize("num_frames, negative", [(1, None), (1, NEGATIVE), (17, NEGATIVE)])
def test_prompt_token_ids_equal_the_reference(generator, diffusers_pipeline, num_frames: int, negative) -> None:
    spec = PromptSpec(num_frames=num_frames, height=64, width=96, fps=16.0)
    ours = cfg_token_ids(generator.tokenizer, PROMPT, negative, spec)
    theirs = diffusers_pipeline.tokenize_prompt(PROMPT, negative, num_frames=num_frames, height=64, width=96, fps=16.0)
    assert ours == tuple(theirs)


@pytest.mark.parametrize(
    "num_frames, guidance_scale", [(1, 6.0), (1, 1.0), (9, 6.0)], ids=["t2i-cfg", "t2i-no-cfg", "t2v-cfg"]
)
def test_latents_equal_the_reference(generator, diffusers_pipeline, num_frames: int, guidance_scale: float) -> None:
    request = GenerationRequest(PROMPT, NEGATIVE, num_frames=num_frames, height=64, width=96, fps=16.0,
                                num_inference_steps=4, guidance_scale=guidance_scale, seed=7)  # fmt: skip
    ours = generator.generate_latents(request)
    reference = diffusers_pipeline(
        PROMPT, negative_prompt=NEGATIVE, num_frames=num_frames, height=64, width=96, fps=16.0,
        num_inference_steps=4, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).video  # fmt: skip
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= LATENT_ATOL
    assert reference.abs().mean() > 0.1  # a real signal, not zeros


def test_reasoner_runs_once_per_request_whatever_the_step_count(generator, vllm_reasoner) -> None:
    calls = {"n": 0}

    def count_forwards(worker):
        model = worker.model_runner.get_model()
        return model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    [handle] = vllm_reasoner.collective_rpc(count_forwards)  # in-process engine: the hook sees this `calls`
    try:
        counts = []
        for steps in (2, 6):
            before = calls["n"]
            generator.generate_latents(GenerationRequest(PROMPT, NEGATIVE, num_frames=1, height=32, width=32,
                                                         num_inference_steps=steps, seed=steps))  # fmt: skip
            counts.append(calls["n"] - before)
    finally:
        handle.remove()
    assert counts == [1, 1]  # one prefill of both CFG prompts, none while denoising


def test_decoded_frames_equal_the_reference(generator, diffusers_pipeline) -> None:
    request = GenerationRequest(PROMPT, NEGATIVE, num_frames=5, height=32, width=64, fps=16.0,
                                num_inference_steps=3, guidance_scale=6.0, seed=3)  # fmt: skip
    [result] = generator.generate({"decoded": request}, decode=True).values()
    frames = result.video
    reference = diffusers_pipeline(
        PROMPT, negative_prompt=NEGATIVE, num_frames=5, height=32, width=64, fps=16.0, num_inference_steps=3,
        guidance_scale=6.0, generator=torch.Generator().manual_seed(3), output_type="np",
    ).video  # fmt: skip  [T, H, W, 3] in [0, 1]
    assert frames.shape == (5, 32, 64, 3) and frames.dtype == torch.uint8
    difference = (frames.float() - torch.from_numpy(reference) * 255).abs()
    assert difference.max() <= 1.0  # rounding to 8 bits


def test_a_half_precision_vae_encodes_and_decodes_like_the_reference_in_that_precision(
    generator, diffusers_pipeline, vllm_reasoner
) -> None:
    """`serve --vae-precision bf16`, against diffusers' pipeline built with its VAE in bf16 (the rest float32): an
    image -> video request's latents (its first frame encoded in bf16) equal the reference's, and decoding the
    reference's latents is no more than a quarter further from diffusers' float32 frames than diffusers' bf16
    decode is. Not bit-equal: our decode adds each convolution's bias after rounding its output, as PyTorch does on
    CUDA, where diffusers' convolutions on the CPU add it before. (Decoding our own latents is not compared: a 1e-5
    difference that crosses a bf16 rounding boundary moves a few pixels by several levels.)"""
    import copy

    from diffusers import Cosmos3OmniPipeline

    from tests import media

    [executor] = vllm_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor)  # in-process engine
    reference_pipeline = Cosmos3OmniPipeline(
        transformer=diffusers_pipeline.transformer, text_tokenizer=diffusers_pipeline.text_tokenizer,
        vae=copy.deepcopy(diffusers_pipeline.vae).to(torch.bfloat16), scheduler=diffusers_pipeline.scheduler,
        enable_safety_checker=False,
    )  # fmt: skip
    common = dict(negative_prompt=NEGATIVE, image=media.smooth_image(seed=31, height=32, width=64), num_frames=5,
                  height=32, width=64, fps=16.0, num_inference_steps=3, guidance_scale=6.0)  # fmt: skip

    def reference(output_type: str, pipeline=reference_pipeline):
        return pipeline(PROMPT, **common, generator=torch.Generator().manual_seed(4), output_type=output_type).video

    reference_latents = reference("latent")
    float32_codec = executor.codec
    # What the executor builds for `--vae-precision bf16` (the generator loop is idle between requests).
    executor.codec = VaeCodec(copy.deepcopy(float32_codec.vae).to(torch.bfloat16), executor.device, use_graphs=True)
    try:
        latents = generator.generate_latents(GenerationRequest(PROMPT, seed=4, **common))
        frames = executor.codec.decode_by_shape({"reference": reference_latents.to(executor.device)})["reference"]
    finally:
        executor.codec = float32_codec
    assert (latents - reference_latents).abs().max() <= LATENT_ATOL
    reference_frames = torch.from_numpy(reference("np")) * 255  # [T, H, W, 3]
    float32_frames = torch.from_numpy(reference("np", diffusers_pipeline)) * 255
    error_ours = (frames.float() - float32_frames).abs().mean()
    error_theirs = (reference_frames - float32_frames).abs().mean()
    assert error_theirs > 0.5  # levels of 255: the bf16 VAE is not a no-op here
    assert error_ours <= 1.25 * error_theirs


# A request batched with others equals it alone up to float32 rounding: on the CPU the generator's GEMMs (ATen's)
# sum in an order that depends on the number of rows in the batch.
BATCH_ATOL = 5e-5
MIXED = {
    "image-cfg": GenerationRequest(PROMPT, NEGATIVE, num_frames=1, height=64, width=96, num_inference_steps=4, seed=1),
    "video-cfg": GenerationRequest("A dog runs.", None, num_frames=9, height=32, width=64, fps=16.0,
                                   num_inference_steps=3, seed=2),  # fmt: skip
    "image-no-cfg": GenerationRequest("A red cube.", None, num_frames=1, height=32, width=32, num_inference_steps=5,
                                      guidance_scale=1.0, seed=3),  # fmt: skip
}


def test_every_request_of_a_mixed_batch_equals_its_output_alone(generator) -> None:
    together = generator.generate(MIXED)
    for request_id, request in MIXED.items():
        alone = generator.generate_latents(request)
        assert together[request_id].actions is None
        assert (together[request_id].video - alone).abs().max() <= BATCH_ATOL, request_id


def test_a_batch_token_budget_steps_requests_in_arrival_order(generator, vllm_reasoner) -> None:
    [executor] = vllm_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor)  # in-process engine
    budget, order = executor.max_batch_tokens, []
    executor.max_batch_tokens = 1  # fewer than any request's tokens: one request per step
    try:
        together = generator.generate(MIXED, on_step=lambda request_id, step, total: order.append(request_id))
    finally:
        executor.max_batch_tokens = budget
    assert order == [request_id for request_id, request in MIXED.items() for _ in range(request.num_inference_steps)]
    for request_id, request in MIXED.items():
        assert (together[request_id].video - generator.generate_latents(request)).abs().max() <= BATCH_ATOL, request_id


def test_a_layout_refilled_from_another_batch_of_its_signature_gives_that_batchs_forward(generator, vllm_reasoner) -> None:
    """What a CUDA graph replays for a later batch of the same signature (`ForwardGraphs`): the earlier batch's
    layout, refilled with the later batch's data (`pack(..., into=earlier)`: rotary tables, prompt K/V, action
    domains), gives the tower exactly the forward of the later batch packed on its own."""
    from cosmos3_serve.model_executor.generator import GeneratorSequence
    from cosmos3_serve.model_executor.kv_export import PromptKV

    [executor] = vllm_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor)  # in-process engine
    tower, config = executor.tower, executor.config
    shape = lambda prompt: (config.num_hidden_layers, 2, prompt, config.num_key_value_heads, config.head_dim)  # noqa: E731
    torch.manual_seed(0)

    def batch(domains: tuple[int, int]):
        sequences = [GeneratorSequence(6, PromptKV(torch.randn(shape(prompt))), num_action_tokens=3, action_domain=d)
                     for prompt, d in zip((5, 7), domains)]  # fmt: skip
        return torch.randint(0, 40, (3, 18)).float(), sequences

    earlier, (positions, sequences) = tower.pack(*batch((0, 1))), batch((1, 0))
    inputs = (torch.randn(12, config.patch_latent_dim), torch.full((18,), 500.0), torch.ones(18, dtype=torch.bool))
    actions = torch.randn(6, config.action_dim)
    expected = tower(*inputs, tower.pack(positions, sequences), actions)
    assert not torch.allclose(tower(*inputs, earlier, actions)[1], expected[1])  # the layout's data matters
    assert tower.pack(positions, sequences, into=earlier) is earlier
    for ours, theirs in zip(tower(*inputs, earlier, actions), expected):
        assert torch.equal(ours, theirs)
    other = [GeneratorSequence(6, PromptKV(torch.randn(shape(p))), 3) for p in (7, 5)]
    with pytest.raises(ValueError, match="signatures differ"):
        tower.pack(torch.zeros(3, 18), other, into=earlier)


def test_the_mlp_in_chunks_of_tokens_gives_the_forward_in_one(generator, vllm_reasoner) -> None:
    """Forwards longer than `MLP_CHUNK_TOKENS` run their MLPs chunk by chunk (peak memory): the same velocities."""
    from cosmos3_serve.model_executor.generator import GeneratorSequence
    from cosmos3_serve.model_executor.kv_export import PromptKV

    [executor] = vllm_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor)  # in-process engine
    tower, config = executor.tower, executor.config
    torch.manual_seed(1)
    kv_shape = (config.num_hidden_layers, 2, 5, config.num_key_value_heads, config.head_dim)
    sequences = [GeneratorSequence(20, PromptKV(torch.randn(kv_shape))) for _ in range(2)]
    inputs = (torch.randn(40, config.patch_latent_dim), torch.full((40,), 700.0), torch.ones(40, dtype=torch.bool))
    batch = tower.pack(torch.randint(0, 40, (3, 40)).float(), sequences)
    whole, _ = tower(*inputs, batch)
    chunk_tokens = [layer.mlp.chunk_tokens for layer in tower.layers]
    try:
        for layer in tower.layers:
            layer.mlp.chunk_tokens = 7  # 40 tokens: five chunks of 7 and one of 5
        chunked, _ = tower(*inputs, batch)
    finally:
        for layer, tokens in zip(tower.layers, chunk_tokens):
            layer.mlp.chunk_tokens = tokens
    assert chunk_tokens[0] >= 40
    torch.testing.assert_close(chunked, whole, rtol=0, atol=BATCH_ATOL)  # GEMMs of other row counts round apart


def test_cancelled_request_leaves_the_batch_and_frees_its_kv(generator, vllm_reasoner) -> None:
    """A request cancelled while it denoises leaves the batch at the generator loop's next step boundary: its prompt
    K/V are freed while the other request still runs, and the other's result is as if it had run alone."""
    import gc
    import weakref

    [executor] = vllm_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor)  # in-process engine
    keep = GenerationRequest(PROMPT, NEGATIVE, num_frames=1, height=64, width=96, num_inference_steps=40, seed=1)
    drop = GenerationRequest("A dog runs.", None, num_frames=9, height=32, width=64, fps=16.0, num_inference_steps=60,
                             seed=2)  # fmt: skip
    steps_seen: dict[str, int] = {}
    dropped_kv, cancelled_at, freed_while_running = [], [], []

    def on_step(request_id: str, step: int, total: int) -> None:
        steps_seen[request_id] = step
        if request_id == "drop" and step == 2:
            [state] = [s for s in list(executor.active) if s.request_id == "drop"]
            dropped_kv.append(weakref.ref(state.sequences[0].prompt_kv.kv))
            del state
            generator.cancel("drop")
            cancelled_at.append(steps_seen.get("keep", 0))
        if request_id == "keep" and cancelled_at and step == cancelled_at[0] + 10 and not freed_while_running:
            gc.collect()
            freed_while_running.append(dropped_kv[0]() is None)

    results = generator.generate({"keep": keep, "drop": drop}, on_step=on_step)
    assert results["drop"] is None and steps_seen["drop"] < drop.num_inference_steps
    assert freed_while_running == [True] and "drop" not in executor
    assert (results["keep"].video - generator.generate_latents(keep)).abs().max() <= BATCH_ATOL


def test_shared_system_and_negative_prompts_come_from_the_prefix_cache(generator, vllm_reasoner) -> None:
    block = vllm_reasoner.llm_engine.vllm_config.cache_config.block_size
    negative = "blurry, distorted, low quality, watermark, text, " * 30  # several KV blocks shared by both requests
    counts = generator.prompt_token_counts
    cached_before = counts.cached
    generator.generate_latents(GenerationRequest("A cat.", negative, height=32, width=32, num_inference_steps=1))
    first = counts.cached - cached_before
    generator.generate_latents(GenerationRequest("A dog.", negative, height=32, width=32, num_inference_steps=1))
    second = counts.cached - cached_before - first
    assert second - first >= 2 * block  # the second request's negative prompt is served from the cache


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("mode", ["image-to-video", "video-to-video"])
def test_conditioned_video_latents_equal_the_reference(generator, diffusers_pipeline, mode, guidance_scale) -> None:
    from PIL import Image

    from tests import media

    image = media.smooth_image(seed=11, height=48, width=80)  # another size: resized to cover and cropped
    frames = [Image.fromarray(f) for f in media.smooth_video(seed=12, num_frames=9, height=40, width=72)]
    condition = {"image": image} if mode == "image-to-video" else {"video": frames}
    common = dict(negative_prompt=NEGATIVE, num_frames=9, height=32, width=64, fps=16.0, num_inference_steps=3,
                  guidance_scale=guidance_scale)  # fmt: skip
    ours = generator.generate_latents(GenerationRequest(PROMPT, seed=5, **common, **condition))
    reference = diffusers_pipeline(PROMPT, **common, **condition, generator=torch.Generator().manual_seed(5),
                                   output_type="latent").video  # fmt: skip
    assert (ours - reference).abs().max() <= LATENT_ATOL


def test_the_vae_encodes_only_the_frames_clean_latents_see(generator, vllm_reasoner, monkeypatch) -> None:
    """The VAE is causal in time: image conditioning (clean latent frame 0) needs pixel frame 0; video conditioning
    of latent frames (0, 1) needs pixel frames 0..4 (the latents equal the reference: the tests above)."""
    from PIL import Image

    from tests import media

    [executor] = vllm_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor)  # in-process engine
    encoded_frames, encode = [], executor.codec.vae.encode
    monkeypatch.setattr(executor.codec.vae, "encode", lambda pixels: encoded_frames.append(pixels.shape[2]) or encode(pixels))
    frames = [Image.fromarray(f) for f in media.smooth_video(seed=12, num_frames=9, height=32, width=64)]
    for condition in ({"image": media.smooth_image(seed=11, height=32, width=64)}, {"video": frames}):
        generator.generate_latents(GenerationRequest(PROMPT, num_frames=17, height=32, width=64, num_inference_steps=1,
                                                     guidance_scale=1.0, **condition))  # fmt: skip
    assert encoded_frames == [1, 5]


def test_clips_of_one_shape_encode_in_a_power_of_two_batch_each_as_alone(generator, vllm_reasoner, monkeypatch) -> None:
    """Three image -> video requests admitted together: one encoder call of four clips (the last repeated: cuDNN
    plans a new batch size anew), and each request's latents as when it runs alone."""
    from tests import media

    [executor] = vllm_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor)  # in-process engine
    requests = {f"i2v-{seed}": GenerationRequest(PROMPT, image=media.smooth_image(seed=seed, height=32, width=64),
                                                 num_frames=9, height=32, width=64, num_inference_steps=2,
                                                 guidance_scale=1.0, seed=seed)
                for seed in (21, 22, 23)}  # fmt: skip
    batch_sizes, encode = [], executor.codec.vae.encode
    monkeypatch.setattr(executor.codec.vae, "encode", lambda pixels: batch_sizes.append(pixels.shape[0]) or encode(pixels))
    together = generator.generate(requests)
    assert batch_sizes == [4]
    for request_id, request in requests.items():
        assert (together[request_id].video - generator.generate_latents(request)).abs().max() <= LATENT_ATOL
    assert batch_sizes == [4, 1, 1, 1]


def test_odd_latent_sizes_are_padded_like_the_reference(generator, diffusers_pipeline) -> None:
    # 48x80 px -> 3x5 latents: an odd grid for 2x2 patches (like 720p: 45x80 latents).
    common = dict(negative_prompt=NEGATIVE, num_frames=1, height=48, width=80, num_inference_steps=2)
    ours = generator.generate_latents(GenerationRequest(PROMPT, seed=9, **common))
    reference = diffusers_pipeline(PROMPT, **common, generator=torch.Generator().manual_seed(9),
                                   output_type="latent").video  # fmt: skip
    assert ours.shape == reference.shape == (1, 48, 1, 3, 5)
    assert (ours - reference).abs().max() <= LATENT_ATOL


def test_reason_then_generate_conditions_on_the_answer_without_recomputing_it(generator, vllm_reasoner) -> None:
    from vllm import SamplingParams

    from cosmos3_serve.sampling.prompts import augment, chat_token_ids

    request = GenerationRequest(PROMPT, NEGATIVE, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                                reason_first=True, reasoning_max_tokens=200)  # fmt: skip
    chat = chat_token_ids(generator.tokenizer, augment(PROMPT, request.spec), request.spec)
    answer = vllm_reasoner.generate({"prompt_token_ids": chat}, SamplingParams(temperature=0.0, max_tokens=200),
                                    use_tqdm=False)[0].outputs[0].token_ids  # fmt: skip
    counts = generator.prompt_token_counts
    total_before, cached_before = counts.total, counts.cached
    reasoned = generator.generate_latents(request)
    context = counts.total - total_before  # prompt tokens of the generation context (not of the reasoning request)
    block = vllm_reasoner.llm_engine.vllm_config.cache_config.block_size
    assert context == len(chat) + len(answer) + 2  # prompt, the reasoner's answer, eos + <|vision_start|>
    assert counts.cached - cached_before >= (len(chat) + len(answer)) // block * block > 0
    plain = generator.generate_latents(GenerationRequest(PROMPT, NEGATIVE, height=32, width=32, num_inference_steps=2,
                                                         guidance_scale=1.0))  # fmt: skip
    assert not torch.allclose(reasoned, plain)  # the answer changes the conditioning


def test_distilled_checkpoint_uses_its_euler_scheduler(tmp_path: Path, vllm_reasoner) -> None:
    """A few-step checkpoint whose scheduler/ is `FlowMatchEulerDiscreteScheduler` (same weights: seed 0), run by
    its own executor on prompt K/V that the session's engine exports."""
    from cosmos3_serve.model_executor.checkpoint.writer import write_checkpoint
    from tests.oracle import load_diffusers_pipeline

    checkpoint = write_checkpoint(tmp_path / "distilled", vocab="compact", action=True, distilled=True,
                                  progress=False)  # fmt: skip
    [worker_device] = vllm_reasoner.collective_rpc(lambda worker: worker.device)
    executor = DiffusionExecutor(checkpoint, vllm_reasoner.llm_engine.vllm_config, worker_device)
    assert type(executor.new_state.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    request = GenerationRequest(PROMPT, NEGATIVE, height=32, width=64, num_inference_steps=4, seed=4)
    reference = load_diffusers_pipeline(checkpoint)(
        PROMPT, negative_prompt=NEGATIVE, num_frames=1, height=32, width=64, num_inference_steps=4,
        generator=torch.Generator().manual_seed(4), output_type="latent",
    ).video  # fmt: skip
    assert (run_alone(executor, vllm_reasoner, checkpoint, request).video - reference).abs().max() <= LATENT_ATOL


def run_alone(executor: DiffusionExecutor, vllm_reasoner, checkpoint: Path, request: GenerationRequest):
    """`request`'s output from `executor` (not the engine's own generator): its prompts prefilled by the session's
    engine, their K/V admitted, stepped until it finishes."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from cosmos3_serve.model_executor import kv_export
    from cosmos3_serve.model_executor.generation_client import GenerationPrompts, new_export_keys

    prompts = GenerationPrompts(AutoTokenizer.from_pretrained(checkpoint / "text_tokenizer")).context(request)
    keys = new_export_keys(len(prompts))
    vllm_reasoner.generate([{"prompt_token_ids": ids} for ids in prompts],
                           [SamplingParams(max_tokens=1, extra_args=kv_export.generation_context_args(k)) for k in keys],
                           use_tqdm=False)  # fmt: skip
    assert executor.admit([("alone", request, [kv_export.PROMPT_KV_STORE.take(k) for k in keys], False)]) == {}
    while "alone" not in executor.finished:
        executor.step()
    return executor.take(["alone"])["alone"]


def test_requests_arriving_mid_run_join_the_batch(generator) -> None:
    early, late = MIXED["image-cfg"], MIXED["video-cfg"]
    admitted = []
    arrivals = iter([{}, {}, {"late": late}])  # at the third step boundary

    def incoming() -> dict[str, GenerationRequest]:
        arrived = next(arrivals, {})
        if arrived:
            admitted.append(True)
        return arrived

    results = generator.generate({"early": early}, incoming=incoming)
    assert admitted == [True] and set(results) == {"early", "late"}
    assert (results["early"].video - generator.generate_latents(early)).abs().max() <= BATCH_ATOL
    assert (results["late"].video - generator.generate_latents(late)).abs().max() <= BATCH_ATOL


def test_flow_shift_per_request_equals_the_reference_with_that_shift(generator, diffusers_pipeline) -> None:
    """A request's `flow_shift` replaces the checkpoint's (10.0) as a diffusers user would: a scheduler from the
    same config with that shift."""
    request = GenerationRequest(PROMPT, NEGATIVE, height=32, width=64, num_inference_steps=3, seed=6, flow_shift=3.0)
    ours = generator.generate_latents(request)
    original = diffusers_pipeline.scheduler
    diffusers_pipeline.scheduler = type(original).from_config(original.config, flow_shift=3.0)
    try:
        reference = diffusers_pipeline(PROMPT, negative_prompt=NEGATIVE, num_frames=1, height=32, width=64,
                                       num_inference_steps=3, generator=torch.Generator().manual_seed(6),
                                       output_type="latent").video  # fmt: skip
    finally:
        diffusers_pipeline.scheduler = original
    default = generator.generate_latents(GenerationRequest(PROMPT, NEGATIVE, height=32, width=64, num_inference_steps=3,
                                                           seed=6))  # fmt: skip
    assert (ours - reference).abs().max() <= LATENT_ATOL
    assert (ours - default).abs().max() > 1e-2  # the shift changes the schedule


def test_the_executor_holds_no_autograd_state(tiny_checkpoint: Path, vllm_reasoner) -> None:
    """diffusers builds the VAE with parameters that require gradients; an encode outside `no_grad` (the memory
    measurement's, at startup) then keeps every activation of every frame chunk for a backward pass."""
    [device] = vllm_reasoner.collective_rpc(lambda worker: worker.device)
    executor = DiffusionExecutor(tiny_checkpoint, vllm_reasoner.llm_engine.vllm_config, device)
    assert not any(p.requires_grad for p in (*executor.codec.vae.parameters(), *executor.tower.parameters()))
    clip = torch.zeros(1, 3, 5, 32, 32)
    assert not executor.codec.encode_by_shape({"clip": clip})["clip"].requires_grad
