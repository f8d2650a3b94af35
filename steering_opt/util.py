"""Tiny helpers shared by the package's modules (standard library only, cheap to import)."""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["CallableModule", "make_module_callable"]


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
