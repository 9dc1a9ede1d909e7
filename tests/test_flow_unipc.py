"""`sampling.flow_unipc.FlowUniPC` against diffusers' `UniPCMultistepScheduler.step`, step by step on the same model
outputs: the reference pipeline's configuration (the tiny checkpoint's scheduler: flow sigmas, order 2, bh2) and
the other orders and corrector settings the class claims."""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from cosmos3_serve.sampling.flow_unipc import FlowUniPC, device_scheduler

REL_TOL = 1e-5  # float32 roundings of the same linear combinations


@pytest.fixture(scope="module")
def checkpoint_config(tiny_checkpoint) -> dict:
    return dict(UniPCMultistepScheduler.from_pretrained(tiny_checkpoint, subfolder="scheduler").config)


@pytest.mark.parametrize(
    "overrides, steps",
    [
        ({}, 35),  # the checkpoint's own
        ({}, 4),
        ({}, 1),
        ({"flow_shift": 3.0}, 12),
        ({"solver_order": 1}, 6),
        ({"solver_order": 3}, 9),
        ({"solver_order": 3, "disable_corrector": [0, 2]}, 7),
    ],
)
def test_steps_equal_diffusers(checkpoint_config: dict, overrides: dict, steps: int) -> None:
    reference = _with_timesteps({**checkpoint_config, **overrides}, steps)
    ours = FlowUniPC(_with_timesteps({**checkpoint_config, **overrides}, steps))
    generator = torch.Generator().manual_seed(steps)
    sample_ours = sample_ref = torch.randn(1, 48, 2, 4, 6, generator=generator)
    for i, t in enumerate(reference.timesteps):
        velocity = torch.randn(sample_ref.shape, generator=generator)
        sample_ref = reference.step(velocity, t, sample_ref, return_dict=False)[0]
        sample_ours = ours.step(velocity, t, sample_ours)[0]
        error = float((sample_ours - sample_ref).norm() / sample_ref.norm())
        assert error <= REL_TOL, f"step {i} of {steps}: relative error {error:.1e}"
    assert ours.step_index == steps


def _with_timesteps(config: dict, steps: int) -> UniPCMultistepScheduler:
    scheduler = UniPCMultistepScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def test_other_schedulers_step_themselves(checkpoint_config: dict) -> None:
    """A configuration the class does not reproduce keeps diffusers' own step."""
    for overrides in ({"prediction_type": "epsilon", "use_flow_sigmas": False}, {"solver_type": "bh1"}):
        scheduler = _with_timesteps({**checkpoint_config, **overrides}, 4)
        assert device_scheduler(scheduler) is scheduler, overrides
    assert isinstance(device_scheduler(_with_timesteps(checkpoint_config, 4)), FlowUniPC)
