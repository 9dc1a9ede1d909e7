"""A Qwen3-VL-style tokenizer built locally (no downloads) for tiny and dummy-weight checkpoints.

A byte-level BPE is trained on a small fixed corpus, so every string tokenizes. The Qwen special tokens keep
their order; with `vocab="qwen"` they also keep their real ids (151643...), the regular vocabulary being padded
with unreachable filler entries, so configs of the real checkpoints work unchanged. `vocab="compact"` places
them right after the learned merges, for small embedding tables in tests.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Literal

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

VocabKind = Literal["qwen", "compact"]

# Qwen2.5 / Qwen3 special tokens, in id order starting at QWEN_FIRST_SPECIAL_ID.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
QWEN_FIRST_SPECIAL_ID = 151_643
QWEN_EMBEDDING_ROWS = 151_936  # vocab_size of the real checkpoints (padded past the last special token)
LEARNED_VOCAB = 1_000

_CORPUS = (
    "A robot arm picks up a red cube from the table and places it in a blue bowl. "
    "The camera slowly pans across a busy city street at night, with cars, lights and people walking. "
    "A dog runs through a green field under a clear sky; the video is smooth and realistic. "
    "Describe this image. What is in the picture? What happens in the video? How many objects are there? "
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 24 720 1280 FPS seconds resolution. "
    "You are a helpful assistant. Generate a high quality, physically plausible world from the description. "
    '{"action": "move", "view_point": "third person", "duration": 2.0, "fps": 16} '
)


def _train_byte_level_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([_CORPUS] * 8, trainer)
    vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    return vocab, merges


def chat_template() -> str:
    """Qwen3-VL instruct chat template (text, image and video content parts; optional vision ids)."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def build_tokenizer(vocab: VocabKind = "compact") -> Qwen2Tokenizer:
    learned_vocab, merges = _train_byte_level_bpe(LEARNED_VOCAB)
    if vocab == "qwen":
        first_special_id = QWEN_FIRST_SPECIAL_ID
        fillers = {f"<|cosmos3_tiny_unused_{i}|>": i for i in range(len(learned_vocab), first_special_id)}
        learned_vocab = {**learned_vocab, **fillers}
    elif vocab == "compact":
        first_special_id = len(learned_vocab)
    else:
        raise ValueError(f"vocab must be 'qwen' or 'compact', got {vocab!r}")
    specials = {token: first_special_id + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab={**learned_vocab, **specials},
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_prefix_space=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    tokenizer.chat_template = chat_template()
    tokenizer.model_max_length = 262_144
    for token, token_id in specials.items():
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"special token {token} landed at {tokenizer.convert_tokens_to_ids(token)}, not {token_id}")
    return tokenizer


def embedding_rows(tokenizer: Qwen2Tokenizer) -> int:
    """Rows of `embed_tokens` / `lm_head` for this tokenizer: the real 151936, or padded to a multiple of 64."""
    if len(tokenizer) > QWEN_FIRST_SPECIAL_ID:
        return QWEN_EMBEDDING_ROWS
    return -(-len(tokenizer) // 64) * 64
