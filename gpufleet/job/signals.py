"""The checkpoint request signal the agent sends to a job's process group.

The handler only sets a flag; the training loop saves at its next ``step()``,
where the state is consistent. The signal name comes from
``GPUFLEET_CHECKPOINT_SIGNAL`` (default ``SIGUSR1``).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

from gpufleet.job.errors import CheckpointError
from gpufleet.logs import library_logger

log = library_logger(__name__)

SIGNAL_ENV = "GPUFLEET_CHECKPOINT_SIGNAL"
DEFAULT_SIGNAL = "SIGUSR1"


def resolve_signal(name: str | None = None) -> signal.Signals:
    """Turns a signal name such as ``SIGUSR1`` or ``USR2`` into a signal."""
    raw = (name or os.environ.get(SIGNAL_ENV) or DEFAULT_SIGNAL).strip().upper()
    full = raw if raw.startswith("SIG") else f"SIG{raw}"
    try:
        return signal.Signals[full]
    except KeyError:
        raise CheckpointError(
            SIGNAL_ENV,
            f"unknown signal name {raw!r}",
            hint="set GPUFLEET_CHECKPOINT_SIGNAL to a name such as SIGUSR1",
        ) from None


class CheckpointRequest:
    """A flag set by the checkpoint signal or by a direct ``request()`` call."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._signum: signal.Signals | None = None
        self._previous: Any = None

    def install(self, name: str | None = None) -> bool:
        """Installs the signal handler; returns False off the main thread."""
        signum = resolve_signal(name)
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "job.signal_not_installed", signal=signum.name, reason="not-main-thread"
            )
            return False
        self._previous = signal.signal(signum, self._handle)
        self._signum = signum
        return True

    def uninstall(self) -> None:
        """Puts back the handler that was there before ``install``."""
        if self._signum is not None and (
            threading.current_thread() is threading.main_thread()
        ):
            signal.signal(self._signum, self._previous or signal.SIG_DFL)
            self._signum = None

    def request(self) -> None:
        """Asks for a checkpoint at the next step."""
        self._event.set()

    def pending(self) -> bool:
        """True when a checkpoint was asked for and not yet taken."""
        return self._event.is_set()

    def clear(self) -> None:
        """Marks the request as served."""
        self._event.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()
