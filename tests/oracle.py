"""The reference implementations our outputs are compared against, loaded on a checkpoint as released.

- Generator: diffusers' `Cosmos3OmniPipeline` (`enable_safety_checker=False`: the guardrail needs downloads).
- FP8 and NVFP4: diffusers' pipeline (or transformers' reasoner) with its linears computing the ModelOpt format by
  hand (`hand_written_quantized`, `linears_by_hand`: FP8 per tensor; NVFP4 e2m1 weights and inputs in blocks of 16
  with e4m3 block scales and a float32 global scale each), and with its generator attention's inputs rounded to
  e4m3 by hand (`hand_written_fp8_attention`).
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


def hand_written_quantized(pipeline, quantized: dict[str, torch.Tensor],
                           activation_16bit: dict[str, bool] | None = None):  # fmt: skip
    """`pipeline` (diffusers', 16-bit) with every linear that `quantized` (a ModelOpt FP8 or NVFP4 checkpoint's
    `transformer/` tensors) quantizes computing its format by hand (`linears_by_hand`)."""
    linears_by_hand(dict(pipeline.transformer.named_modules()), quantized, activation_16bit)
    return pipeline


def linears_by_hand(modules: dict[str, torch.nn.Module], quantized: dict[str, torch.Tensor],
                    activation_16bit: dict[str, bool] | None = None) -> int:  # fmt: skip
    """Every `torch.nn.Linear` of `modules` (by its checkpoint name) that `quantized` (a ModelOpt checkpoint's
    `transformer/` tensors) quantizes computes the checkpoint's format by hand; returns how many. FP8: the input
    scaled by its `input_scale`, rounded to e4m3, times the e4m3 weight, both scales applied to the float32
    product. NVFP4: the input and the weight each through their e2m1 blocks (`nvfp4_round_trip`, `nvfp4_weight`),
    their product in float32. While `activation_16bit["now"]`, W8A16 / W4A16 instead: the 16-bit input times the
    weight dequantized to the input's dtype."""
    mode = activation_16bit if activation_16bit is not None else {"now": False}
    count = 0
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Linear) or f"{name}.input_scale" not in quantized:
            continue
        input_scale = quantized[f"{name}.input_scale"]
        if f"{name}.weight_scale_2" in quantized:  # NVFP4
            weight = nvfp4_weight(quantized[f"{name}.weight"], quantized[f"{name}.weight_scale"],
                                  quantized[f"{name}.weight_scale_2"])  # fmt: skip

            def activations(x: torch.Tensor, input_scale=input_scale) -> torch.Tensor:
                return nvfp4_round_trip(x, input_scale)
        else:
            weight = quantized[f"{name}.weight"].float() * quantized[f"{name}.weight_scale"]

            def activations(x: torch.Tensor, input_scale=input_scale) -> torch.Tensor:
                scaled = (x.float() / input_scale).clamp(-FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX)
                return scaled.to(torch.float8_e4m3fn).float() * input_scale

        def forward(x, weight=weight, activations=activations, bias=module.bias):
            if mode["now"]:
                return torch.nn.functional.linear(x, weight.to(x.dtype), bias)
            y = activations(x) @ weight.t()
            return (y if bias is None else y + bias.float()).to(x.dtype)

        module.forward = forward
        count += 1
    return count


E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the magnitudes of a float4 e2m1
NVFP4_BLOCK = 16


def nvfp4_weight(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """A ModelOpt NVFP4 weight `[out, in]` in float32: two e2m1 codes per byte of `packed` (`[out, in / 2]`, the
    even element in the low nibble, the sign in each nibble's high bit) times its block's e4m3 scale
    (`[out, in / 16]`) times the tensor's `global_scale` (`weight_scale_2`)."""
    out_features = packed.shape[0]
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(out_features, -1).long()
    values = E2M1_VALUES[codes & 0x7] * torch.where(codes >= 8, -1.0, 1.0)
    return values * block_scales.float().repeat_interleave(NVFP4_BLOCK, dim=1) * global_scale.float()


def nvfp4_round_trip(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """`x` (last dim a multiple of 16) quantized to NVFP4 as an activation is at run time, and back, in float32:
    each block of 16 gets the e4m3 scale that maps its largest magnitude to e2m1's largest (6) over `global_scale`
    (the checkpoint's `input_scale`), and each element the nearest e2m1 value of its scaled magnitude."""
    blocks = x.float().reshape(*x.shape[:-1], -1, NVFP4_BLOCK)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / (E2M1_VALUES[-1] * global_scale.float())
    scale = scale.clamp(max=FLOAT8_E4M3_MAX).to(torch.float8_e4m3fn).float() * global_scale.float()
    scaled = (blocks / torch.where(scale > 0, scale, 1.0)).clamp(-E2M1_VALUES[-1], E2M1_VALUES[-1])
    midpoints = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2
    rounded = E2M1_VALUES[torch.bucketize(scaled.abs(), midpoints)] * scaled.sign()
    return (rounded * scale).reshape(x.shape)


def checkpoint_names(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    """`model`'s linear layers by their name in the checkpoint whose tensors are `source` (found by their weights,
    which `model` loaded from it unchanged), for `linears_by_hand` on a model that renames the checkpoint's keys."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for key, tensor in source.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            by_shape.setdefault(tuple(tensor.shape), []).append(key)
    named = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach()
            for key in by_shape.get(tuple(weight.shape), []):
                if torch.equal(source[key].to(weight.dtype), weight):
                    named[key.removesuffix(".weight")] = module
                    break
    return named


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
