"""`cosmos3-serve generate` from the command line: a PNG and an MP4 on the tiny checkpoint, and clear errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import av
from PIL import Image


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosmos3_serve.server.cli", "generate", *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_image_and_video(tiny_checkpoint: Path, tmp_path: Path) -> None:
    png, mp4 = tmp_path / "cube.png", tmp_path / "cube.mp4"
    common = ["--prompt", "A red cube.", "--num-inference-steps", "3", "--height", "32", "--width", "64", "--dtype", "float32"]
    result = _run(str(tiny_checkpoint), *common, "--out", str(png))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "denoising" in result.stderr and "3/3" in result.stderr  # the progress bar
    assert Image.open(png).size == (64, 32)

    result = _run(str(tiny_checkpoint), *common, "--num-frames", "9", "--fps", "16", "--image", str(png), "--out", str(mp4))
    assert result.returncode == 0, result.stderr[-3000:]
    with av.open(io.BytesIO(mp4.read_bytes())) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
        assert abs(float(container.streams.video[0].average_rate) - 16) < 0.01


def test_bad_options_name_the_option(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = _run(str(tiny_checkpoint), "--prompt", "x", "--num-frames", "4", "--out", str(tmp_path / "x.mp4"))
    assert result.returncode == 2 and "--num-frames" in result.stderr
    result = _run(str(tiny_checkpoint), "--prompt", "x", "--height", "30", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "--height" in result.stderr
