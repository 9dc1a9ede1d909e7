"""Qwen3-VL interleaved multimodal rotary embedding, as both towers of Cosmos 3 apply it."""

from __future__ import annotations

import torch
from torch import nn


class InterleavedMRoPE(nn.Module):
    """Frequencies cycle through the T, H, W position axes along the head dimension (`axes_dim` per axis)."""

    def __init__(self, head_dim: int, rope_theta: float, axes_dim: tuple[int, int, int]) -> None:
        super().__init__()
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        axis = torch.zeros(head_dim // 2, dtype=torch.long)  # which position axis each frequency reads
        for a, offset in ((1, 1), (2, 2)):
            axis[offset : axes_dim[a] * 3 : 3] = a
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions_3n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[N, 1, head_dim]` for float positions `[3, N]`."""
        positions = positions_3n.float()[self.axis.to(positions_3n.device)]  # [D/2, N]
        freqs = (positions * self.inv_freq.to(positions.device)[:, None]).T  # [N, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return angles.cos(), angles.sin()


def apply_rope(x_nhd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` by the angles of (cos, sin); (cos, -sin) undoes it."""
    half = x_nhd.shape[-1] // 2
    rotated = torch.cat((-x_nhd[..., half:], x_nhd[..., :half]), dim=-1)
    return x_nhd * cos + rotated * sin
