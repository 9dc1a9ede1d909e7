"""K/V export: a generation context's per-layer prompt K/V, read from vLLM's paged cache, equal the K/V that
diffusers' `Cosmos3OmniTransformer` computes inside its attention for the same prompt (float32)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch
from diffusers.models.transformers import transformer_cosmos3

from cosmos3_serve.model_executor.kv_export import EXPORT_PARAM, PROMPT_KV_STORE, generation_context_args

ATOL = 1e-4  # float32, two implementations (vLLM CPU kernels vs torch SDPA path)
_keys = (f"export-{i}" for i in itertools.count())


def _reference_prompt_kv(
    pipe, prompt: str, negative_prompt: str, capture: str = "und"
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per forward (cond, then uncond), the prompt's K (after its norms and mRoPE) and V inside diffusers' attention.

    `capture="und"`: as the reasoner attends to them (the causal call); `"gen"`: as the generator's queries see
    them (the first `und_len` keys of the full-attention call, after `k_norm_und_for_gen` where the model has it).
    """
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = transformer_cosmos3.dispatch_attention_fn
    und_len: list[int] = []

    def recording(query, key, value, *args, is_causal=False, **kwargs):
        if is_causal:
            und_len.append(key.shape[1])
            if capture == "und":
                captured.append((key[0].clone(), value[0].clone()))
        elif capture == "gen":
            n = und_len[-1]
            captured.append((key[0, :n].clone(), value[0, :n].clone()))
        return original(query, key, value, *args, is_causal=is_causal, **kwargs)

    with mock.patch.object(transformer_cosmos3, "dispatch_attention_fn", recording):
        pipe(prompt, negative_prompt=negative_prompt, num_frames=1, height=32, width=32, num_inference_steps=1,
             guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
    num_layers = pipe.transformer.config.num_hidden_layers
    forwards = [captured[i : i + num_layers] for i in range(0, len(captured), num_layers)]
    return [([k for k, _ in layers], [v for _, v in layers]) for layers in forwards]


def _export(llm, token_ids: list[int]):
    from vllm import SamplingParams

    key = next(_keys)
    params = SamplingParams(max_tokens=1, extra_args=generation_context_args(key))
    output = llm.generate({"prompt_token_ids": token_ids}, params, use_tqdm=False)[0]
    assert output.kv_transfer_params == {EXPORT_PARAM: key, "num_prompt_tokens": len(token_ids)}
    return output, PROMPT_KV_STORE.take(key)


def test_vllm_runs_our_reasoner_class(vllm_reasoner) -> None:
    names = vllm_reasoner.collective_rpc(lambda worker: type(worker.model_runner.get_model()).__name__)
    assert names == ["Cosmos3ReasonerForConditionalGeneration"]


def test_exported_prompt_kv_equals_diffusers(vllm_reasoner, diffusers_pipeline) -> None:
    prompt, negative = "A robot arm picks up a red cube.", "blurry, low quality"
    cond_ids, uncond_ids = diffusers_pipeline.tokenize_prompt(prompt, negative, num_frames=1, height=32, width=32)
    reference = _reference_prompt_kv(diffusers_pipeline, prompt, negative)
    assert len(reference) == 2  # CFG: cond and uncond forwards

    for token_ids, (ref_keys, ref_values) in zip((cond_ids, uncond_ids), reference):
        _, exported = _export(vllm_reasoner, token_ids)
        assert exported.num_tokens == len(token_ids) == ref_keys[0].shape[0]
        assert len(exported.keys) == len(ref_keys) == diffusers_pipeline.transformer.config.num_hidden_layers
        for layer, (k, v, ref_k, ref_v) in enumerate(zip(exported.keys, exported.values, ref_keys, ref_values)):
            torch.testing.assert_close(k, ref_k, rtol=0, atol=ATOL, msg=f"K of layer {layer}")
            torch.testing.assert_close(v, ref_v, rtol=0, atol=ATOL, msg=f"V of layer {layer}")


def test_second_identical_prompt_is_served_from_the_prefix_cache(vllm_reasoner, diffusers_pipeline) -> None:
    # Long enough to fill whole KV blocks (the CPU backend uses 128-token blocks; only full blocks are cached).
    prompt = "A robot arm stacks cubes on a table in a bright kitchen, " * 20
    cond_ids, _ = diffusers_pipeline.tokenize_prompt(prompt, None, num_frames=1, height=32, width=32)
    first_output, first = _export(vllm_reasoner, cond_ids)
    second_output, second = _export(vllm_reasoner, cond_ids)
    block = vllm_reasoner.llm_engine.vllm_config.cache_config.block_size
    assert first_output.num_cached_tokens == 0
    assert second_output.num_cached_tokens == (len(cond_ids) - 1) // block * block > 0
    for k1, v1, k2, v2 in zip(first.keys, first.values, second.keys, second.values):
        torch.testing.assert_close(k2, k1, rtol=0, atol=0)  # cached blocks are the same bytes
        torch.testing.assert_close(v2, v1, rtol=0, atol=0)


def test_requests_without_the_flag_export_nothing(vllm_reasoner) -> None:
    from vllm import SamplingParams

    before = len(PROMPT_KV_STORE)
    output = vllm_reasoner.generate({"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert output.kv_transfer_params is None and len(PROMPT_KV_STORE) == before


def test_store_take_forgets() -> None:
    from cosmos3_serve.model_executor.kv_export import PromptKV

    PROMPT_KV_STORE.put("k", PromptKV.from_layers([torch.zeros(2, 1, 4)], [torch.ones(2, 1, 4)]))
    assert "k" in PROMPT_KV_STORE and PROMPT_KV_STORE.take("k").nbytes == 2 * 2 * 4 * 4
    assert "k" not in PROMPT_KV_STORE


def test_generator_key_norm_variant_exports_renormalised_keys(tmp_path: Path) -> None:
    """Towers without q/k norms whose generator re-normalises the reasoner's keys (`k_norm_und_for_gen`)."""
    from cosmos3_serve.model_executor.checkpoint.writer import write_checkpoint
    from tests.oracle import load_diffusers_pipeline

    checkpoint = write_checkpoint(tmp_path / "knorm", vocab="compact", und_k_norm_for_gen=True, progress=False)
    pipe = load_diffusers_pipeline(checkpoint)
    assert pipe.transformer.layers[0].self_attn.k_norm_und_for_gen is not None
    prompt, negative = "A robot arm picks up a red cube.", ""
    token_ids = pipe.tokenize_prompt(prompt, negative, num_frames=1, height=32, width=32)
    reference = _reference_prompt_kv(pipe, prompt, negative, capture="gen")

    out = tmp_path / "exported.pt"
    subprocess.run([sys.executable, "-m", "tests.export_prompt_kv", str(checkpoint), str(out),
                    json.dumps([list(ids) for ids in token_ids])], check=True, capture_output=True)  # fmt: skip
    for exported, (ref_keys, ref_values) in zip(torch.load(out), reference):
        for layer, (k, v, ref_k, ref_v) in enumerate(zip(exported["keys"], exported["values"], ref_keys, ref_values)):
            torch.testing.assert_close(k, ref_k, rtol=0, atol=ATOL, msg=f"K of layer {layer}")
            torch.testing.assert_close(v, ref_v, rtol=0, atol=ATOL, msg=f"V of layer {layer}")
