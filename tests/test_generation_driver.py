"""The driver's protocol core (`DriverCore`): whatever ends a request, in any phase, releases what it holds; the
state budget queues requests, never refuses one that fits alone; and the bounded prompt K/V store. Each case's
expected commands are written out by hand."""

from __future__ import annotations

import numpy as np
import torch

from cosmos3_serve.model_executor.generation_driver import DriverCore, Stage
from cosmos3_serve.model_executor.kv_export import PromptKV, PromptKVStore
from cosmos3_serve.model_executor.wire import Commands, decode_event, encode_event

PAYLOAD = {"prompt": "p"}


def admitted(core: DriverCore, request_id: str, keys: list[str], state_bytes: int = 10) -> None:
    core.start_prefill(request_id, keys, state_bytes)
    core.prefilled(request_id, PAYLOAD, decode=True)
    core.take_commands()
    core.apply({"kind": "admitted", "ids": [request_id], "errors": {}}, {})


def test_a_failed_second_prefill_forgets_the_first_prompts_kv_too() -> None:
    core = DriverCore(state_budget_bytes=100)
    core.start_prefill("job", ["k-cond", "k-uncond"], 10)
    core.prefill_failed("job")
    assert core.take_commands() == Commands(forget=["k-cond", "k-uncond"])
    assert core.held_bytes == 0 and "job" not in core.stages


def test_a_job_cancelled_while_prefilling_forgets_its_kv_once_the_prefill_ends() -> None:
    core = DriverCore(state_budget_bytes=100)
    core.start_prefill("job", ["k1"], 10)
    core.cancel("job")
    assert core.take_commands() is None and core.stages["job"] is Stage.CANCELLED  # its K/V may still be exported
    core.prefilled("job", PAYLOAD, decode=True)
    assert core.take_commands() == Commands(forget=["k1"])
    assert core.held_bytes == 0


def test_a_cancel_before_the_admission_is_sent_withdraws_it_and_forgets_the_kv() -> None:
    core = DriverCore(state_budget_bytes=100)
    core.start_prefill("job", ["k1", "k2"], 10)
    core.prefilled("job", PAYLOAD, decode=False)
    core.cancel("job")
    assert core.take_commands() == Commands(forget=["k1", "k2"])


def test_a_cancel_after_admission_is_a_cancel_command_and_late_events_are_ignored() -> None:
    core = DriverCore(state_budget_bytes=100)
    admitted(core, "job", ["k1"])
    core.cancel("job")
    assert core.take_commands() == Commands(cancel=["job"])
    assert core.apply({"kind": "progress", "steps": [["job", 3, 4]], "seconds": 0.1}, {}) == []
    assert core.apply({"kind": "result", "id": "job", "decode_s": 0.0}, {"video": np.zeros(1)}) == []


def test_results_failures_and_a_stopped_loop_release_the_budget() -> None:
    core = DriverCore(state_budget_bytes=100)
    for request_id in ("a", "b", "c"):
        admitted(core, request_id, [f"k-{request_id}"], state_bytes=30)
    [result] = core.apply({"kind": "result", "id": "a", "decode_s": 0.5}, {"video": np.ones((1, 2, 2, 3))})
    assert result.kind == "result" and result.video.shape == (1, 2, 2, 3) and core.held_bytes == 60
    [failed] = core.apply({"kind": "failed", "ids": ["b"], "error": "denoising failed: boom"}, {})
    assert (failed.request_id, failed.kind, failed.error) == ("b", "failed", "denoising failed: boom")
    [stopped] = core.apply({"kind": "fatal", "error": "RuntimeError: gone"}, {})
    assert stopped.request_id == "c" and "the generator stopped" in stopped.error
    assert core.held_bytes == 0 and core.take_commands() is None


def test_an_admission_error_fails_that_request_only() -> None:
    core = DriverCore(state_budget_bytes=100)
    for request_id in ("good", "bad"):
        core.start_prefill(request_id, [f"k-{request_id}"], 10)
        core.prefilled(request_id, PAYLOAD, decode=True)
    updates = core.apply({"kind": "admitted", "ids": ["good"], "errors": {"bad": "num_frames: too many"}}, {})
    assert [(u.request_id, u.kind) for u in updates] == [("good", "admitted"), ("bad", "failed")]
    assert core.stages == {"good": Stage.ADMITTED} and core.held_bytes == 10


def test_the_state_budget_queues_what_does_not_fit_and_admits_one_alone() -> None:
    core = DriverCore(state_budget_bytes=100)
    assert core.fits(500)  # nothing held: a request that fits the deployment alone always starts
    core.start_prefill("a", ["k-a"], 60)
    assert core.fits(40) and not core.fits(41)
    core.start_prefill("b", ["k-b"], 40)
    core.prefill_failed("a")
    assert core.fits(60) and not core.fits(61)


def test_the_prompt_kv_store_drops_its_oldest_entries_past_its_bound() -> None:
    one = PromptKV(torch.zeros(2, 2, 4, 1, 8))  # 512 bytes
    store = PromptKVStore(max_bytes=2 * one.nbytes)
    for key in ("first", "second", "third"):
        store.put(key, PromptKV(one.kv.clone()))
    assert "first" not in store and "second" in store and "third" in store and store.nbytes == 2 * one.nbytes


def test_events_carry_arrays_bit_for_bit() -> None:
    video = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    actions = np.linspace(-1, 1, 10, dtype=np.float32).reshape(5, 2)
    frames = [bytes(frame) for frame in encode_event({"kind": "result", "id": "x"}, {"video": video,
                                                                                    "actions": actions, "none": None})]
    header, arrays = decode_event(frames)
    assert header == {"kind": "result", "id": "x"} and set(arrays) == {"video", "actions"}
    assert np.array_equal(arrays["video"], video) and np.array_equal(arrays["actions"], actions)


def test_the_request_its_validation_and_its_cost_import_no_model_code() -> None:
    """The API process validates and prices requests without torch, vLLM, Triton or diffusers."""
    import subprocess
    import sys

    code = ("import sys; import cosmos3_serve.model_executor.request, cosmos3_serve.model_executor.admission; "
            "print(sorted(m for m in ('torch', 'vllm', 'triton', 'diffusers') if m in sys.modules))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_a_requests_cost_counts_its_tokens_by_hand() -> None:
    """720p, 189 frames, guidance: 48 latent frames x 23 x 40 patches (45 x 80 latents, 2 x 2 patches, the odd row
    padded), twice; an image without guidance: 1 x 23 x 40."""
    from cosmos3_serve.model_executor.admission import LatentGeometry, RequestCost
    from cosmos3_serve.model_executor.request import GenerationRequest

    geometry = LatentGeometry(z_dim=48, spatial=16, temporal=4, patch=2, action_dim=0)
    video = RequestCost.of(GenerationRequest("", num_frames=189, height=720, width=1280), geometry)
    assert video.tokens == 2 * 48 * 23 * 40 == 88_320 and video.latent_elements == 48 * 48 * 45 * 80
    image = RequestCost.of(GenerationRequest("", num_frames=1, height=720, width=1280, guidance_scale=1.0), geometry)
    assert image.tokens == 23 * 40
    assert video.state_bytes(prompt_tokens=600, kv_bytes_per_token=1000) == 600 * 1000 + 8 * 4 * 48 * 48 * 45 * 80
