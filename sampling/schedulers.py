"""The checkpoint's flow-matching scheduler, per-request copies of it, and the schedules it cannot run."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import diffusers
import torch

if TYPE_CHECKING:
    from cosmos3_serve.model_executor.request import GenerationRequest


def load_scheduler(checkpoint: Path):
    """The checkpoint's flow-matching scheduler: UniPC multistep, or Euler for distilled checkpoints."""
    class_name = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, class_name).from_pretrained(checkpoint, subfolder="scheduler")


def scheduler_with_shift(template, flow_shift: float | None):
    """A fresh copy of the scheduler `template`, its flow shift replaced when `flow_shift` is given (UniPC calls
    it `flow_shift`, Euler `shift`)."""
    if flow_shift is None:
        return copy.deepcopy(template)
    key = "flow_shift" if "flow_shift" in template.config else "shift"
    return type(template).from_config(template.config, **{key: flow_shift})


def repeated_timesteps(scheduler, num_inference_steps: int) -> str | None:
    """Why `scheduler` (timesteps set) cannot run: a schedule of integer timesteps that repeats one (many steps at a
    large flow shift) makes diffusers' multistep solver fail on its last step. None when it can."""
    distinct = len(torch.unique(scheduler.timesteps))
    if distinct == len(scheduler.timesteps):
        return None
    return (f"the flow schedule has only {distinct} distinct timesteps at {num_inference_steps} steps; "
            f"ask for at most {distinct} steps or a smaller flow_shift")


def invalid_schedule(template, request: GenerationRequest) -> tuple[str, str] | None:
    """(field, message) when the schedule of `request` built from the scheduler `template` cannot run."""
    scheduler = scheduler_with_shift(template, request.flow_shift)
    scheduler.set_timesteps(request.num_inference_steps)
    problem = repeated_timesteps(scheduler, request.num_inference_steps)
    return None if problem is None else ("num_inference_steps", problem)
