"""Ctrl-C swept over whole calls: a ``KeyboardInterrupt`` pressed at any of ~60 evenly spread moments of the
library's own code during evaluation, contrastive extraction, ``SteeringVector.apply`` + ``model.generate`` and
rotalabs-steer's ``generate_with_steering`` always reaches the caller and leaves the model exactly as it was.

How a moment is injected (as in ``test_interrupts.py``): a ``sys.settrace`` function counts the ``line`` events
of frames whose code lives under ``steering_opt/`` and, after the chosen one, delivers ``SIGINT`` the way the
interpreter does: to the installed handler (the default one raises ``KeyboardInterrupt``; the library's
deferring handler holds it back) when the next Python function starts, where CPython checks for pending
signals. The model is compared while the interrupt's traceback is still held, as an interactive session
keeps it (``sys.last_traceback``): cleanup must not wait for the traceback's frames to be freed.
"""

from __future__ import annotations

import dis
import gc
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from test_interrupts import _odd_state
from test_reliability import ModelState
from torch import nn

import steering_opt as so
from steering_opt.compat import rotalabs_steer
from steering_opt.contrastive import contrastive_vector

#: Interrupt moments tried per entry point (evenly spread over all the library lines it executes).
POINTS = 80
_PACKAGE_DIR = str(Path(so.__file__).resolve().parent)
_D = 64  # the tiny models' hidden size


def _in_library(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR)


#: Where CPython itself offers no protection, whatever the library does: an interrupt taken as the ``__enter__``
#: or ``__exit__`` of a context manager starts (python/cpython#74174); the cleanup there is left to the
#: objects' finalizers, which run once the interrupt's traceback is released.
_WITH_METHODS = ("__enter__", "__exit__")


def _called_by_with(frame: Any) -> bool:
    """Whether ``frame`` (at its ``call`` event) is the ``__enter__`` / ``__exit__`` call of a ``with`` statement."""
    if frame.f_code.co_name in _WITH_METHODS:
        return True
    back = frame.f_back
    ins = list(dis.get_instructions(back.f_code)) if back is not None else []
    at = next((i for i, x in enumerate(ins) if x.offset == back.f_lasti), None)
    if at is None:
        return False
    if ins[at].opname in ("BEFORE_WITH", "SETUP_WITH", "WITH_EXCEPT_START"):
        return True
    before = [x for x in ins[max(0, at - 6):at] if x.opname not in ("PRECALL", "PUSH_NULL")][-3:]
    return len(before) == 3 and all(x.opname == "LOAD_CONST" and x.argval is None for x in before)  # exit(None, ..)


#: Frames where a signal is not delivered: a finalizer (CPython reports an exception raised in ``__del__`` as
#: "ignored"), and generators (resumed or closed: their closing on deallocation takes no signal).
_CO_GENERATOR = 0x20


def _traced(call: Callable[[], Any], at: int) -> tuple[int, str | None, bool, KeyboardInterrupt | None]:
    """Run ``call()`` with Ctrl-C pressed after the ``at``-th library line (0: never).

    Returns ``(library lines executed, where the Ctrl-C was pressed and taken, whether it was taken as a
    ``with`` statement called ``__enter__`` / ``__exit__``, the KeyboardInterrupt that reached us)``. A Ctrl-C
    pressed at the very last line is taken in the caller, when ``call`` has returned.
    """
    seen: dict[str, Any] = {"moments": 0, "where": None, "armed": False, "with": False}

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            seen["moments"] += 1
            if seen["moments"] == at:
                seen["where"] = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} ({frame.f_code.co_name})"
                seen["armed"] = True
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        if seen["armed"] and code.co_name != "__del__" and not code.co_flags & _CO_GENERATOR:
            seen["armed"] = False
            seen["where"] += f", taken entering {code.co_name}"
            seen["with"] = _called_by_with(frame)
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):
                handler(signal.SIGINT, frame)
        return local if _in_library(code.co_filename) else None

    caught: KeyboardInterrupt | None = None
    grad_mode = torch.is_grad_enabled()
    sys.settrace(tracer)
    try:
        call()
        if seen["armed"]:
            raise KeyboardInterrupt("taken after the call returned")
    except KeyboardInterrupt as e:
        caught = e
    finally:
        sys.settrace(None)
        if torch.is_grad_enabled() != grad_mode:  # torch.no_grad's own __exit__ skipped: put back for the next run
            torch.set_grad_enabled(grad_mode)
            seen["where"] += " (grad mode left changed)"
    return seen["moments"], seen["where"], seen["with"], caught


