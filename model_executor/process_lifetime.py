"""vLLM's engine processes live no longer than the process that started them.

The API server starts vLLM's engine core as a child process, and the engine core starts its workers (tensor
parallelism). When a parent is killed (the kernel's OOM killer, `kill -9`), its children would live on, orphaned,
holding the device and host memory a restarted server needs. Each child asks Linux to kill it when its parent dies
(`PR_SET_PDEATHSIG`), so the whole tree goes with the process at its root.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """In a child started by `multiprocessing` (vLLM's engine core and workers): SIGKILL this process when its
    parent exits, and at once if the parent is already gone. A no-op in a process not started that way (a server,
    a script, a test) and off Linux."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent.pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
