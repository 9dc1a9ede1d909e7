"""`cosmos3-serve quantize CKPT OUT --precision fp8|nvfp4`: a 16-bit Cosmos 3 checkpoint calibrated on prompts
(`calibration.calibrate`) and written as a ModelOpt checkpoint in the released layout (`modelopt_format`), which
`serve` loads in both towers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from cosmos3_serve.quant import modelopt_format
from cosmos3_serve.quant.calibration import CalibrationShape, calibrate
from cosmos3_serve.quant.modelopt_format import StepPolicy
from safetensors.torch import save_file
from tqdm import tqdm

SHARD_BYTES = 5 << 30
TRANSFORMER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def quantized_tensors(transformer: torch.nn.Module, precision: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the calibrated `transformer` under its diffusers key: each quantized linear's weight in
    `precision` with its scales, everything else as it was."""
    from modelopt.torch.export.quant_utils import (
        get_activation_scaling_factor,
        get_quantization_format,
        get_weight_block_size,
        get_weight_scaling_factor,
        get_weight_scaling_factor_2,
        to_quantized_weight,
    )

    quantized: set[str] = set()
    for name, module in transformer.named_modules():
        if get_quantization_format(module) not in ("fp8", "nvfp4") or not hasattr(module, "weight"):
            continue
        weight_scale = get_weight_scaling_factor(module)
        weight_scale_2 = get_weight_scaling_factor_2(module)
        weight = to_quantized_weight(module.weight.detach().float(), weight_scale, precision, weight_scale_2,
                                     get_weight_block_size(module))  # fmt: skip
        yield f"{name}.weight", weight.contiguous()
        yield f"{name}.weight_scale", _scale(weight_scale, precision == "nvfp4")
        if weight_scale_2 is not None:
            yield f"{name}.weight_scale_2", _scale(weight_scale_2)
        yield f"{name}.input_scale", _scale(get_activation_scaling_factor(module))
        quantized.add(f"{name}.weight")
    for key, tensor in _plain_state_dict(transformer).items():
        if key not in quantized:
            yield key, tensor


def _scale(tensor: torch.Tensor, per_block: bool = False) -> torch.Tensor:
    """A scalar scale as fp32 0-d; NVFP4's per-block scales as they are (float8_e4m3fn)."""
    return tensor.detach().contiguous() if per_block else tensor.detach().float().reshape(()).clone()


def _plain_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's own tensors, without ModelOpt's quantizer state."""
    return {key: value.detach() for key, value in transformer.state_dict().items() if "_quantizer." not in key}


def write_tensors(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path) -> None:
    """Safetensors shards of at most `SHARD_BYTES` (with an index when there are several)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / TRANSFORMER_FILES[0], metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (folder / TRANSFORMER_FILES[1]).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def copy_components(source: Path, out: Path) -> None:
    """Every file of `source` but the transformer's weights."""
    for entry in source.iterdir():
        target = out / entry.name
        if entry.is_dir():
            ignore = shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json") if (
                entry.name == "transformer") else None  # fmt: skip
            shutil.copytree(entry, target, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, target)


def write_configs(out: Path, precision: str, policy: StepPolicy) -> None:
    """The quantization configs of `transformer/config.json` (with the step policy), the root `config.json` and
    `hf_quant_config.json`."""
    from modelopt import __version__ as modelopt_version

    transformer_config = json.loads((out / "transformer" / "config.json").read_text())
    transformer_config["quantization_config"] = modelopt_format.quantization_config(precision, modelopt_version,
                                                                                    policy)  # fmt: skip
    (out / "transformer" / "config.json").write_text(json.dumps(transformer_config, indent=2) + "\n")
    root_config = json.loads((out / "config.json").read_text())
    root_config["quantization_config"] = modelopt_format.quantization_config(precision, modelopt_version)
    (out / "config.json").write_text(json.dumps(root_config, indent=2) + "\n")
    summary = modelopt_format.hf_quant_config(precision, modelopt_version)
    (out / "hf_quant_config.json").write_text(json.dumps(summary, indent=2) + "\n")


def quantize_checkpoint(checkpoint: Path, out: Path, precision: str, prompts: Sequence[str], num_steps: int,
                        shape: CalibrationShape, policy: StepPolicy, device: str | None = None,
                        progress: bool = True) -> Path:  # fmt: skip
    """Calibrate `checkpoint` on `prompts` and write its `precision` ModelOpt checkpoint to `out`."""
    from diffusers import Cosmos3OmniPipeline

    if precision not in modelopt_format.QUANT_ALGOS:
        raise ValueError(f"precision must be one of {', '.join(modelopt_format.QUANT_ALGOS)}, got {precision!r}")
    if modelopt_format.read_checkpoint_quantization(checkpoint) is not None:
        raise ValueError(f"{checkpoint} is quantized already; quantize a 16-bit checkpoint")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPU: float32 matmuls (bf16 ones are slow)
    pipeline = Cosmos3OmniPipeline.from_pretrained(checkpoint, enable_safety_checker=False, dtype=dtype).to(device)
    stored_dtypes = transformer_dtypes(checkpoint)
    transformer = calibrate(pipeline, precision, prompts, num_steps, shape, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    copy_components(checkpoint, out)
    with tqdm(desc=f"writing {precision} weights", unit="tensor", disable=not progress) as bar:
        tensors = ((key, _stored(tensor, stored_dtypes.get(key))) for key, tensor in quantized_tensors(transformer,
                                                                                                       precision))
        write_tensors(_counted(tensors, bar), out / "transformer")
    write_configs(out, precision, policy)
    return out


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def transformer_dtypes(checkpoint: Path) -> dict[str, torch.dtype]:
    """The stored dtype of every floating-point tensor of `transformer/`, from the safetensors headers."""
    from safetensors import safe_open

    dtypes = {}
    for file in sorted((checkpoint / "transformer").glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    dtypes[key] = dtype
    return dtypes


def _stored(tensor: torch.Tensor, stored_dtype: torch.dtype | None) -> torch.Tensor:
    """Tensors kept from the source in their stored dtype; quantized weights and their scales (new keys, or a
    weight now in float8 / packed) as they are."""
    if stored_dtype is None or not tensor.dtype.is_floating_point or tensor.dtype.itemsize == 1:
        return tensor.contiguous()
    return tensor.to(stored_dtype).contiguous()


def _counted(tensors: Iterator[tuple[str, torch.Tensor]], bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    for item in tensors:
        bar.update(1)
        yield item
