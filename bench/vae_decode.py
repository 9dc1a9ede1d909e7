"""The VAE decode of one clip shape in several precisions and memory formats, against its FLOP floor.

    python bench/vae_decode.py CKPT [--latents 5,11,20] [--batches 1,4,8] [--tflops 800] [--device cuda]
                               [--variants float32,bf16,...] [--profile] [--json OUT]

The checkpoint's `vae/` (diffusers' `AutoencoderKLWan`, random weights as the server's dummy load) decodes a batch of
random latents of shape `--latents` (frames, height, width; default the policy clip: 17 frames of 176 x 320) per
variant (`VARIANTS`): float32 or bf16; channels-last (3-D) weights and inputs; "cuda-graph": the decode replayed
from a CUDA graph (no host launches); "VaeDecoder": the executor's own decode (`model_executor/vae_graphs.py`).
Printed per variant and batch: ms per clip (mean of `--repeats` after two warm-ups), the TFLOP/s that is (FLOPs
counted by `vae_flops.py`), its fraction of `--tflops`, and the relative L2 error of the decoded clip against
the first variant's (float32's; `--variants` picks a subset). With `--profile`, one more eager decode per variant at
the last batch size runs under PyTorch's profiler: its device time by kernel class (convolutions, upsampling, our
fused passes, copies, adds, other).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vae_flops import decode_flops  # noqa: E402

from cosmos3_serve.model_executor.vae_graphs import VaeDecoder  # noqa: E402

# "VaeDecoder": the executor's decode (model_executor/vae_graphs.py) on a copy of the VAE in that dtype.
VARIANTS = ("float32", "float32 channels-last cuda-graph", "float32 VaeDecoder", "bf16", "bf16 channels-last",
            "bf16 channels-last cuda-graph", "bf16 VaeDecoder")


# --profile: kernels by class, the first class whose name contains one of the strings
KERNEL_CLASSES = (("convolutions", ("fprop", "conv", "cudnn", "xmma")), ("upsampling", ("upsample",)),
                  ("fused passes (vae_kernels.py)", ("_rms_norm_silu", "_add_dup_up", "_add_bias_and_residual")),
                  ("copies, concatenations, pads", ("copy", "cat", "pad", "Padding", "Memcpy", "fill", "Fill")),
                  ("adds", ("add", "Add")))  # fmt: skip


def prepare(
    vae: torch.nn.Module, variant: str, use_graphs: bool = True
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype, bool]:
    """A decode function of latents for `variant`, on a copy of `vae`: (decode, latent dtype, channels-last)."""
    dtype = torch.float32 if variant.startswith("float32") else torch.bfloat16
    module = copy.deepcopy(vae).to(dtype)
    torch.backends.cudnn.benchmark = "autotune" in variant
    if "VaeDecoder" in variant:
        return VaeDecoder(module, use_graphs=use_graphs), dtype, module.device.type == "cuda"
    channels_last = "channels-last" in variant
    if channels_last:  # the 3-D convolutions' weights (Module.to would try every parameter, 1-D ones included)
        for conv in (m for m in module.modules() if isinstance(m, torch.nn.Conv3d)):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return lambda latents: module.decode(latents).sample, dtype, channels_last


def seconds_per_decode(
    decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, repeats: int, cuda_graph: bool = False
) -> tuple[float, torch.Tensor]:
    """Mean seconds of `decode(latents)` (or of replaying it captured in a CUDA graph) after two warm-ups (the
    second is where `VaeDecoder` captures its graph), and the decoded sample."""
    synchronize = torch.cuda.synchronize if latents.is_cuda else (lambda: None)
    with torch.no_grad():
        decode(latents)
        sample = decode(latents)
        run = lambda: decode(latents)  # noqa: E731
        if cuda_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                sample = decode(latents)
            run = graph.replay
            run()
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize()
    return (time.perf_counter() - start) / repeats, sample


def kernel_split(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> dict[str, float]:
    """ms of device time of one eager `decode(latents)` by kernel class (`KERNEL_CLASSES`, else "other"), from
    PyTorch's profiler (on the CPU: its ops' own CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = latents.is_cuda
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
        decode(latents)
        if on_cuda:
            torch.cuda.synchronize()
    split: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name != ("CUDA" if on_cuda else "CPU"):
            continue
        name = next((cls for cls, keys in KERNEL_CLASSES if any(key in event.name for key in keys)), "other")
        us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        split[name] = split.get(name, 0.0) + us / 1e3
    return split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--latents", default="5,11,20", help="latent frames,height,width")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tflops", type=float, default=800.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of VARIANTS, in order (errors are against the first's decode)")
    parser.add_argument("--profile", action="store_true",
                        help="per variant at the last batch size: device time of one eager decode by kernel class")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    from diffusers import AutoencoderKLWan

    frames, height, width = (int(n) for n in args.latents.split(","))
    config = AutoencoderKLWan.load_config(args.checkpoint / "vae")
    with torch.device("meta"):
        flops_per_clip, _ = decode_flops(AutoencoderKLWan.from_config(config).eval(), config["z_dim"], frames, height,
                                         width)  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKLWan.from_config(config).eval().to(args.device)
    rows, profiles = [], {}
    batches = [int(n) for n in args.batches.split(",")]
    for batch in batches:
        latents = torch.randn(batch, config["z_dim"], frames, height, width, device=args.device)
        reference = None
        for variant in variants:
            if "cuda-graph" in variant and args.device != "cuda":
                continue
            decode, dtype, channels_last = prepare(vae, variant)
            inputs = latents.to(dtype)
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
            seconds, sample = seconds_per_decode(decode, inputs, args.repeats, "cuda-graph" in variant)
            sample = sample.float()
            reference = sample if reference is None else reference
            error = float((sample - reference).norm() / reference.norm())
            tflops = flops_per_clip * batch / seconds / 1e12
            rows.append({"variant": variant, "batch": batch, "ms_per_clip": seconds / batch * 1e3, "tflops": tflops,
                         "fraction": tflops / args.tflops, "rel_error_vs_float32": error})  # fmt: skip
            del decode
            if args.profile and batch == batches[-1]:
                eager, _, _ = prepare(vae, variant, use_graphs=False)
                with torch.no_grad():
                    eager(inputs)  # lazy initialisation outside the profile
                profiles[variant] = kernel_split(eager, inputs)
                del eager
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "latents": [frames, height, width], "flops_per_clip": flops_per_clip, "tflops_ref": args.tflops,
              "rows": rows, "profiles": profiles, "profile_batch": batches[-1]}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nVAE decode, {report['device']}, latents {frames} x {height} x {width}, "
          f"{flops_per_clip / 1e12:.2f} TFLOP per clip (floor {flops_per_clip / args.tflops / 1e9:.1f} ms at "
          f"{args.tflops:.0f} TFLOP/s)")  # fmt: skip
    print(f"{'variant':36}{'batch':>6}{'ms/clip':>9}{'TFLOP/s':>9}{'of ref':>8}{'rel err':>9}")
    for row in rows:
        print(f"{row['variant']:36}{row['batch']:6d}{row['ms_per_clip']:9.1f}{row['tflops']:9.1f}"
              f"{row['fraction']:8.2f}{row['rel_error_vs_float32']:9.1e}")  # fmt: skip
    for variant, split in profiles.items():
        print(f"\n{variant}, batch {batches[-1]}, one eager decode: {sum(split.values()):.1f} ms of device time")
        for name, ms in sorted(split.items(), key=lambda item: -item[1]):
            print(f"  {name:36}{ms:9.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
