"""The Cosmos 3 reasoner tower for vLLM, registered by our plugin in place of the built-in architecture.

The reasoner is a Qwen3-VL model (vision encoder + causal LM) stored in the released unified layout:
`transformer/` holds both towers with flat keys, `vision_encoder/` the vision model. This class is vLLM's
`Cosmos3ForConditionalGeneration` (vLLM's parallel, quantizable layers: tensor parallelism and FP8 / NVFP4 come
from vLLM) with one weight mapper for every vLLM release we support, which drops all generator-only tensors:
the generation projections and norms (`add_*_proj`, `to_add_out`, `norm_added_*`, `k_norm_und_for_gen`), the
generation MLPs and norms (`*_moe_gen`), the latent / time / action / sound heads, and ModelOpt's quantizer
state. The prompt K/V the generator needs is read from vLLM's paged cache by `kv_export`, not recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence

import regex
import torch
from torch import nn
from vllm.model_executor.models.cosmos3 import Cosmos3ForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper

from cosmos3_serve.model_executor.checkpoint.generator_config import (
    GENERATOR_ONLY_PREFIXES,
    GENERATOR_ONLY_SUBSTRINGS,
    KeyNorms,
)

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
