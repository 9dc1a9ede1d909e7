"""CPU development environment only: let PyPI's CUDA torchvision wheel import beside CPU torch.

PyPI ships torchvision only as CUDA builds. Their compiled ops library (``torchvision/_C.so``) links
``libtorch_cuda.so`` and cannot load beside ``torch==2.13.0+cpu``; torchvision then dies at import on an
unguarded ``register_fake("torchvision::nms")``. vLLM's Qwen3-VL path imports torchvision even for text,
and transformers' image/video processors use ``torchvision.transforms.v2`` (pure Python on torch).

A ``.pth`` file imports this module, which installs an import hook: right before ``torchvision`` is first
imported, it defines the schemas of the two ops torchvision registers fakes for. Nothing else changes:
torchvision's compiled ops (``torchvision.ops.nms``, ``roi_align``, ...) stay unavailable and raise
torchvision's own error. The GPU / production image uses the real torchvision and never installs this
file (see ``deploy/cpu/install_torchvision.py``).
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library must stay alive for the whole process


def define_torchvision_op_schemas() -> None:
    global _library
    import torch

    if _library is not None or hasattr(torch.ops.torchvision, "nms"):
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_torchvision_op_schemas()
        return None  # the regular finders import torchvision itself


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())