def _sweep(make_model: Callable[[], nn.Module], run: Callable[[nn.Module], Any], points: int = POINTS,
           last: int | None = None) -> int:
    """Interrupt ``run(model)`` at ``points`` moments; returns the number of library lines of one run.
    Fails listing every moment whose Ctrl-C was swallowed or left the model changed (while its traceback is
    held; for :data:`_WITH_METHODS`, once it is released)."""
    model = make_model()
    state = ModelState.of(model)
    run(model)  # first-use work (imports, caches) out of the way: every run below executes the same lines
    total, _, _, caught = _traced(lambda: run(model), 0)
    assert caught is None and total >= points
    state.assert_same(model)  # an uninterrupted run changes nothing either
    failures: list[str] = []
    first = 1 if last is None else total - last + 1  # only the ``last`` moments, when given
    for at in sorted({first + round(i * (total - first) / (points - 1)) for i in range(points)}):
        _, where, by_with, caught = _traced(lambda m=model: run(m), at)
        if caught is None:
            failures.append(f"moment {at}/{total} at {where}: the Ctrl-C was swallowed")
        elif where is not None and where.endswith("(grad mode left changed)") and not by_with:
            failures.append(f"moment {at}/{total} at {where}")
        elif by_with:
            caught = None
            gc.collect()  # the traceback and its frames are part of reference cycles
        try:
            state.assert_same(model)
        except AssertionError as e:
            failures.append(f"moment {at}/{total} at {where}{' (traceback released)' if by_with else ''}: {e}")
            caught = None
            gc.collect()  # what the traceback held is finalized now, not during a later traced run
            model = make_model()  # a fresh model for the remaining moments
            state = ModelState.of(model)
        caught = None
    assert not failures, "\n".join(failures)
    return total


@pytest.fixture
def tiny(tokenizer: Any) -> Callable[[], nn.Module]:
    return lambda: _odd_state(make_tiny_model("llama", len(tokenizer)))


VEC = so.SteeringVector({1: torch.linspace(-1, 1, _D), 2: torch.linspace(1, -1, _D)})


def test_ctrl_c_during_evaluate(tiny: Callable[[], nn.Module], tokenizer: Any) -> None:
    """``steering_opt.evaluate`` with generation, margins and KL (baseline and steered passes)."""

    def run(model: nn.Module) -> Any:
        return so.evaluate(model, tokenizer, VEC, ["Hi", "A cat"], promote=[" yes"], suppress=[" no"],
                           neutral_prompts=["The"], max_new_tokens=2, fluency_lang=None, progress=False)

    _sweep(tiny, run)


def test_ctrl_c_during_contrastive_vector(tiny: Callable[[], nn.Module], tokenizer: Any) -> None:
    """Contrastive extraction (``contrastive_vector`` = ``train_steering_vector``), two batches."""

    def run(model: nn.Module) -> Any:
        return contrastive_vector(model, tokenizer, [("I love it", "I hate it"), ("Yes", "No")], [1, 2],
                                  batch_size=2, show_progress=False)

    _sweep(tiny, run)


def test_ctrl_c_during_apply_and_generate(tiny: Callable[[], nn.Module], tokenizer: Any) -> None:
    """``with vec.apply(model, injection_mode="last"): model.generate(...)``."""
    ids = torch.tensor([tokenizer.encode("Hello there")])

    def run(model: nn.Module) -> Any:
        with VEC.apply(model, multiplier=2.0, injection_mode="last"):
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,  # type: ignore[operator]
                                  do_sample=False, pad_token_id=2)

    _sweep(tiny, run)


def test_ctrl_c_during_generate_with_steering(tiny: Callable[[], nn.Module], tokenizer: Any) -> None:
    """rotalabs-steer's ``generate_with_steering`` on a left-padded batch."""

    def run(model: nn.Module) -> Any:
        return rotalabs_steer.generate_with_steering(model, tokenizer, ["Hi", "A cat sat"], VEC, multiplier=2.0,
                                                     max_new_tokens=2)

    _sweep(tiny, run)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="SteeringVector.apply removes its hooks with "
                   "`finally: handle.remove()`: a Ctrl-C taken as that call starts leaves them on while the traceback "
                   "is held (`with handle:` there instead swallows the Ctrl-C at two moments)")
def test_ctrl_c_as_apply_leaves_its_block(tiny: Callable[[], nn.Module], tokenizer: Any) -> None:
    """Every one of the last 60 moments of ``with vec.apply(model): model(...)``, as the hooks are taken off."""
    ids = torch.tensor([tokenizer.encode("Hello there")])

    def run(model: nn.Module) -> Any:
        with VEC.apply(model):
            return model(input_ids=ids)

    _sweep(tiny, run, points=60, last=60)


def test_the_sweep_notices_a_leaked_hook(tiny: Callable[[], nn.Module]) -> None:
    """The sweep itself: a call that leaks a hook only when interrupted is caught."""

    def leaky(model: nn.Module) -> None:
        handle = model.register_forward_pre_hook(lambda *a: None)
        so.SteeringVector({1: torch.ones(_D)}).check_values()  # library lines: the Ctrl-C lands here
        handle.remove()  # not reached when interrupted (no try/finally)

    with pytest.raises(AssertionError, match="hooks left behind"):
        _sweep(tiny, leaky, points=10)
