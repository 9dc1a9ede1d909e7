"""The CPU development environment (deploy/cpu/install_torchvision.py): torchvision imports beside CPU torch,
and its image path (used by vLLM's Qwen3-VL processor) agrees with the independent PIL path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import media

ONE_LEVEL = 2 / 255  # one 8-bit level after normalising to [-1, 1] with mean = std = 0.5


def test_torchvision_and_the_vllm_reasoner_import_in_a_fresh_interpreter() -> None:
    code = "import torchvision.transforms.v2, vllm.model_executor.models.cosmos3; print(torchvision.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("0.28.0")


@pytest.mark.parametrize("height, width", [(64, 96), (100, 150)])
def test_torchvision_image_processor_agrees_with_the_pil_one(tiny_checkpoint: Path, height: int, width: int) -> None:
    from transformers import AutoImageProcessor

    image = media.smooth_image(seed=5, height=height, width=width)
    torchvision_based = AutoImageProcessor.from_pretrained(tiny_checkpoint, backend="torchvision")
    pil_based = AutoImageProcessor.from_pretrained(tiny_checkpoint, backend="pil")
    ours, theirs = torchvision_based(images=[image], return_tensors="pt"), pil_based(images=[image], return_tensors="pt")
    assert ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
    difference = (ours["pixel_values"] - theirs["pixel_values"]).abs()
    assert difference.max() <= 3 * ONE_LEVEL and difference.mean() <= 0.25 * ONE_LEVEL


def test_shim_leaves_compiled_ops_unavailable_with_torchvision_own_error() -> None:
    import torch
    import torchvision

    if torchvision.extension._has_ops():
        pytest.skip("a CPU build of torchvision is installed; the shim is not in use")
    assert hasattr(torch.ops.torchvision, "nms")  # the schema the shim defines
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
