"""Generation prompts, built as the reference pipeline builds them (diffusers `Cosmos3OmniPipeline.tokenize_prompt`).

The prompt gets duration (videos) and resolution templates appended, the negative prompt the inverse templates;
both go through the chat template with the image or video system prompt and a generation prompt, then
`eos` + `<|vision_start|>` are appended: the generator's tokens follow that token. Action modes replace the
templates by a JSON caption of the clip (`action_caption`); their negative prompt goes in as given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cosmos3_serve.sampling.actions import VIEW_POINT_FRAMING

SYSTEM_PROMPT_IMAGE = "You are a helpful assistant who will generate images from a give prompt."
SYSTEM_PROMPT_VIDEO = "You are a helpful assistant who will generate videos from a give prompt."
DURATION = "The video is {duration:.1f} seconds long and is of {fps:.0f} FPS."
INVERSE_DURATION = "The video is not {duration:.1f} seconds long and is not of {fps:.0f} FPS."
IMAGE_RESOLUTION = "This image is of {height}x{width} resolution."
INVERSE_IMAGE_RESOLUTION = "This image is not of {height}x{width} resolution."
VIDEO_RESOLUTION = "This video is of {height}x{width} resolution."
INVERSE_VIDEO_RESOLUTION = "This video is not of {height}x{width} resolution."
ASPECT_RATIOS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))  # width, height


@dataclass(frozen=True)
class PromptSpec:
    num_frames: int
    height: int
    width: int
    fps: float = 24.0
    use_system_prompt: bool = True
    add_resolution_template: bool = True
    add_duration_template: bool = True

    @property
    def is_image(self) -> bool:
        return self.num_frames == 1


def _append(base: str, addition: str) -> str:
    base = base.rstrip(".")
    return f"{base}. {addition}" if base else addition


def augment(text: str, spec: PromptSpec, negative: bool = False) -> str:
    if not spec.is_image and spec.add_duration_template:
        template = INVERSE_DURATION if negative else DURATION
        text = _append(text, template.format(duration=spec.num_frames / spec.fps, fps=spec.fps))
    if spec.add_resolution_template:
        if spec.is_image:
            template = INVERSE_IMAGE_RESOLUTION if negative else IMAGE_RESOLUTION
        else:
            template = INVERSE_VIDEO_RESOLUTION if negative else VIDEO_RESOLUTION
        text = _append(text, template.format(height=spec.height, width=spec.width))
    return text


def chat_token_ids(tokenizer, text: str, spec: PromptSpec) -> list[int]:
    """Chat-templated token ids of one (already augmented) prompt, ending with the assistant's turn opened."""
    messages = []
    if spec.use_system_prompt:
        messages.append({"role": "system", "content": SYSTEM_PROMPT_IMAGE if spec.is_image else SYSTEM_PROMPT_VIDEO})
    messages.append({"role": "user", "content": text})
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, add_vision_id=False, return_dict=True
    )
    return list(encoded["input_ids"])


def start_of_generation(tokenizer) -> list[int]:
    """What follows the context for the generator's tokens: eos + <|vision_start|>."""
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|vision_start|>")]


def generation_token_ids(tokenizer, text: str, spec: PromptSpec) -> list[int]:
    """Chat-templated token ids of one (already augmented) prompt, ending in eos + <|vision_start|>."""
    return chat_token_ids(tokenizer, text, spec) + start_of_generation(tokenizer)


def cfg_token_ids(tokenizer, prompt: str, negative_prompt: str | None, spec: PromptSpec) -> tuple[list[int], list[int]]:
    """(conditional, unconditional) prompt token ids."""
    cond = generation_token_ids(tokenizer, augment(prompt, spec), spec)
    uncond = generation_token_ids(tokenizer, augment(negative_prompt or "", spec, negative=True), spec)
    return cond, uncond


def action_caption(description: str, view_point: str | None, spec: PromptSpec) -> str:
    """The structured JSON caption of an action clip: framing of the view point, the action over the whole clip,
    duration, fps, resolution (of the canvas) and the closest aspect ratio."""
    seconds = spec.num_frames / spec.fps
    end_minutes, end_seconds = divmod(round(seconds), 60)
    text = description.strip()
    if text and not text.endswith((".", "!", "?")):
        text += "."
    caption: dict = {}
    if view_point is not None:
        caption["cinematography"] = {"framing": VIEW_POINT_FRAMING[view_point]}
    caption["actions"] = [{"time": f"0:00-{end_minutes}:{end_seconds:02d}", "description": text}]
    caption["duration"] = f"{int(seconds)}s"
    caption["fps"] = float(spec.fps)
    caption["resolution"] = {"H": spec.height, "W": spec.width}
    ratio_w, ratio_h = min(ASPECT_RATIOS, key=lambda wh: abs(wh[0] / wh[1] - spec.width / spec.height))
    caption["aspect_ratio"] = f"{ratio_w},{ratio_h}"
    return json.dumps(caption)


def action_cfg_token_ids(
    tokenizer, prompt: str, negative_prompt: str | None, spec: PromptSpec, view_point: str | None
) -> tuple[list[int], list[int]]:
    """(conditional, unconditional) prompt token ids of an action mode: the JSON caption, the bare negative prompt."""
    cond = generation_token_ids(tokenizer, action_caption(prompt, view_point, spec), spec)
    return cond, generation_token_ids(tokenizer, negative_prompt or "", spec)
