"""The Cosmos 3 reasoner tower for vLLM, registered by our plugin in place of the built-in architecture.

The reasoner is a Qwen3-VL model (vision encoder + causal LM) stored in the released unified layout:
`transformer/` holds both towers with flat keys, `vision_encoder/` the vision model. This class is vLLM's
`Cosmos3ForConditionalGeneration` (vLLM's parallel, quantizable layers: tensor parallelism and FP8 / NVFP4 come
from vLLM) with one weight mapper for every vLLM release we support, which drops all generator-only tensors:
the generation projections and norms (`add_*_proj`, `to_add_out`, `norm_added_*`, `k_norm_und_for_gen`), the
generation MLPs and norms (`*_moe_gen`), the latent / time / action / sound heads, and ModelOpt's quantizer
state. The prompt K/V the generator needs is read from vLLM's paged cache by `kv_export`, not recomputed.

On CUDA, the language model's unquantized projections and `lm_head` multiply a single token (batch-1 decode) with
a Triton GEMV (`decode_kernels.batch1_linear`) instead of cuBLAS, whose M = 1 kernels read the weights more slowly
(measurements in docs/benchmarks.md), and the decoder layers (`Batch1DecoderLayer`) fold RMSNorm, SiLU-mul and
q / k norm + mRoPE into fewer kernels (`decode_kernels`). Every other batch size still goes to cuBLAS. At M = 1
their attention (q / k norm + mRoPE, the K/V-cache write and attention) is one Triton kernel (`decode_attention`)
where vLLM runs four; any other batch keeps vLLM's FA3.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import regex
import torch
from torch import nn
from vllm import envs
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.rotary_embedding import MRotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.models.cosmos3 import Cosmos3ForConditionalGeneration
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
from vllm.model_executor.models.utils import WeightsMapper
from vllm.platforms import current_platform

from cosmos3_serve.model_executor import decode_attention, decode_kernels, patches
from cosmos3_serve.model_executor.checkpoint.generator_config import (
    GENERATOR_ONLY_PREFIXES,
    GENERATOR_ONLY_SUBSTRINGS,
    KeyNorms,
)


class Batch1GemvLinearMethod(UnquantizedLinearMethod):
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.vllm.cosmos3_batch1_linear(x, layer.weight, bias)


class Batch1GemvLMHeadMethod(UnquantizedEmbeddingMethod):
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.vllm.cosmos3_batch1_linear(x, layer.weight, bias)


def use_batch1_gemv(language_model: nn.Module) -> None:
    """Give `language_model`'s unquantized projections and lm_head the batch-1 GEMV, and compile its variants for
    their shapes now: compiling at a first launch inside CUDA-graph capture is not safe."""
    weights = {}
    for module in language_model.modules():
        if type(getattr(module, "quant_method", None)) is UnquantizedLinearMethod:
            module.quant_method = Batch1GemvLinearMethod()
        elif type(getattr(module, "quant_method", None)) is UnquantizedEmbeddingMethod:
            module.quant_method = Batch1GemvLMHeadMethod()  # lm_head (embed_tokens keeps its lookup)
        else:
            continue
        weights.setdefault((*module.weight.shape, module.weight.dtype), module.weight)
    for weight in weights.values():  # the layers' own (not yet loaded) weights: a GEMV each on uninitialized memory
        decode_kernels.batch1_linear(weight.new_zeros(1, weight.shape[1]), weight, None)


class Batch1DecoderLayer:
    """Mixin for vLLM's `Qwen3DecoderLayer` (qwen3_vl's text layers: its subclass `Qwen3VLDecoderLayer` in vLLM 0.32,
    itself in 0.26; same forward and attributes in both): the same forward in 3 fused custom ops and 2 projections.

    Per layer: input_layernorm + qkv_proj (`cosmos3_[add_]rms_norm_linear`); q_norm, k_norm, mRoPE, the K/V-cache
    write and attention (`cosmos3_attention`, where `fused_attention`: at M = 1 one kernel, otherwise
    `cosmos3_qk_norm_mrope` and vLLM's attention layer; without it those two in the traced forward); o_proj
    (vLLM's, our GEMV); post_attention_layernorm + gate_up_proj + SiluAndMul (`cosmos3_add_rms_norm_linear` with
    `silu_mul`); down_proj (vLLM's, our GEMV). At M = 1 on CUDA that is 5 kernels where vLLM's compiled forward has
    13 (4 GEMVs, 2 add + RMSNorm, 3 for q / k norm and mRoPE, SiLU-mul, the K/V-cache write, FA3's two kernels);
    at M > 1 the norms run one Triton add + RMSNorm kernel each (the first layer's, vLLM's C `rms_norm`), SiLU-mul
    vLLM's C kernel, the projections cuBLAS."""

    fused_attention: bool = False  # attention through `decode_attention` (set per layer when swapped in)

    @staticmethod
    def supports(layer: nn.Module) -> bool:
        """Whether `layer` is a Qwen3 decoder layer with unquantized batch-1 GEMV projections (no bias), plain
        RMSNorms, q / k RMSNorm or none (`nn.Identity`), neox mRoPE over the whole head and a SiLU MLP."""
        if not isinstance(layer, Qwen3DecoderLayer):
            return False
        attn, mlp, rope = layer.self_attn, layer.mlp, layer.self_attn.rotary_emb
        half_head = attn.head_dim // 2
        qk_norms = (attn.q_norm, attn.k_norm)
        return (
            all(type(proj.quant_method) is Batch1GemvLinearMethod and proj.bias is None
                for proj in (attn.qkv_proj, mlp.gate_up_proj, mlp.down_proj))
            and all(_is_plain_rms_norm(norm) for norm in (layer.input_layernorm, layer.post_attention_layernorm))
            and (all(type(norm) is nn.Identity for norm in qk_norms)
                 or (all(_is_plain_rms_norm(norm) for norm in qk_norms)
                     and attn.q_norm.variance_epsilon == attn.k_norm.variance_epsilon))
            and type(rope) is MRotaryEmbedding and rope.mrope_section is not None and len(rope.mrope_section) == 3
            and rope.is_neox_style and rope.rotary_dim == rope.head_size == attn.head_dim
            and half_head & (half_head - 1) == 0
            and isinstance(mlp.act_fn, SiluAndMul)
        )  # fmt: skip

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn, mlp = self.self_attn, self.mlp
        norm = self.input_layernorm
        if residual is None:
            residual = hidden_states
            qkv = torch.ops.vllm.cosmos3_rms_norm_linear(
                hidden_states, norm.weight, norm.variance_epsilon, attn.qkv_proj.weight
            )
        else:
            qkv, residual = torch.ops.vllm.cosmos3_add_rms_norm_linear(
                hidden_states, residual, norm.weight, norm.variance_epsilon, attn.qkv_proj.weight, False
            )
        if self.fused_attention:
            attention = qkv.new_empty(qkv.shape[0], attn.q_size)
            torch.ops.vllm.cosmos3_attention(positions, qkv, attention, *self._attention_args())
        else:
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = torch.ops.vllm.cosmos3_qk_norm_mrope(positions, q, k, *self._qk_norm_mrope_args())
            attention = attn.attn(q, k, v)
        hidden_states, _ = attn.o_proj(attention)
        norm = self.post_attention_layernorm
        activation, residual = torch.ops.vllm.cosmos3_add_rms_norm_linear(
            hidden_states, residual, norm.weight, norm.variance_epsilon, mlp.gate_up_proj.weight, True
        )
        hidden_states, _ = mlp.down_proj(activation)
        return hidden_states, residual

    def _qk_norm_mrope_args(self) -> tuple:
        """`qk_norm_mrope`'s arguments after (positions, q, k): the q / k norm weights (None without norms), eps,
        the rotary cache, head dim and mRoPE sections."""
        attn, rope = self.self_attn, self.self_attn.rotary_emb
        has_norm = isinstance(attn.q_norm, RMSNorm)
        return (attn.q_norm.weight if has_norm else None, attn.k_norm.weight if has_norm else None,
                attn.q_norm.variance_epsilon if has_norm else 0.0, rope.cos_sin_cache, attn.head_dim,
                rope.mrope_section, rope.mrope_interleaved)  # fmt: skip

    def _attention_args(self) -> tuple:
        """`cosmos3_attention`'s arguments after (positions, qkv)."""
        attn = self.self_attn
        q_norm, k_norm, eps, cos_sin_cache, head_dim, section, interleaved = self._qk_norm_mrope_args()
        return (q_norm, k_norm, eps, cos_sin_cache, head_dim, attn.num_heads, attn.num_kv_heads, section,
                interleaved, attn.attn.layer_name)  # fmt: skip

    def compile_kernels(self) -> None:
        """Compile the fused kernels' variants for this layer's shapes now (M = 1, on its uninitialized weights)."""
        attn, mlp = self.self_attn, self.mlp
        norm, post_norm = self.input_layernorm, self.post_attention_layernorm
        x = attn.qkv_proj.weight.new_zeros(1, attn.qkv_proj.weight.shape[1])
        qkv = decode_kernels.rms_norm_linear(x, norm.weight, norm.variance_epsilon, attn.qkv_proj.weight)
        decode_kernels.add_rms_norm_linear(x, x, norm.weight, norm.variance_epsilon, attn.qkv_proj.weight, False)
        eps, weight = post_norm.variance_epsilon, mlp.gate_up_proj.weight
        decode_kernels.add_rms_norm_linear(x, x, post_norm.weight, eps, weight, True)
        q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        positions = torch.zeros(3, 1, dtype=torch.long, device=x.device)
        decode_kernels.qk_norm_mrope(positions, q, k, *self._qk_norm_mrope_args())
        if self.fused_attention:  # on a zero cache of one block
            q_norm, k_norm, eps, cos_sin_cache, head_dim, section, interleaved = self._qk_norm_mrope_args()
            rope = decode_attention.RopeArgs(q_norm, k_norm, eps, cos_sin_cache, section, interleaved)
            cache = x.new_zeros(1, attn.num_kv_heads, 16, 2 * head_dim)
            slot = torch.zeros(1, dtype=torch.long, device=x.device)
            block_table = torch.zeros(1, 1, dtype=torch.int32, device=x.device)
            seq_lens = torch.ones(1, dtype=torch.int32, device=x.device)
            decode_attention.decode_attention(qkv, positions, rope, cache, slot, block_table, seq_lens, attn.scaling,
                                              attn.num_heads, attn.num_kv_heads)  # fmt: skip


def _is_plain_rms_norm(norm: nn.Module) -> bool:
    return type(norm) is RMSNorm and norm.has_weight and norm.variance_size_override is None


@functools.cache
def _batch1_layer_class(layer_class: type) -> type:
    return type(f"Batch1{layer_class.__name__}", (Batch1DecoderLayer, layer_class), {})


def use_batch1_decoder_layers(language_model: nn.Module, attention: bool = True) -> None:
    """Give `language_model`'s decoder layers the fused forward of `Batch1DecoderLayer` if all of them support it
    (after `use_batch1_gemv`), with `attention` their attention through `cosmos3_attention` where
    `decode_attention` supports it, and compile their kernels now."""
    layers = [layer for layer in language_model.model.layers if isinstance(layer, Qwen3DecoderLayer)]
    if not layers or not all(Batch1DecoderLayer.supports(layer) for layer in layers):
        return
    for layer in layers:
        patches.swap_module_class(layer, _batch1_layer_class(type(layer)))
        layer.fused_attention = attention and decode_attention.supports(layer.self_attn.attn)
    if layers[0].self_attn.qkv_proj.weight.is_cuda:
        layers[0].compile_kernels()


class Cosmos3ReasonerForConditionalGeneration(Cosmos3ForConditionalGeneration):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={
            regex.compile(r"^(layers\.|embed_tokens\.|norm\.)(.+)$"): r"language_model.model.\1\2",
            regex.compile(
                r"^(blocks\.|merger\.|patch_embed\.|pos_embed\.|deepstack_merger_list\.)"
            ): r"visual.\1",
            regex.compile(r"^(audio|action)_modality_embed$"): None,
        },
        orig_to_new_substr={
            **{substring: None for substring in GENERATOR_ONLY_SUBSTRINGS},
            ".to_q.": ".q_proj.",
            ".to_k.": ".k_proj.",
            ".to_v.": ".v_proj.",
            ".to_out.": ".o_proj.",
            ".norm_q.": ".q_norm.",
            ".norm_k.": ".k_norm.",
        },
        orig_to_new_prefix={
            **{prefix: None for prefix in GENERATOR_ONLY_PREFIXES},
            "lm_head.": "language_model.lm_head.",
        },
    )

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if not KeyNorms.of_checkpoint(vllm_config.model_config.model).qk_norm_for_text:
            for layer in self.language_model.model.layers:
                if hasattr(layer, "self_attn"):  # not a pipeline-parallel placeholder
                    layer.self_attn.q_norm = nn.Identity()
                    layer.self_attn.k_norm = nn.Identity()
        dtype = vllm_config.model_config.dtype
        if current_platform.is_cuda() and dtype in decode_kernels.HALF_DTYPES and not envs.VLLM_BATCH_INVARIANT:
            use_batch1_gemv(self.language_model)
            attention = decode_attention.graph_splits_at_attention(vllm_config.compilation_config)
            use_batch1_decoder_layers(self.language_model, attention)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        return super().recompute_mrope_positions(
            input_ids=self._hide_outer_vision_starts(torch.as_tensor(input_ids)),
            multimodal_embeddings=multimodal_embeddings,
            mrope_positions=mrope_positions,
            num_computed_tokens=num_computed_tokens,
        )

    def _hide_outer_vision_starts(self, input_ids_n: torch.Tensor) -> torch.Tensor:
        """Replace every `<|vision_start|>` not opening a frame or image (not followed by media or its end) by -1."""
        config = self.config
        following = torch.roll(input_ids_n, -1)
        following[-1] = -1
        opens_media = torch.isin(
            following,
            torch.tensor(
                [config.image_token_id, config.video_token_id, config.vision_end_token_id], device=input_ids_n.device
            ),
        )
        outer = (input_ids_n == config.vision_start_token_id) & ~opens_media
        return torch.where(outer, torch.full_like(input_ids_n, -1), input_ids_n)
