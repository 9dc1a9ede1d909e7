"""vLLM's engine processes live no longer than the process that started them.

The API server starts vLLM's engine core as a child process, and the engine core starts its workers (tensor
parallelism). When a parent is killed (the kernel's OOM killer, `kill -9`), its children would live on, orphaned,
holding the device and host memory a restarted server needs. Each child asks Linux to kill it when its parent dies
(`PR_SET_PDEATHSIG`), so the whole tree goes with the process at its root.

With vLLM's Ray executor (`--distributed-executor-backend ray`) the workers are Ray actors: the raylet of their node
starts them, not `multiprocessing`, and on nodes other than the engine core's, so no parent of theirs stands for the
engine. Ray ties their lifetime to their owner instead: when the engine core (the Ray driver that created them)
dies, Ray ends its actors on every node. The request is therefore made only in processes that `multiprocessing`
started, which leaves Ray's actors to Ray.
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
    a script, a test, a Ray actor) and off Linux."""
    parent = multiprocessing.parent_process()
    if parent is not None and sys.platform.startswith("linux"):
        _killed_with(parent.pid)


def killed_with_parent(parent_pid: int):
    """A `subprocess.Popen(preexec_fn=...)` for a child of the process `parent_pid` (the caller): the child is
    SIGKILLed when that process exits (the request survives the child's exec). A no-op off Linux."""

    def request() -> None:
        if sys.platform.startswith("linux"):
            _killed_with(parent_pid)

    return request


def _killed_with(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
