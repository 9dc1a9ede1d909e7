"""Media encodings of generated frames: PNG for images, H.264 MP4 (PyAV) for videos."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image


def png_bytes(frame_hw3: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame_hw3).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames_thw3: np.ndarray, fps: float, crf: int = 18, preset: str = "veryfast") -> bytes:
    """H.264 in MP4 at `fps` (yuv420p: width and height are padded to even sizes by repeating the last pixel).

    x264's `veryfast` preset: a response waits for its encoding, and at the same quality (`crf`) it encodes about 3x
    faster than the default `medium` for about the same size (17 frames of 320x192: 85 vs 254 ms on one core)."""
    frames = frames_thw3
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()
