"""vLLM general plugin (entry point group `vllm.general_plugins`), loaded by vLLM in every process it starts.

Registers, under the architecture name the released checkpoints declare (`Cosmos3ForConditionalGeneration`),
our reasoner class in place of vLLM's built-in one, so `vllm serve CKPT` and our server both pick it up with no
extra flag; registers the K/V export connector by name (`--kv-transfer-config
'{"kv_connector": "Cosmos3KVExportConnector", "kv_role": "kv_producer"}'`); and applies the version fixes of
`vllm_compat`. Classes are registered by import path, so loading the plugin imports no model code. Idempotent.
"""

from __future__ import annotations

REASONER_ARCHITECTURE = "Cosmos3ForConditionalGeneration"
REASONER_CLASS = "cosmos3_serve.model_executor.reasoner:Cosmos3ReasonerForConditionalGeneration"
KV_EXPORT_CONNECTOR = "Cosmos3KVExportConnector"
KV_EXPORT_MODULE = "cosmos3_serve.model_executor.kv_export"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from cosmos3_serve.model_executor import vllm_compat

    ModelRegistry.register_model(REASONER_ARCHITECTURE, REASONER_CLASS)
    KVConnectorFactory.register_connector(KV_EXPORT_CONNECTOR, KV_EXPORT_MODULE, KV_EXPORT_CONNECTOR)
    vllm_compat.patch_cpu_model_runner()
    _registered = True
