"""Killing the `retrack` command for real, the way an OOM kill or a lost node ends a driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def kill_retrack_when(args: list[str], ready: Callable[[], object], what: str, timeout: float = 600, poll: float = 0.1,
                      env: dict[str, str] | None = None) -> None:
    """Run `retrack *args` (with `env` added to the environment) in its own process group and
    SIGKILL the whole group (its local Ray instance included) as soon as `ready()` holds; fails if
    the command ended before that."""
    exe = Path(sys.executable).with_name("retrack")
    proc = subprocess.Popen([str(exe), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"retrack {args[0]} ended before {what}"
            assert time.monotonic() < deadline, f"retrack {args[0]}: no {what} within {timeout:.0f} s"
            time.sleep(poll)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
