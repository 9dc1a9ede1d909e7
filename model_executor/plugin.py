"""vLLM general plugin (entry point group `vllm.general_plugins`), loaded by vLLM in every process it starts.

Registers, under the architecture name the released checkpoints declare (`Cosmos3ForConditionalGeneration`),
our reasoner class in place of vLLM's built-in one, so `vllm serve CKPT` and our server both pick it up with no
extra flag; registers the K/V export connector by name (`--kv-transfer-config
'{"kv_connector": "Cosmos3KVExportConnector", "kv_role": "kv_producer"}'`); adds our attention op to the ops vLLM
splits its compiled graph at; applies the `patches` every process needs; and makes each of vLLM's child processes
die with its parent (`process_lifetime`). Classes are registered by import
path, so loading the plugin imports no model code (the worker extension applies the workers' own patch when vLLM
imports it). Idempotent.
"""

from __future__ import annotations

import os

REASONER_ARCHITECTURE = "Cosmos3ForConditionalGeneration"
REASONER_CLASS = "cosmos3_serve.model_executor.reasoner:Cosmos3ReasonerForConditionalGeneration"
KV_EXPORT_CONNECTOR = "Cosmos3KVExportConnector"
KV_EXPORT_MODULE = "cosmos3_serve.model_executor.kv_export"
# The reasoner's decoder-layer attention op (`decode_attention`): vLLM must split its compiled graph there, as it
# does at its own attention ops, so that piecewise CUDA graphs never capture attention. Registered unless
# `COSMOS3_DISABLE_DECODE_ATTENTION=1` (then the layers keep vLLM's attention path; the splitting ops are part of
# vLLM's compile-cache key, so the two never share compiled graphs).
ATTENTION_OP = "vllm::cosmos3_attention"
DECODE_ATTENTION = os.environ.get("COSMOS3_DISABLE_DECODE_ATTENTION", "0") != "1"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from cosmos3_serve.model_executor import patches, process_lifetime

    ModelRegistry.register_model(REASONER_ARCHITECTURE, REASONER_CLASS)
    KVConnectorFactory.register_connector(KV_EXPORT_CONNECTOR, KV_EXPORT_MODULE, KV_EXPORT_CONNECTOR)
    patches.patch_cpu_model_runner()
    process_lifetime.die_with_parent()
    if DECODE_ATTENTION:
        patches.register_splitting_op(ATTENTION_OP)
    _registered = True
