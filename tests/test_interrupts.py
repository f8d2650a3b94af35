"""Interrupts: a ``KeyboardInterrupt`` (Ctrl-C) at any moment, also while the library is already cleaning up
after an earlier one, leaves the model exactly as it was, and still reaches the caller.

Deterministic injections: a restore step that raises once (a second interrupt during cleanup), a real
``SIGINT`` sent while the model's flags are being put back, and an interrupt raised at every sampled line
the library executes during a short optimisation (a line tracer raising ``KeyboardInterrupt``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from test_reliability import ModelState
from torch import nn
from torch.utils.hooks import RemovableHandle

import steering_opt as so
from steering_opt import arch, hooks, util
from steering_opt import engine as engine_module

DPS = [so.TrainingDatapoint("Hello there", src_completions=[" no"], dst_completions=[" yes"])]


def _odd_state(model: nn.Module) -> nn.Module:
    """Some weights trainable (some with a .grad), some modules in train mode, no KV cache."""
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 == 0)
        if i % 6 == 0:
            p.grad = torch.full_like(p, 0.25)
    for i, m in enumerate(model.modules()):
        m.training = i % 2 == 0
    model.config.use_cache = False
    return model


def _optimise(model: nn.Module, tokenizer: Any) -> Any:
    return so.optimize_vector(model, DPS, 2, tokenizer=tokenizer, max_iters=2, lr=0.1, seed=0)


class _Once:
    """Replace ``owner.name`` by a wrapper that runs ``action`` once (when armed and ``when(*args)``),
    then calls the original."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, action: Callable[[], None],
                 when: Callable[..., bool] = lambda *a, **k: True) -> None:
        self.armed = False
        self.fired = 0
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.armed and when(*args, **kwargs):
                self.armed = False
                self.fired += 1
                action()
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def _raise() -> None:
    raise KeyboardInterrupt("injected second interrupt")


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("action", [_raise, _sigint], ids=["raise", "sigint"])
def test_interrupt_while_flags_are_restored(monkeypatch: pytest.MonkeyPatch, tokenizer: Any,
                                            action: Callable[[], None]) -> None:
    """An interrupt while ``frozen_model`` puts ``requires_grad`` back: every flag is still restored, and the
    interrupt is raised afterwards."""
    assert threading.current_thread() is threading.main_thread()
    model = _odd_state(make_tiny_model("llama", len(tokenizer)))
    state = ModelState.of(model)
    handler = signal.getsignal(signal.SIGINT)
    once = _Once(monkeypatch, torch.Tensor, "requires_grad_", action,
                 when=lambda self, flag=True: bool(flag))  # the first flag set back to True
    with pytest.raises(KeyboardInterrupt):
        with hooks.frozen_model(model):
            assert not any(p.requires_grad for p in model.parameters())
            once.armed = True
    assert once.fired == 1
    state.assert_same(model)
    assert signal.getsignal(signal.SIGINT) is handler


def test_interrupt_while_hooks_are_removed(monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> None:
    """An interrupt while the optimiser's hooks are taken off after a step: none is left behind."""
    model = _odd_state(make_tiny_model("llama", len(tokenizer)))
    state = ModelState.of(model)
    once = _Once(monkeypatch, RemovableHandle, "remove", _raise)
    forwards = {"n": 0}

    def count(*_: Any) -> None:
        forwards["n"] += 1
        once.armed = forwards["n"] == 2  # the hooks of this forward are removed next

    handle = model.get_input_embeddings().register_forward_pre_hook(count)
    try:
        with pytest.raises(KeyboardInterrupt):
            _optimise(model, tokenizer)
    finally:
        once.armed = False
        handle.remove()
    assert once.fired == 1
    state.assert_same(model)


def test_interrupt_while_the_block_list_is_put_back(monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> None:
    """Skipping the lower blocks never swaps the model's block list, so an interrupt arriving while the
    library would put a list back cannot leave the model truncated."""
    model = make_tiny_model("llama", len(tokenizer))
    state = ModelState.of(model)
    once = _Once(monkeypatch, nn.Module, "__setattr__", _raise,
                 when=lambda self, name, value: isinstance(value, nn.ModuleList))
    once.armed = True
    _optimise(model, tokenizer)  # nothing to interrupt: the model's attributes are never set
    assert once.fired == 0
    state.assert_same(model)


_LIBRARY_FILES = {m.__file__ for m in (hooks, util, arch, engine_module) if m.__file__}
#: The functions that change or restore the model's state: registering and removing hooks, freezing and
#: restoring flags, swapping and putting back a block list.
_STATE_CHANGING = {"attach", "register_rest", "remove", "_remove_rest", "frozen_model", "enter", "leave", "freeze",
                   "restore", "truncated_blocks", "put_back"}


def _trace_interrupt(at: int) -> tuple[Callable[..., Any], dict[str, Any]]:
    """A ``sys.settrace`` function pressing Ctrl-C at moment ``at`` (1-based; 0: never): it counts the lines
    executed in the library's state-changing functions and, after the ``at``-th, delivers ``SIGINT`` the way
    the interpreter does: to the installed handler (the default one raises ``KeyboardInterrupt``), when the
    next Python function starts (where the interpreter checks for pending signals)."""
    seen: dict[str, Any] = {"moments": 0, "where": None, "armed": False}

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            seen["moments"] += 1
            if seen["moments"] == at:
                seen["where"] = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                seen["armed"] = True
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if seen["armed"]:
            seen["armed"] = False
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):
                handler(signal.SIGINT, frame)
        code = frame.f_code
        return local if code.co_filename in _LIBRARY_FILES and code.co_name in _STATE_CHANGING else None

    return tracer, seen


def _run_traced(model: nn.Module, tokenizer: Any, at: int) -> dict[str, Any]:
    tracer, seen = _trace_interrupt(at)
    sys.settrace(tracer)
    try:
        _optimise(model, tokenizer)
    except KeyboardInterrupt:
        seen["interrupted"] = True
    finally:
        sys.settrace(None)
    return seen


def test_ctrl_c_at_every_line_of_state_changes_restores_the_model(tokenizer: Any) -> None:
    """Ctrl-C pressed at any line of the code that registers/removes hooks or freezes/restores the model, during
    a short optimisation (hundreds of moments, each tried), always reaches the caller and never leaves the
    model changed."""
    model = _odd_state(make_tiny_model("llama", len(tokenizer)))
    state = ModelState.of(model)
    total = _run_traced(model, tokenizer, 0)["moments"]
    assert total > 100
    for at in range(1, total + 1, max(1, total // 150)):
        seen = _run_traced(model, tokenizer, at)
        assert seen.get("interrupted"), f"the Ctrl-C at {seen['where']} (moment {at}) was swallowed"
        try:
            state.assert_same(model)
        except AssertionError as e:
            raise AssertionError(f"Ctrl-C at {seen['where']} (moment {at} of {total}): {e}") from None
