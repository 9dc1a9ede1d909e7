"""`cosmos3-serve quantize` on the tiny checkpoint (ModelOpt calibration on the CPU) and the FP8 checkpoint it writes
served in both towers by vLLM's ModelOpt kernels on the CPU, against hand-computed scales, a hand-written FP8
forward in diffusers' pipeline, and the 16-bit references.

Random weights have no outliers and a flat output distribution: they bound the numerics of the format, not the
quality on a trained model (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cosmos3_serve.quant.modelopt_format import FP4_MAX, FP8_MAX, FUSED_GROUPS, is_excluded
from cosmos3_serve.server.cli import main as cli_main
from tests import oracle
from safetensors import safe_open

pytest.importorskip("modelopt")

CALIBRATION = ["--steps", "3", "--shape", "64x64x5", "--device", "cpu", "--a16-steps", "0"]
PROMPT = "a red cube slides across a wooden table"


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    with safe_open(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _group_members(module: str) -> list[str]:
    for group in FUSED_GROUPS:
        for member in group:
            if module.endswith("." + member):
                prefix = module[: -len(member)]
                return [prefix + m for m in group]
    return [module]


@pytest.fixture(scope="module")
def fp8_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp8") / "cosmos3-tiny-fp8"
    assert cli_main(["quantize", str(tiny_checkpoint), str(out), "--precision", "fp8", *CALIBRATION]) == 0
    return out


@pytest.fixture(scope="module")
def nvfp4_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nvfp4") / "cosmos3-tiny-nvfp4"
    assert cli_main(["quantize", str(tiny_checkpoint), str(out), "--precision", "nvfp4", *CALIBRATION]) == 0
    return out


def test_fp8_checkpoint_holds_each_fused_groups_weight_range_and_keeps_the_excluded_modules(
    tiny_checkpoint: Path, fp8_checkpoint: Path
) -> None:
    source, quantized = _tensors(tiny_checkpoint), _tensors(fp8_checkpoint)
    scaled = sorted(key.removesuffix(".weight_scale") for key in quantized if key.endswith(".weight_scale"))
    assert len(scaled) == 2 * 14  # both towers' 14 linears in each of the 2 layers
    for module in scaled:
        members = _group_members(module)
        expected_scale = max(source[f"{m}.weight"].abs().max() for m in members) / FP8_MAX
        assert quantized[f"{module}.weight"].dtype == torch.float8_e4m3fn
        assert torch.allclose(quantized[f"{module}.weight_scale"], expected_scale, rtol=1e-6)
        assert {float(quantized[f"{m}.input_scale"]) for m in members} == {float(quantized[f"{module}.input_scale"])}
        restored = quantized[f"{module}.weight"].float() * quantized[f"{module}.weight_scale"]
        original = source[f"{module}.weight"].float()
        # e4m3 keeps 3 mantissa bits: half a step is 2^-4 of the value, 2^-10 of the scale below the normals
        assert ((restored - original).abs() <= original.abs() * 2**-4 + expected_scale * 2**-10).all()
    kept = [key for key in source if key not in quantized or quantized[key].dtype == source[key].dtype]
    for key in kept:
        assert torch.equal(quantized[key], source[key]), key
    assert all(is_excluded(key.removesuffix(".weight")) for key in ("proj_in.weight", "lm_head.weight",
                                                                    "time_embedder.linear_1.weight"))  # fmt: skip
    assert not any(is_excluded(module) for module in scaled)

    root = json.loads((fp8_checkpoint / "config.json").read_text())["quantization_config"]
    own = json.loads((fp8_checkpoint / "transformer" / "config.json").read_text())["quantization_config"]
    summary = json.loads((fp8_checkpoint / "hf_quant_config.json").read_text())
    assert (root["quant_method"], root["quant_algo"], summary["quantization"]["quant_algo"]) == ("modelopt", "FP8",
                                                                                                 "FP8")  # fmt: skip
    assert "runtime" not in root and own["runtime"]["diffusion_step_policy"]["first_steps"]["count"] == 0


def test_nvfp4_checkpoint_unpacks_to_the_weights_within_half_a_step(tiny_checkpoint: Path,
                                                                     nvfp4_checkpoint: Path) -> None:  # fmt: skip
    source, quantized = _tensors(tiny_checkpoint), _tensors(nvfp4_checkpoint)
    scaled = sorted(key.removesuffix(".weight_scale_2") for key in quantized if key.endswith(".weight_scale_2"))
    assert len(scaled) == 2 * 14
    for module in scaled:
        original = source[f"{module}.weight"].float()
        out_features, in_features = original.shape
        packed, block_scales = quantized[f"{module}.weight"], quantized[f"{module}.weight_scale"]
        assert packed.dtype == torch.uint8 and packed.shape == (out_features, in_features // 2)
        assert block_scales.dtype == torch.float8_e4m3fn and block_scales.shape == (out_features, in_features // 16)
        global_scale = max(source[f"{m}.weight"].abs().max() for m in _group_members(module)) / (FP4_MAX * FP8_MAX)
        assert torch.allclose(quantized[f"{module}.weight_scale_2"], global_scale, rtol=1e-6)
        step = block_scales.float().repeat_interleave(16, dim=1) * quantized[f"{module}.weight_scale_2"]
        restored = oracle.nvfp4_weight(packed, block_scales, quantized[f"{module}.weight_scale_2"])
        # the largest gap of e2m1 (4 -> 6) is 2 steps: at most one step off, plus the block scale's own rounding
        assert ((restored - original).abs() <= step * 1.0 + original.abs() * 2**-4).all(), module
        assert float((restored - original).norm() / original.norm()) < 0.2


ONE_STEP = dict(prompt=PROMPT, num_frames=5, height=64, width=64, num_inference_steps=1, guidance_scale=1.0, seed=3)
FOUR_STEPS = dict(prompt=PROMPT, num_frames=5, height=64, width=64, num_inference_steps=4, guidance_scale=1.0, seed=5)
TEXT = "Robots sort parcels in a warehouse while a conveyor belt carries boxes past a scanner. " * 4


def _serve(checkpoint: Path, out: Path, a16_steps: int | None, requests: list[dict], text: str = "") -> dict:
    """`tests.quantized_engine_probe` on `checkpoint`: vLLM with our plugin, both towers at its precision."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    spec = {"a16_steps": a16_steps, "requests": requests, "text": text}
    subprocess.run([sys.executable, "-m", "tests.quantized_engine_probe", str(checkpoint), str(out), json.dumps(spec)],
                   check=True, env=env, timeout=900)  # fmt: skip
    return torch.load(out)


