"""Argument checks shared by every entry point.

Each helper checks one value and raises ``ValueError`` (bad value) or ``TypeError`` (wrong kind of
object) with a message that names the argument in backticks and repeats the value it got, e.g.
``ValueError: `lr` must be a positive finite number, got -0.1``. Entry points call these before any
model work, so a bad call never runs a forward pass or touches the model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import arch
from .data import TrainingDatapoint

#: Adam's first step is up to ~10x lr: beyond ~3e37 it overflows float32 inside torch.
MAX_LR = 1e30


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(name: str, value: Any, *, allow_none: bool = True, allow_zero: bool = False,
             maximum: float | None = None, why: str = "") -> float | None:
    """A finite number ``> 0`` (``>= 0`` with ``allow_zero``), or None if ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_real(value) or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be a {'non-negative' if allow_zero else 'positive'} finite number, "
                         f"got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be at most {maximum:g}{why}, got {value!r}")
    return float(value)


def lr(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """A learning rate: positive, finite and at most :data:`MAX_LR`."""
    return positive(name, value, allow_none=allow_none, maximum=MAX_LR,
                    why=" (Adam's steps would overflow float32)")


def real(name: str, value: Any, *, allow_none: bool = False, finite: bool = True, unit: str = "") -> float | None:
    """Any real number (finite unless ``finite=False``; never NaN), or None if ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_real(value) or math.isnan(value) or (finite and not math.isfinite(value)):
        kind = "finite number" if finite else "number"
        raise ValueError(f"`{name}` must be a {kind}{unit}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def integer(name: str, value: Any, minimum: int, *, maximum: int | None = None, allow_none: bool = False,
            what: str = "") -> int | None:
    """An int in ``[minimum, maximum]`` (bools refused), or None if ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum or \
            (maximum is not None and int(value) > maximum):
        rng = f"in [{minimum}, {maximum}]{what}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"`{name}` must be an int {rng}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def seed(name: str, value: Any, *, allow_none: bool = True) -> int | None:
    """A seed for ``torch.Generator.manual_seed``: an int in ``[0, 2**63)``, or None if ``allow_none``."""
    if (value is None and not allow_none) or (value is not None and (isinstance(value, bool)
                                                                     or not isinstance(value, numbers.Integral))):
        raise TypeError(f"`{name}` must be an int{' or None' if allow_none else ''}, got {value!r:.60}")
    return integer(name, value, 0, maximum=2**63 - 1, allow_none=True)


def text(name: str, value: Any) -> str:
    """A non-empty ``str``."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"`{name}` is an empty string; expected some text")
    return value


def choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of ``choices``."""
    if not any(value == c and type(value) is type(c) for c in choices):
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {opts}, got {value!r:.60}")
    return value


def boolean(name: str, value: Any) -> bool:
    """A bool (ints and other truthy objects refused: they are usually a misplaced argument)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r:.60}")
    return value


def vector(name: str, value: Any, d: int) -> torch.Tensor:
    """A real, finite tensor of shape ``(d,)`` holding data (not on the meta device)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != (d,):
        raise ValueError(f"`{name}` must have shape ({d},) (the model's hidden size), got {tuple(value.shape)}")
    if value.is_meta or value.is_complex() or not value.is_floating_point():
        raise ValueError(f"`{name}` must be a real floating-point tensor with data, got a {value.dtype} tensor "
                         f"on {value.device}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return value


def finite_in_dtype(name: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Refuse a tensor whose values are not finite once cast to ``dtype``, the dtype it will be used in (e.g.
    ``1e300`` is finite in float64 but infinite in float32, and ``1e5`` infinite in float16); ``value`` is
    returned unchanged.

    Raises:
        ValueError: naming ``name``, the largest magnitude and the dtype's range.
    """
    if value.dtype == dtype or not dtype.is_floating_point:
        ok = bool(torch.isfinite(value).all())
    else:
        ok = bool(torch.isfinite(value.detach().to(dtype)).all())
    if not ok:
        biggest = float(value.detach().abs().max()) if value.numel() else 0.0
        raise ValueError(f"`{name}` holds values that are not finite in {str(dtype).removeprefix('torch.')} (largest "
                         f"magnitude {biggest:.3g}; the dtype's range is +-{torch.finfo(dtype).max:.3g}), so the "
                         "model's activations would become inf/NaN")
    return value


def model(value: Any, name: str = "model") -> nn.Module:
    """A HuggingFace causal LM (any ``torch.nn.Module``)."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"`{name}` must be a HuggingFace causal LM (a torch.nn.Module), got {type(value).__name__}")
    return value


def tokenizer(value: Any, name: str = "tokenizer") -> Any:
    """The model's HuggingFace tokenizer (required, callable)."""
    if value is None:
        raise ValueError(f"`{name}` is required: pass the model's HuggingFace tokenizer ({name}=...)")
    if not callable(value):
        raise TypeError(f"`{name}` must be the model's HuggingFace tokenizer (callable), got "
                        f"{type(value).__name__} {value!r:.60}")
    return value


def datapoints(value: Any, name: str = "datapoints") -> list[TrainingDatapoint]:
    """A non-empty list of :class:`TrainingDatapoint` (a single one is wrapped in a list)."""
    if isinstance(value, TrainingDatapoint):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of TrainingDatapoint, got {value!r:.80}")
    for i, dp in enumerate(value):
        if not isinstance(dp, TrainingDatapoint):
            raise TypeError(f"`{name}[{i}]` must be a TrainingDatapoint, got {type(dp).__name__}")
    return list(value)


def layers(m: nn.Module, layer: Any, name: str = "layer") -> list[int]:
    """One block index or a list of distinct ones (negative counts from the end), resolved to ``>= 0``."""
    items = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not items:
        raise ValueError(f"`{name}` is empty; expected at least one layer index")
    resolved = [arch.resolve_layer(m, x, name=name) for x in items]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`{name}` contains duplicate layers: {layer!r}")
    return resolved


def number_list(name: str, values: Any, *, allow_none: bool = False, positive: bool = False) -> list[Any]:
    """``values`` (one number or a non-empty sequence) as a list of finite numbers (``positive``: > 0; ``allow_none``:
    None entries kept); a ValueError naming ``name`` otherwise."""
    if isinstance(values, (int, float)) or values is None:
        values = [values]
    out = list(values)
    if not out:
        raise ValueError(f"`{name}` must be a non-empty list")
    for v in out:
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"`{name}` must contain finite{' positive' if positive else ''} numbers"
                             f"{' or None' if allow_none else ''}, got {v!r}")
    return out
