"""The reasoner plugin on a Hopper GPU (vLLM 0.26): FlashAttention 3, CUDA graphs, K/V export from the FA paged
cache equal to diffusers' K/V (bf16), and video pruning. Skipped without CUDA; run on the GPU machine with
`COSMOS3_TEST_CHECKPOINT` set (see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor import kv_export
from tests import media
from tests.test_kv_export import _reference_prompt_kv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from tests.gpu.conftest import PRUNING_RATE

BF16_REL_TOL = 2e-2  # ||vLLM bf16 - diffusers float32|| / ||diffusers float32||, per layer


def test_runs_our_class_with_flash_attention_3_and_cuda_graphs(gpu_reasoner) -> None:
    """Also: the decoder layers' attention runs through our op (`decode_attention`), which the compiled graph is
    split at like vLLM's attention ops."""
    from cosmos3_serve.model_executor.plugin import ATTENTION_OP

    def describe(worker) -> tuple[str, str, int, str, bool, bool]:
        model = worker.model_runner.get_model()
        attention = next(m for m in model.modules() if type(m).__name__ == "Attention")
        config = worker.vllm_config.compilation_config
        layers = model.language_model.model.layers
        return (type(model).__name__, attention.attn_backend.get_name(),
                getattr(attention.impl, "vllm_flash_attn_version", 0), str(config.cudagraph_mode),
                ATTENTION_OP in config.splitting_ops, all(layer.fused_attention for layer in layers))  # fmt: skip

    [(model_class, backend, fa_version, cudagraph_mode, split, fused)] = gpu_reasoner.collective_rpc(describe)
    assert (model_class, backend, fa_version) == ("Cosmos3ReasonerForConditionalGeneration", "FLASH_ATTN", 3)
    assert "NONE" not in cudagraph_mode
    assert split and fused


def test_exported_kv_equals_diffusers(gpu_reasoner, tiny_checkpoint: Path) -> None:
    from vllm import SamplingParams

    from tests.oracle import load_diffusers_pipeline

    pipe = load_diffusers_pipeline(tiny_checkpoint, dtype=torch.float32).to("cuda")
    prompt, negative = "A robot arm picks up a red cube.", "blurry"
    token_ids = pipe.tokenize_prompt(prompt, negative, num_frames=1, height=32, width=32)
    reference = _reference_prompt_kv(pipe, prompt, negative)
    for i, (ids, (ref_keys, ref_values)) in enumerate(zip(token_ids, reference)):
        params = SamplingParams(max_tokens=1, extra_args=kv_export.generation_context_args(f"gpu-{i}"))
        gpu_reasoner.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
        exported = kv_export.PROMPT_KV_STORE.take(f"gpu-{i}")
        for ours, theirs in zip((*exported.keys, *exported.values), (*ref_keys, *ref_values)):
            assert ours.is_cuda and ours.dtype == torch.bfloat16
            error = (ours.float() - theirs.float()).norm() / theirs.float().norm()
            assert error <= BF16_REL_TOL, error


def test_video_pruning_on_gpu(gpu_reasoner) -> None:
    from vllm import SamplingParams

    frames = media.smooth_video(seed=4, num_frames=16, height=64, width=64)
    prompt = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n<|im_start|>assistant\n"
    request = {"prompt": prompt, "multi_modal_data": {"video": (frames, media.video_metadata(16, 4.0))}}
    out = gpu_reasoner.generate(request, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    video_tokens = 8 * 4  # 8 temporal patches of (64 / 32)^2 merged tokens
    retained = max(4, int(video_tokens * (1 - PRUNING_RATE)))  # EVS keeps the first frame whole
    video_token_id = gpu_reasoner.llm_engine.model_config.hf_config.video_token_id
    assert out.prompt_token_ids.count(video_token_id) == retained
    assert len(out.outputs[0].token_ids) == 4