@pytest.fixture(scope="module")
def fp8_served(fp8_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every step W8A8 (the checkpoint's step policy has no 16-bit step)."""
    return _serve(fp8_checkpoint, tmp_path_factory.mktemp("fp8-served") / "out.pt", None, [ONE_STEP, FOUR_STEPS],
                  TEXT)  # fmt: skip


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def test_fp8_towers_report_their_quantized_linears(fp8_served: dict) -> None:
    towers = fp8_served["towers"]
    # per layer (2): fused qkv, o, fused gate_up, down; the LM head, the vision encoder and the generator's patch and
    # time projections stay 16-bit
    assert towers["reasoner"]["linear_layers"]["fp8"] == 8 and towers["generator"]["linear_layers"]["fp8"] == 8
    assert towers["generator"]["linear_layers"]["bfloat16"] >= 2 and towers["generator"]["weights_gib"] > 0


def test_fp8_generator_step_follows_a_hand_written_fp8_forward(fp8_served: dict, fp8_checkpoint: Path,
                                                                tiny_checkpoint: Path) -> None:  # fmt: skip
    ours = fp8_served["latents"][0]
    arguments = {**{k: v for k, v in ONE_STEP.items() if k != "seed"}, "output_type": "latent"}
    reference_16bit = oracle.load_diffusers_pipeline(tiny_checkpoint, torch.bfloat16)
    sixteen = reference_16bit(**arguments, generator=torch.Generator().manual_seed(3)).video
    by_hand = oracle.hand_written_quantized(reference_16bit, _tensors(fp8_checkpoint))(
        **arguments, generator=torch.Generator().manual_seed(3)).video
    assert _relative(ours, by_hand) < 0.03  # same format: bf16 rounding and summation order apart
    assert _relative(ours, by_hand) < 0.75 * _relative(by_hand, sixteen)  # nearer FP8 than FP8 is to 16-bit
    assert _relative(ours, sixteen) < 0.08  # the quality bound of one FP8 step on this stand-in


def test_first_and_last_steps_at_16bit_activations_follow_the_hand_written_schedule(
    fp8_served: dict, fp8_checkpoint: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    [mixed] = _serve(fp8_checkpoint, tmp_path / "a16.pt", 1, [FOUR_STEPS])["latents"]
    all_fp8 = fp8_served["latents"][1]
    mode = {"now": True}

    def schedule(_pipeline, step: int, _timestep, callback_kwargs):
        mode["now"] = step + 1 == 3  # the next step: the first and the last of 4 at 16-bit activations
        return callback_kwargs

    pipeline = oracle.hand_written_quantized(oracle.load_diffusers_pipeline(tiny_checkpoint, torch.bfloat16),
                                 _tensors(fp8_checkpoint), mode)  # fmt: skip
    arguments = {k: v for k, v in FOUR_STEPS.items() if k != "seed"}
    by_hand = pipeline(**arguments, generator=torch.Generator().manual_seed(5), output_type="latent",
                       callback_on_step_end=schedule).video  # fmt: skip
    assert _relative(mixed, by_hand) < 0.75 * _relative(all_fp8, by_hand)  # the 16-bit steps are W8A16


def test_fp8_reasoner_predicts_the_16bit_reasoners_next_tokens(fp8_served: dict, vllm_reasoner) -> None:
    from vllm import SamplingParams

    [sixteen] = vllm_reasoner.generate([TEXT], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    top1 = [next(t for t, logprob in position.items() if logprob.rank == 1) for position in sixteen.prompt_logprobs[1:]]
    agreement = sum(a == b for a, b in zip(fp8_served["top1"], top1)) / len(top1)
    # Random weights give flat logits, whose top-1 flips at small perturbations; a tower loaded wrongly agrees on
    # about one position in the vocabulary's size (640).
    assert agreement >= 0.6, agreement


def test_nvfp4_activation_rounding_by_hand() -> None:
    """The oracle's NVFP4 activation path on values worked out by hand: one e4m3 scale per block of 16 (its largest
    magnitude over 6, over the global scale), each element to the nearest e2m1 value."""
    first = torch.tensor([6.0, 3.0, 1.2, -0.3, 0.1, -4.4, 2.6, 0.0] + [0.0] * 8)  # block scale 6 / 6 / 0.5 = 2, step 1
    second = torch.tensor([12.0, 5.2, -1.1, 0.6] + [0.0] * 12)  # global 0.5: block scale 12 / 6 / 0.5 = 4, step 2
    got = oracle.nvfp4_round_trip(torch.stack([torch.cat([first, second])]), torch.tensor(0.5))
    expected_first = torch.tensor([6.0, 3.0, 1.0, -0.5, 0.0, -4.0, 3.0, 0.0] + [0.0] * 8)
    expected_second = torch.tensor([12.0, 6.0, -1.0, 1.0] + [0.0] * 12)
    assert torch.equal(got[0], torch.cat([expected_first, expected_second]))
