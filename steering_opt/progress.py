"""Progress bars: when they show, and the one way to make one.

Every long-running function (``optimize``, ``optimize_many``, ``sweep``, ``auto_steer``, ``evaluate``,
``extract_activations`` / ``contrastive_vector``) takes ``progress`` (``show_progress`` for the contrastive ones):

* ``None`` (the default): a bar when a person is watching: in a Jupyter kernel, or when stderr is a terminal;
  none when stderr goes to a file, a pipe, CI or pytest. The environment variable ``STEERING_OPT_PROGRESS``
  changes this default without touching code: ``0`` (also ``false``/``off``/``no``) never shows one, ``1``
  (``true``/``on``/``yes``) always does (e.g. to log progress to a file).
* ``True`` / ``False``: always / never (the environment variable does not override an explicit value).

A function that runs others shows one overall bar with an ETA (``sweep`` and ``auto_steer``: configurations;
``optimize_many``: loss evaluations of all jobs; ``evaluate``: model forward passes) and the runs inside it,
whose ``progress`` is ``None``, report to that bar instead of drawing their own. In Jupyter the bar is a widget
when ``ipywidgets`` is installed, else text on stderr (without tqdm's "IProgress not found" warning).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = ["ENV_VAR", "Progress", "advance", "check_progress", "in_jupyter", "overall", "progress_bar",
           "quiet_notebook_tqdm", "show_progress"]

#: The environment variable that sets what ``progress=None`` means (``0`` / ``1``).
ENV_VAR = "STEERING_OPT_PROGRESS"
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")

_ACTIVE: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("steering_opt_progress", default=None)


def in_jupyter() -> bool:
    """Whether this process is a Jupyter (ipykernel) kernel."""
    if "ipykernel" not in sys.modules:
        return False
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return getattr(shell, "kernel", None) is not None


def check_progress(progress: Any, name: str = "progress") -> None:
    """Raise ``TypeError`` unless ``progress`` is ``True``, ``False`` or ``None``."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"`{name}` must be True, False or None (None: show a bar when a person is watching), got "
                        f"{progress!r}")


def show_progress(progress: bool | None) -> bool:
    """Whether to show a progress bar: ``progress`` if it is ``True``/``False``; for ``None``, the
    ``STEERING_OPT_PROGRESS`` environment variable if set, else on in Jupyter or when stderr is a terminal.

    Raises:
        ValueError: ``STEERING_OPT_PROGRESS`` is set to something other than 0/1/true/false/on/off/yes/no.
    """
    if progress is not None:
        return bool(progress)
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in _ON:
        return True
    if env in _OFF:
        return False
    if env:
        raise ValueError(f"environment variable {ENV_VAR} must be 0 or 1 (or true/false, on/off, yes/no), got "
                         f"{os.environ[ENV_VAR]!r}")
    if in_jupyter():
        return True
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def quiet_notebook_tqdm() -> None:
    """In a Jupyter kernel without ``ipywidgets``, import ``tqdm.autonotebook`` once with its "IProgress not
    found" warning silenced, so that libraries importing ``tqdm.auto`` later (transformers) don't print it;
    their bars then fall back to text, as ours do. Does nothing elsewhere."""
    if not in_jupyter() or "tqdm.autonotebook" in sys.modules or importlib.util.find_spec("ipywidgets"):
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import tqdm.autonotebook  # noqa: F401


def _tqdm_class() -> Any:
    if in_jupyter() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm
    from tqdm.std import tqdm as std_tqdm

    return std_tqdm


class Progress:
    """A progress bar (tqdm underneath when shown), or a silent one that reports to an enclosing bar.

    Attributes:
        total: the planned amount of work (``unit`` s); ``n``: the amount done so far.
        unit: what is counted (``"config"``, ``"step"``, ``"pass"``, ...); a silent bar forwards its
            updates to the enclosing bar only when both count the same unit.
    """

    def __init__(self, total: float | None, desc: str, unit: str, *, show: bool, parent: Progress | None = None):
        self.total, self.unit, self.parent = total, unit, parent
        self.n: float = 0
        self._bar = _tqdm_class()(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) \
            if show else None

    def update(self, n: float = 1) -> None:
        """Record ``n`` more units of work done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.parent is not None and self.parent.unit == self.unit:
            self.parent.update(n)

    def set_total(self, total: float) -> None:
        """Change the planned amount of work (e.g. once a later stage's size is known)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def set_postfix(self, text: str = "", **values: Any) -> None:
        """Show ``text`` or ``key=value`` pairs after the bar (nothing for a silent bar)."""
        if self._bar is not None:
            if values:
                self._bar.set_postfix(values)
            else:
                self._bar.set_postfix_str(text)

    def close(self) -> None:
        """Remove the bar from the display (a finished bar leaves no line behind)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_bar(total: float | None, desc: str, *, progress: bool | None = None, unit: str = "it") -> Progress:
    """A :class:`Progress` for ``total`` units of work: shown per :func:`show_progress`, except that inside an
    :func:`overall` bar a ``progress=None`` bar is silent and reports to it. Close it when done."""
    parent = _ACTIVE.get()
    if parent is not None and progress is None:
        return Progress(total, desc, unit, show=False, parent=parent)
    return Progress(total, desc, unit, show=show_progress(progress))


@contextlib.contextmanager
def overall(total: float | None, desc: str, *, progress: bool | None = None, unit: str = "it") -> Iterator[Progress]:
    """A :func:`progress_bar` that work inside the block reports to: inner ``progress=None`` bars are silent
    and add to it (when they count the same ``unit``), as does :func:`advance`. Closed on exit."""
    bar = progress_bar(total, desc, progress=progress, unit=unit)
    token = _ACTIVE.set(bar)
    try:
        yield bar
    finally:
        _ACTIVE.reset(token)
        bar.close()


def advance(n: float, unit: str) -> None:
    """Report ``n`` units of work to the enclosing :func:`overall` bar, if it counts ``unit`` (else nothing)."""
    bar = _ACTIVE.get()
    if bar is not None and bar.unit == unit:
        bar.update(n)


quiet_notebook_tqdm()
