"""Deterministic test media: images, videos, and their data URLs (PNG, H.264 MP4)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def smooth_image(seed: int, height: int = 64, width: int = 96) -> Image.Image:
    """A smooth random RGB image (low-frequency noise upsampled), so resizing is well conditioned."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def smooth_video(seed: int, num_frames: int = 8, height: int = 64, width: int = 64) -> np.ndarray:
    """uint8 frames [T, H, W, 3]: a smooth image drifting one pixel per frame."""
    base = np.asarray(smooth_image(seed, height, width + num_frames))
    return np.stack([base[:, t : t + width] for t in range(num_frames)])


def video_metadata(num_frames: int, fps: float) -> dict:
    """What vLLM and transformers need to take pre-sampled frames as they are."""
    return {
        "fps": fps,
        "duration": num_frames / fps,
        "total_num_frames": num_frames,
        "frames_indices": list(range(num_frames)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def mp4_bytes(frames: np.ndarray, fps: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def mp4_data_url(frames: np.ndarray, fps: int) -> str:
    return "data:video/mp4;base64," + base64.b64encode(mp4_bytes(frames, fps)).decode()
