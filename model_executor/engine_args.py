"""vLLM engine arguments of a reasoner that feeds the generator (light: no model code is imported)."""

from __future__ import annotations

from typing import Any

from cosmos3_serve.model_executor.admission import GeneratorSettings
from cosmos3_serve.model_executor.plugin import KV_EXPORT_CONNECTOR, KV_EXPORT_MODULE

WORKER_EXTENSION_CLS = "cosmos3_serve.model_executor.worker_extension.Cosmos3WorkerExtension"


def kv_transfer_config() -> dict[str, Any]:
    """Engine argument `kv_transfer_config` that turns the K/V export on (our plugin registers the connector)."""
    return {"kv_connector": KV_EXPORT_CONNECTOR, "kv_connector_module_path": KV_EXPORT_MODULE, "kv_role": "kv_producer"}


def generation_engine_args(settings: GeneratorSettings) -> dict[str, Any]:
    """K/V export, the worker extension that hosts the generator, and the generator's settings."""
    return {"kv_transfer_config": kv_transfer_config(), "worker_extension_cls": WORKER_EXTENSION_CLS,
            "additional_config": settings.to_additional_config()}  # fmt: skip
