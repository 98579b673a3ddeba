"""Stops that Python swallows: a signal handler's exception raised where it cannot propagate (a weakref
callback run by the import machinery, a ``__del__``) is printed with a traceback and dropped, and the
process carries on. ``stop_again`` makes a ``sys.unraisablehook`` that sends the signal again instead.
(Imports nothing heavy: the command line installs it before torch is imported.)"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

#: delay before a swallowed stop's signal is sent again (seconds)
RESTOP_SECONDS = 0.1


def stop_again(exc_type: type[BaseException], signum: Callable[[], int]) -> Callable[..., None]:
    """A ``sys.unraisablehook``: an unraisable ``exc_type`` (the stop a signal handler raises) prints
    nothing, and signal ``signum()`` is sent to this process again from a daemon timer ``RESTOP_SECONDS``
    later, once the hook has returned (a signal sent from inside the hook would be handled there and
    swallowed again), so the stop happens at a point that can unwind. Anything else goes to Python's
    default hook."""
    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, exc_type):
            sys.__unraisablehook__(unraisable)
            return
        again = threading.Timer(RESTOP_SECONDS, os.kill, (os.getpid(), signum()))
        again.daemon = True
        again.start()
    return hook
