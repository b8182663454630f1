"""`ray.init` replaces the process's SIGTERM handler: keep the one in force.

Ray's driver answers SIGTERM with `sys.exit`. In a flow run that turns a Prefect
cancellation (which arrives as SIGTERM and which Prefect's own handler reports as
Cancelled) into a crash, and in `prefect-vllm run` it bypasses the handler that exits
143 after shutting the run down. The run's own clean-up (its `finally` blocks, the task
runner's exit) stops Ray as on any failure.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["keeping_sigterm"]


@contextlib.contextmanager
def keeping_sigterm() -> Iterator[None]:
    """Put back, after the block, the SIGTERM handler in force before it.

    Examples:
        ```python
        import signal

        from prefect_vllm._launch.signals import keeping_sigterm

        before = signal.getsignal(signal.SIGTERM)
        with keeping_sigterm():
            signal.signal(signal.SIGTERM, lambda *_: None)  # as ray.init does
        assert signal.getsignal(signal.SIGTERM) is before
        ```
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread handles signals, and Ray sets none elsewhere
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
