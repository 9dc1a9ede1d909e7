"""What FP8 W8A8 or NVFP4 W4A4 costs in quality against the 16-bit checkpoint, on the same seeds: the relative error
of the generator's velocities at every denoising step (teacher-forced: each quantized forward gets the inputs of the
16-bit run's forward), of the final latents, and the PSNR / SSIM of the decoded frames; also with the first and last
N steps at 16-bit activations (W8A16 / W4A16). Then the reasoner (transformers', float32, its linears in the
format by hand): teacher-forced top-1 agreement with the float32 reasoner over a text prompt's positions.

    python bench/quant_quality.py CKPT QUANTIZED_CKPT [--steps 8] [--shape 128x128x9] [--seeds 0,1,2]
                                  [--a16-steps 0,1,2] [--attention bf16|fp8]

CKPT is 16-bit, QUANTIZED_CKPT its `cosmos3-serve quantize --precision fp8|nvfp4` checkpoint. Both run in
diffusers' reference pipeline in bf16 on this machine; the quantized linears compute the format by hand
(`tests/oracle.py`): FP8 inputs scaled by `input_scale` and rounded to e4m3, times the e4m3 weight, in float32
(which `tests/test_quantize.py` checks vLLM's FP8 kernels against); NVFP4 inputs and weights through their e2m1
blocks of 16 with e4m3 block scales, their product in float32 (`oracle.linears_by_hand`). `--attention fp8` also
rounds the generator attention's queries, keys and values to e4m3 (one scale each, `oracle.hand_written_fp8_attention`)
in the compared run; with QUANTIZED_CKPT = CKPT it measures FP8 attention alone.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cosmos3_serve.quant.modelopt_format import read_checkpoint_quantization  # noqa: E402
from tests import oracle  # noqa: E402

FORMATS = {"fp8": ("FP8 W8A8", "W8A16"), "nvfp4": ("NVFP4 W4A4", "W4A16")}
# The reasoner's prompt: long enough for a few hundred teacher-forced positions.
TEXT = ("A robot arm picks up a red cube from a wooden table and places it in a blue bowl. Then it sorts parcels "
        "on a conveyor belt while a scanner reads their labels, and stacks the boxes by size. ") * 3  # fmt: skip

PROMPT = "A robot arm picks up a red cube from a wooden table and places it in a blue bowl."


def load(checkpoint: Path):
    from diffusers import Cosmos3OmniPipeline

    pipeline = Cosmos3OmniPipeline.from_pretrained(checkpoint, enable_safety_checker=False, dtype=torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def transformer_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    with safe_open(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not a dict


def reasoner_agreement(checkpoint: Path, quantized: Path, view: Path) -> tuple[float, int, int]:
    """Teacher-forced top-1 agreement of the reasoner with its linears in the quantized format (by hand) with the
    float32 reasoner, over the positions of `TEXT` in the chat template: (agreement, positions, linears
    quantized)."""
    reference = oracle.load_transformers_reasoner(checkpoint, view / "reference")
    by_hand = oracle.load_transformers_reasoner(checkpoint, view / "by-hand")
    names = oracle.checkpoint_names(by_hand.model, transformer_tensors(checkpoint))
    count = oracle.linears_by_hand(names, transformer_tensors(quantized))
    prompt = reference.render([{"role": "user", "content": [{"type": "text", "text": TEXT}]}])
    inputs = reference.inputs(prompt)
    with torch.no_grad():
        expected = reference.model(**inputs).logits[0].argmax(-1)
        got = by_hand.model(**inputs).logits[0].argmax(-1)
    return float((expected == got).float().mean()), int(expected.numel()), count


def first_tensor(output) -> torch.Tensor:
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def psnr(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Frames in [0, 1]."""
    mse = float(((got.float() - expected.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def ssim(got: torch.Tensor, expected: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM over frames and channels ([T, H, W, C] in [0, 1]), uniform `window` x `window` statistics."""
    x, y = (t.float().permute(0, 3, 1, 2) for t in (got, expected))
    pool = lambda t: F.avg_pool2d(t, window, stride=1)
    mx, my = pool(x), pool(y)
    vx, vy, cov = pool(x * x) - mx**2, pool(y * y) - my**2, pool(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def run(pipeline, seed: int, steps: int, shape: tuple[int, int, int], policy: int, mode: dict[str, bool],
        record: list | None = None):  # fmt: skip
    """Latents and frames of one generation; `policy` first and last steps at 16-bit activations; every transformer
    call's inputs and output appended to `record`."""
    width, height, frames = shape

    def schedule(_pipeline, step: int, _timestep, callback_kwargs):
        mode["now"] = step + 1 < policy or step + 1 >= steps - policy
        return callback_kwargs

    hook = None
    if record is not None:
        def keep(_module, args, kwargs, output):
            record.append((args, kwargs, first_tensor(output).detach().clone()))
        hook = pipeline.transformer.register_forward_hook(keep, with_kwargs=True)
    mode["now"] = policy > 0
    arguments = dict(prompt=PROMPT, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                     guidance_scale=6.0, callback_on_step_end=schedule)  # fmt: skip
    latents = pipeline(**arguments, generator=torch.Generator().manual_seed(seed), output_type="latent").video
    video = pipeline(**arguments, generator=torch.Generator().manual_seed(seed), output_type="pt").video
    if hook is not None:
        hook.remove()
    video = torch.as_tensor(video[0] if isinstance(video, list) else video)
    return latents, (video[0] if video.ndim == 5 else video).permute(0, 2, 3, 1)  # [T, H, W, C]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("quantized_checkpoint", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--shape", default="128x128x9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--a16-steps", default="0,1,2")
    parser.add_argument("--attention", choices=["bf16", "fp8"], default="bf16",
                        help="fp8: the generator's attention on e4m3 inputs (by hand) in the compared run too")
    args = parser.parse_args()
    shape = tuple(int(part) for part in args.shape.split("x"))
    seeds = [int(s) for s in args.seeds.split(",")]

    quantization = read_checkpoint_quantization(args.quantized_checkpoint)
    precision = None if quantization is None else quantization.precision
    if precision not in (*FORMATS, None) or (precision is None and args.attention == "bf16"):
        parser.error(f"{args.quantized_checkpoint} is not an FP8 or NVFP4 checkpoint of `cosmos3-serve quantize` (a "
                     f"16-bit one compares with --attention fp8 only)")  # fmt: skip
    name, a16 = FORMATS.get(precision, ("BF16 linears", "-"))
    if args.attention == "fp8":
        name += " + FP8 attention"
    sixteen = load(args.checkpoint)
    mode = {"now": False}
    quantized = load(args.checkpoint)
    if precision is not None:
        oracle.hand_written_quantized(quantized, transformer_tensors(args.quantized_checkpoint), mode)
    attention = oracle.hand_written_fp8_attention if args.attention == "fp8" else contextlib.nullcontext
    rows = []
    for policy in (int(p) for p in (args.a16_steps if precision else "0").split(",")):
        per_step, final, psnrs, ssims = [], [], [], []
        for seed in seeds:
            record: list = []
            latents16, frames16 = run(sixteen, seed, args.steps, shape, 0, {"now": False}, record)
            forwards = record[: len(record) // 2]  # the latent run's; the frames' run repeats them
            per_forward = []
            with torch.no_grad(), attention():
                for i, (call_args, call_kwargs, expected) in enumerate(forwards):
                    step = i // (len(forwards) // args.steps)
                    mode["now"] = step < policy or step >= args.steps - policy
                    per_forward.append(relative(first_tensor(quantized.transformer(*call_args, **call_kwargs)),
                                                expected))  # fmt: skip
            per_step.append(per_forward)
            with attention():
                latents_q, frames_q = run(quantized, seed, args.steps, shape, policy, mode)
            final.append(relative(latents_q, latents16))
            psnrs.append(psnr(frames_q, frames16))
            ssims.append(ssim(frames_q, frames16))
        steps_mean = [statistics.mean(values) for values in zip(*per_step)]
        rows.append((policy, steps_mean, statistics.mean(final), statistics.mean(psnrs), statistics.mean(ssims)))

    print(f"\n{name} vs 16-bit (bf16), {args.checkpoint.name}, {args.shape}, {args.steps} steps, guidance 6, seeds "
          f"{args.seeds}; first / last N steps {a16}")  # fmt: skip
    print(f"{'N':>3}{'velocity rel. error per forward (teacher-forced), mean over seeds':>70}")
    for policy, steps_mean, *_ in rows:
        print(f"{policy:3d}  " + " ".join(f"{v:.3f}" for v in steps_mean))
    print(f"\n{'N':>3}{'final latents':>15}{'PSNR dB':>10}{'SSIM':>8}")
    for policy, _steps, final, mean_psnr, mean_ssim in rows:
        print(f"{policy:3d}{final:15.3f}{mean_psnr:10.2f}{mean_ssim:8.3f}")
    if precision is None:  # FP8 attention is the generator's only
        return 0
    with tempfile.TemporaryDirectory() as view:
        agreement, positions, count = reasoner_agreement(args.checkpoint, args.quantized_checkpoint, Path(view))
    print(f"\nreasoner, {count} linears {FORMATS[precision][0]} by hand: teacher-forced top-1 agreement with the "
          f"float32 reasoner {agreement:.3f} over {positions} positions")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
