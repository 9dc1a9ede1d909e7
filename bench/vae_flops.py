"""FLOPs of the VAE decode per output clip: the compute floor under the serving benches' decode times.

    python bench/vae_flops.py CKPT [--tflops 800] [--json OUT]

Runs anywhere (no GPU): the checkpoint's `vae/` (diffusers' `AutoencoderKLWan`) is built on the meta device and
decodes zero latents of each clip shape the serving bench produces under PyTorch's FLOP counter (matmuls and
convolutions, 2 FLOPs per multiply-add). Printed per shape: TFLOPs and the time they take at `--tflops` (a bf16
matmul rate to compare with; the GPU benches measure the card's own in `bench/generator_forward.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# (name, latent frames, latent height, latent width): the serving bench's requests.
CLIPS = (
    ("policy: 17 frames, 176 x 320", 5, 11, 20),
    ("text->image 720p", 1, 45, 80),
    ("text->video 480p, 33 frames", 9, 30, 52),
)


def decode_flops(vae: torch.nn.Module, z_dim: int, frames: int, height: int, width: int) -> tuple[int, tuple]:
    latents = torch.zeros(1, z_dim, frames, height, width, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        sample = vae.decode(latents).sample
    return counter.get_total_flops(), tuple(sample.shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tflops", type=float, default=800.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from diffusers import AutoencoderKLWan

    config = AutoencoderKLWan.load_config(args.checkpoint / "vae")
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(config).eval()
    rows = []
    for name, frames, height, width in CLIPS:
        flops, shape = decode_flops(vae, config["z_dim"], frames, height, width)
        rows.append({"clip": name, "output_shape": shape, "flops": flops, "floor_s": flops / (args.tflops * 1e12)})
    if args.json:
        Path(args.json).write_text(json.dumps({"tflops": args.tflops, "rows": rows}, indent=2))
    print(f"\nVAE decode FLOPs ({config['_class_name']}, decoder base dim {config.get('decoder_base_dim')}), "
          f"floor at {args.tflops:.0f} TFLOP/s")  # fmt: skip
    print(f"{'clip':32}{'output':>24}{'TFLOP':>9}{'floor ms':>10}")
    for row in rows:
        print(f"{row['clip']:32}{str(row['output_shape']):>24}{row['flops'] / 1e12:9.2f}{row['floor_s'] * 1e3:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
