"""PNG and MP4 outputs, read back with independent decoders (PIL, PyAV)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from cosmos3_serve.server.encoding import mp4_bytes, png_bytes
from tests import media


def test_png_round_trips_exactly() -> None:
    frame = np.asarray(media.smooth_image(seed=1, height=40, width=56))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(frame)))), frame)


@pytest.mark.parametrize("fps", [16.0, 24.0, 29.97])
def test_mp4_is_h264_with_the_requested_fps_and_frames(fps: float) -> None:
    frames = media.smooth_video(seed=2, num_frames=9, height=48, width=64)
    with av.open(io.BytesIO(mp4_bytes(frames, fps))) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
        assert abs(float(stream.average_rate) - fps) < 0.01
    assert len(decoded) == 9 and decoded[0].shape == (48, 64, 3)
    assert np.abs(np.stack(decoded).astype(float) - frames).mean() < 8.0  # lossy (4:2:0 chroma), unrelated frames: ~80


def test_mp4_pads_odd_sizes() -> None:
    frames = media.smooth_video(seed=3, num_frames=5, height=33, width=47)
    with av.open(io.BytesIO(mp4_bytes(frames, 24.0))) as container:
        assert next(container.decode(video=0)).to_ndarray(format="rgb24").shape == (34, 48, 3)
