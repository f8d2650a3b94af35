"""Tiny helpers shared by the package's modules (standard library only, cheap to import)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["CallableModule", "deferred_interrupts", "make_module_callable", "uninterruptible"]

T = TypeVar("T")


class CallableModule(types.ModuleType):
    """A module that can also be called: ``module(*args, **kwargs)`` calls the module's function of the same name.

    Used where a public function and its module share a name (``steering_opt.sweep``, ``steering_opt.evaluate``).
    The package attribute has to be the module, because the import system binds it there and
    ``import steering_opt.sweep as m`` reads it back, while existing code calls ``steering_opt.sweep(model, ...)``.
    Everything else about the module is unchanged: ``steering_opt.sweep.GENERIC_PROMPTS``,
    ``from steering_opt.sweep import sweep`` and pickling of its objects work as for any module.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_module_callable(module_name: str) -> None:
    """Make the (already executing) module ``module_name`` a :class:`CallableModule`.

    Called as the last line of the module, ``make_module_callable(__name__)``, once its function of the same short
    name (``sweep`` in ``steering_opt.sweep``) exists.
    """
    if module_name == "__main__":  # run as a script (python -m steering_opt.sweep): nothing to forward to
        return
    module = sys.modules[module_name]
    short = module_name.rpartition(".")[2]
    if not callable(getattr(module, short, None)):
        raise TypeError(f"module {module_name!r} has no function {short!r} to forward calls to")
    module.__class__ = CallableModule


# ------------------------------------------------------------------------------------------ interrupts

_MAX_ATTEMPTS = 5


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back ``SIGINT`` (Ctrl-C) for the duration of the block; a Ctrl-C received meanwhile is delivered
    (to the handler that was installed before) when the block ends.

    Only the main thread receives signals, so in other threads (and where no Python handler is installed)
    this does nothing. Nests: an inner block re-delivers to the outer one's holding handler.
    """
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:
        yield
        return
    received: list[Any] = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, received[0])  # the default handler raises KeyboardInterrupt here
        elif received and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


def uninterruptible(fn: Callable[[], T]) -> T:
    """Run ``fn()`` to the end even if Ctrl-C is pressed meanwhile, then let the interrupt through.

    ``SIGINT`` is deferred (:func:`deferred_interrupts`); a ``KeyboardInterrupt`` raised anyway (by a signal
    that arrived just before, or by code inside ``fn``) makes ``fn`` run again from its start, so ``fn`` must be
    *resumable*: running it again after it was stopped part-way finishes the job (e.g. "restore every saved
    flag", "remove every handle still held"). After ``fn`` completes, the first such interrupt is re-raised.
    Other exceptions propagate at once. Gives up (re-raising) after a few interrupted attempts.
    """
    pending: BaseException | None = None
    for _ in range(_MAX_ATTEMPTS):
        try:
            with deferred_interrupts():
                result = fn()
            break
        except KeyboardInterrupt as e:
            pending = pending or e
    else:
        assert pending is not None
        raise pending
    if pending is not None:
        raise pending
    return result
