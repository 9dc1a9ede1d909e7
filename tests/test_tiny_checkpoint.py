"""`cosmos3-serve make-tiny`: the released unified layout, deterministic weights, real token ids and shapes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from cosmos3_serve.model_executor.checkpoint.writer import write_checkpoint

LAYOUT_FILES = (
    "model_index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vision_encoder/config.json",
    "vision_encoder/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "text_tokenizer/tokenizer.json",
    "text_tokenizer/tokenizer_config.json",
)
WEIGHT_FILES = [f for f in LAYOUT_FILES if f.endswith(".safetensors")]


def _keys(path: Path) -> set[str]:
    with safe_open(path, "pt") as f:
        return set(f.keys())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_matches_the_released_checkpoint(tiny_checkpoint: Path) -> None:
    for relpath in LAYOUT_FILES:
        assert (tiny_checkpoint / relpath).is_file(), relpath
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "Cosmos3OmniDiffusersPipeline"
    assert index["transformer"] == ["diffusers", "Cosmos3OmniTransformer"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert "enable_safety_checker" not in index

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "cosmos3_omni"
    assert config["architectures"] == ["Cosmos3ForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "qwen3_vl_text"
    vae = json.loads((tiny_checkpoint / "vae/config.json").read_text())
    assert (vae["z_dim"], vae["scale_factor_spatial"], vae["scale_factor_temporal"]) == (48, 16, 4)
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == 48


def test_weight_keys_are_flat_and_hold_both_towers(tiny_checkpoint: Path) -> None:
    transformer = _keys(tiny_checkpoint / "transformer/diffusion_pytorch_model.safetensors")
    for reasoner_key in ("embed_tokens.weight", "norm.weight", "lm_head.weight", "layers.0.self_attn.to_q.weight",
                         "layers.0.self_attn.to_out.weight", "layers.0.self_attn.norm_k.weight",
                         "layers.1.mlp.gate_proj.weight", "layers.1.input_layernorm.weight"):
        assert reasoner_key in transformer
    for generator_key in ("layers.0.self_attn.add_q_proj.weight", "layers.0.self_attn.to_add_out.weight",
                          "layers.0.self_attn.norm_added_k.weight", "layers.1.mlp_moe_gen.down_proj.weight",
                          "layers.1.input_layernorm_moe_gen.weight", "norm_moe_gen.weight", "proj_in.weight",
                          "proj_out.bias", "time_embedder.linear_1.weight", "action_proj_in.fc.weight",
                          "action_modality_embed"):
        assert generator_key in transformer
    assert not any(k.startswith("model.") for k in transformer)
    vision_prefixes = {k.split(".", 1)[0] for k in _keys(tiny_checkpoint / "vision_encoder/model.safetensors")}
    assert vision_prefixes == {"blocks", "merger", "patch_embed", "pos_embed", "deepstack_merger_list"}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, tiny_checkpoint: Path) -> None:
    again = write_checkpoint(tmp_path / "again", seed=0, vocab="compact", action=True, progress=False)
    other = write_checkpoint(tmp_path / "other", seed=1, vocab="compact", action=True, progress=False)
    for relpath in WEIGHT_FILES:
        assert _digest(again / relpath) == _digest(tiny_checkpoint / relpath), relpath
        assert _digest(other / relpath) != _digest(tiny_checkpoint / relpath), relpath
    assert (again / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()


def test_qwen_vocab_puts_special_tokens_at_their_real_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ckpt = write_checkpoint(tmp_path / "qwen", shape="nano", vocab="qwen", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "text_tokenizer")
    # Published ids of Qwen2.5 / Qwen3 (and the Cosmos3OmniConfig defaults).
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656, "</think>": 151668}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["image_token_id"], config["video_token_id"]) == (151655, 151656)
    assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (151652, 151653)
    assert config["text_config"]["vocab_size"] == 151936
    text = "A robot arm stacks 3 cubes, then waves. ¿Qué? 日本"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize(
    "shape, dims",
    [
        # Qwen3-8B-shaped towers (diffusers' Cosmos3OmniTransformer defaults) and Qwen3-32B-shaped ones.
        ("nano", dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=12288)),
        ("super", dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                       head_dim=128, intermediate_size=25600)),
    ],
)
def test_real_shapes_write_configs_only(tmp_path: Path, shape: str, dims: dict) -> None:
    ckpt = write_checkpoint(tmp_path / shape, shape=shape, vocab="qwen", progress=False)
    assert not list(ckpt.rglob("*.safetensors"))
    transformer = json.loads((ckpt / "transformer/config.json").read_text())
    text = json.loads((ckpt / "config.json").read_text())["text_config"]
    for name, value in dims.items():
        assert transformer[name] == value, name
        assert text[name] == value, name
    assert transformer["rope_axes_dim"] == text["rope_parameters"]["mrope_section"] == [24, 20, 20]
    assert transformer["patch_latent_dim"] == 192 and transformer["rope_theta"] == 5e6


def test_cli_writes_with_a_progress_bar(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cosmos3_serve.server.cli", "make-tiny", str(tmp_path / "cli"), "--vocab", "compact",
         "--seed", "3", "--action"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "writing tiny weights" in result.stderr and "100%" in result.stderr
    transformer = json.loads((tmp_path / "cli/transformer/config.json").read_text())
    assert transformer["action_gen"] is True and transformer["action_dim"] == 8
