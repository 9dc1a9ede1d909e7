"""The Cosmos 3 reasoner tower for vLLM, registered by our plugin in place of the built-in architecture.

The reasoner is a Qwen3-VL model (vision encoder + causal LM) stored in the released unified layout:
`transformer/` holds both towers with flat keys, `vision_encoder/` the vision model. This class is vLLM's
`Cosmos3ForConditionalGeneration` (vLLM's parallel, quantizable layers: tensor parallelism and FP8 / NVFP4 come
from vLLM) with one weight mapper for every vLLM release we support, which drops all generator-only tensors:
the generation projections and norms (`add_*_proj`, `to_add_out`, `norm_added_*`, `k_norm_und_for_gen`), the
generation MLPs and norms (`*_moe_gen`), the latent / time / action / sound heads, and ModelOpt's quantizer
state. The prompt K/V the generator needs is read from vLLM's paged cache by `kv_export`, not recomputed.

On CUDA, the language model's unquantized projections and `lm_head` multiply a single token (batch-1 decode) with
a Triton GEMV (`batch1_linear`) instead of cuBLAS, whose M = 1 kernels read the weights more slowly (measurements in
docs/benchmarks.md). Every other batch size still goes to cuBLAS.
"""

from __future__ import annotations

from collections.abc import Sequence

import regex
import torch
import torch.nn.functional as F
from torch import nn
from vllm import envs
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.models.cosmos3 import Cosmos3ForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper
from vllm.platforms import current_platform
from vllm.triton_utils import tl, triton
from vllm.utils.torch_utils import direct_register_custom_op

from cosmos3_serve.model_executor.checkpoint.generator_config import (
    GENERATOR_ONLY_PREFIXES,
    GENERATOR_ONLY_SUBSTRINGS,
    KeyNorms,
)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[rows] = w[rows, :K] @ x[:K] for this program's BLOCK_N rows; K is a multiple of BLOCK_K."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs + k, eviction_policy="evict_first")  # each weight is read once per token
        acc += w.to(tl.float32) * tl.load(x_ptr + k + cols).to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty))


# (rows per program, K per loop step, warps) by weight rows, the fastest on an H200 for the 8B reasoner's shapes
# (lm_head, gate_up_proj, qkv_proj, o_proj and down_proj); the first entry whose bound is <= the rows applies.
GEMV_BLOCKS = ((65536, (16, 512, 4)), (16384, (4, 1024, 4)), (4097, (8, 512, 4)), (0, (16, 1024, 8)))


def _gemv(x: torch.Tensor, weight: torch.Tensor, rows: int, step: int, warps: int) -> torch.Tensor:
    n, k = weight.shape
    y = x.new_empty(*x.shape[:-1], n)
    _gemv_kernel[(n // rows,)](x.contiguous(), weight, y, k, weight.stride(0), BLOCK_N=rows, BLOCK_K=step,
                               num_warps=warps, num_stages=1)  # fmt: skip
    return y


def batch1_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; a single bf16 / fp16 row on CUDA without bias goes through `_gemv_kernel`."""
    n, k = weight.shape
    rows, step, warps = next(blocks for bound, blocks in GEMV_BLOCKS if n >= bound)
    if (x.numel() != k or bias is not None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16)
            or weight.dtype != x.dtype or weight.stride(1) != 1 or n % rows or k % step):  # fmt: skip
        return F.linear(x, weight, bias)
    return _gemv(x, weight, rows, step, warps)


def _batch1_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# A custom op: opaque to torch.compile (whose graphs serve every batch size), so the M = 1 test runs where the op
# does: at CUDA-graph capture, or per call outside graphs.
direct_register_custom_op("cosmos3_batch1_linear", batch1_linear, fake_impl=_batch1_linear_shape)


class Batch1GemvLinearMethod(UnquantizedLinearMethod):
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.vllm.cosmos3_batch1_linear(x, layer.weight, bias)


class Batch1GemvLMHeadMethod(UnquantizedEmbeddingMethod):
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.vllm.cosmos3_batch1_linear(x, layer.weight, bias)


def use_batch1_gemv(language_model: nn.Module, dtype: torch.dtype) -> None:
    """Give `language_model`'s unquantized projections and lm_head the batch-1 GEMV, and compile its variants for
    `dtype` now: compiling at a first launch inside CUDA-graph capture is not safe."""
    for module in language_model.modules():
        if type(getattr(module, "quant_method", None)) is UnquantizedLinearMethod:
            module.quant_method = Batch1GemvLinearMethod()
        elif type(getattr(module, "quant_method", None)) is UnquantizedEmbeddingMethod:
            module.quant_method = Batch1GemvLMHeadMethod()  # lm_head (embed_tokens keeps its lookup)
    for _, (rows, step, warps) in GEMV_BLOCKS:
        x = torch.zeros(1, step, dtype=dtype, device="cuda")
        _gemv(x, torch.zeros(rows, step, dtype=dtype, device="cuda"), rows, step, warps)


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
        dtype = vllm_config.model_config.dtype
        if current_platform.is_cuda() and dtype in (torch.bfloat16, torch.float16) and not envs.VLLM_BATCH_INVARIANT:
            use_batch1_gemv(self.language_model, dtype)
        if not KeyNorms.of_checkpoint(vllm_config.model_config.model).qk_norm_for_text:
            for layer in self.language_model.model.layers:
                if hasattr(layer, "self_attn"):  # not a pipeline-parallel placeholder
                    layer.self_attn.q_norm = nn.Identity()
                    layer.self_attn.k_norm = nn.Identity()

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
