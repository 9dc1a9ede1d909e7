"""Per-deployment precision (BF16 / FP8 / NVFP4) for both towers."""
