"""The reference implementations our outputs are compared against, loaded on a checkpoint as released.

- Generator: diffusers' `Cosmos3OmniPipeline` (`enable_safety_checker=False`: the guardrail needs downloads).
- FP8: diffusers' pipeline with its linears computing the ModelOpt FP8 format by hand (`hand_written_fp8`), and
  with its generator attention's inputs rounded to e4m3 by hand (`hand_written_fp8_attention`).
- Reasoner: transformers' `Cosmos3OmniForConditionalGeneration` with its own unified-layout key renames. The
  released layout keeps the reasoner's weights in `transformer/` and `vision_encoder/`, not at the root, so a
  view directory links the root files and lists both safetensors in a `model.safetensors.index.json`; the
  checkpoint itself stays as released.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

REASONER_WEIGHT_FILES = ("transformer/diffusion_pytorch_model.safetensors", "vision_encoder/model.safetensors")


@dataclass
class Greedy:
    tokens: list[int]
    top_logprobs: list[dict[int, float]]  # per generated token: token id -> log-probability, the top k


@dataclass
class Reasoner:
    model: Any  # Cosmos3OmniForConditionalGeneration
    processor: Any  # Qwen3VLProcessor

    @torch.no_grad()
    def greedy(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, top_k: int = 5) -> Greedy:
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        top = []
        for step_logits in out.logits:
            logprobs = torch.log_softmax(step_logits[0].float(), dim=-1)
            values, indices = logprobs.topk(top_k)
            top.append(dict(zip(indices.tolist(), values.tolist())))
        return Greedy(tokens=tokens, top_logprobs=top)

    def inputs(self, prompt: str, images=None, videos=None, video_metadata=None) -> dict[str, torch.Tensor]:
        """Processor inputs for an already rendered prompt (vLLM renders the chat template the same way)."""
        kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
        if images is not None:
            kwargs["images"] = images
        if videos is not None:
            kwargs["videos"] = videos
            metadata = [{k: v for k, v in m.items() if k != "do_sample_frames"} for m in video_metadata]
            kwargs["videos_kwargs"] = {"video_metadata": metadata, "do_sample_frames": False}
        return dict(self.processor(**kwargs))

    def render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_diffusers_pipeline(checkpoint: Path, dtype: torch.dtype = torch.float32):
    from diffusers import Cosmos3OmniPipeline

    return Cosmos3OmniPipeline.from_pretrained(checkpoint, enable_safety_checker=False, dtype=dtype)


def load_transformers_reasoner(checkpoint: Path, view_dir: Path, dtype: torch.dtype = torch.float32) -> Reasoner:
    from transformers import AutoProcessor, Cosmos3OmniForConditionalGeneration

    view_dir.mkdir(parents=True, exist_ok=True)
    for entry in checkpoint.iterdir():
        link = view_dir / entry.name
        if not link.exists():
            link.symlink_to(entry.resolve())
    weight_map = {}
    for relpath in REASONER_WEIGHT_FILES:
        with safe_open(checkpoint / relpath, "pt") as f:
            weight_map.update({key: relpath for key in f.keys()})
    (view_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    model, info = Cosmos3OmniForConditionalGeneration.from_pretrained(view_dir, dtype=dtype, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"transformers could not load the reasoner: {info}")
    return Reasoner(model=model.eval(), processor=AutoProcessor.from_pretrained(checkpoint))


FLOAT8_E4M3_MAX = 448.0


def hand_written_fp8(pipeline, quantized: dict[str, torch.Tensor], activation_16bit: dict[str, bool] | None = None):
    """`pipeline` (diffusers', 16-bit) with every linear that `quantized` (a ModelOpt FP8 checkpoint's
    `transformer/` tensors) quantizes computing FP8 W8A8 per-tensor by hand: the input scaled by its
    `input_scale`, rounded to e4m3, times the e4m3 weight, both scales applied to the float32 product; while
    `activation_16bit["now"]`, W8A16 instead: the 16-bit input times the weight dequantized to the input's dtype."""
    mode = activation_16bit if activation_16bit is not None else {"now": False}
    for name, module in pipeline.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.weight_scale" in quantized:
            weight = quantized[f"{name}.weight"].float()
            scale, input_scale = quantized[f"{name}.weight_scale"], quantized[f"{name}.input_scale"]

            def forward(x, weight=weight, scale=scale, input_scale=input_scale, bias=module.bias):
                if mode["now"]:
                    return torch.nn.functional.linear(x, (weight * scale).to(x.dtype), bias)
                x8 = (x.float() / input_scale).clamp(-FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX).to(torch.float8_e4m3fn).float()
                y = (x8 @ weight.t()) * (input_scale * scale)
                return (y if bias is None else y + bias.float()).to(x.dtype)

            module.forward = forward
    return pipeline


@contextmanager
def hand_written_fp8_attention():
    """diffusers' Cosmos 3 transformer with its generator pathway's attention (generator queries over the prompt's
    and the generator's keys and values) taking FP8 inputs by hand: each of q, k, v rounded to e4m3 with one scale
    (its largest magnitude maps to e4m3's largest value) and back, the attention itself as diffusers computes it."""
    from diffusers.models.transformers import transformer_cosmos3

    original = transformer_cosmos3.dispatch_attention_fn

    def rounded(x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax().float() / FLOAT8_E4M3_MAX
        return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)

    def fp8_inputs(query, key, value, *args, is_causal: bool = False, **kwargs):
        if not is_causal:
            query, key, value = rounded(query), rounded(key), rounded(value)
        return original(query, key, value, *args, is_causal=is_causal, **kwargs)

    transformer_cosmos3.dispatch_attention_fn = fp8_inputs
    try:
        yield
    finally:
        transformer_cosmos3.dispatch_attention_fn = original
