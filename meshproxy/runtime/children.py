"""Child processes that never outlive whoever started them."""

from __future__ import annotations

import ctypes
import signal
import subprocess

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A ``preexec_fn``: the kernel SIGKILLs the child if its parent dies first."""
    _parent_death_signal(signal.SIGKILL)


def stop_with_parent() -> None:
    """A ``preexec_fn``: the kernel SIGTERMs the child (so it can drain) if its parent dies."""
    _parent_death_signal(signal.SIGTERM)


def _parent_death_signal(signum: int) -> None:
    # Cleared by the kernel when the child changes credentials: children must keep ours.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; always reaps the process."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
