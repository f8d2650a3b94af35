"""MELBO objective (Mack & Turner 2024) for the output-constrained phase.

Pass the two functions of :func:`make_melbo_objective` as ``custom_output_constr_pre_loss_func`` /
``custom_output_constr_loss_func`` of :func:`~steering_opt.optimize.optimize` (with
``do_output_constr=True``): the phase then *maximises* how far the steering moves the residual stream
entering a later block over the completion positions, while every completion's loss stays within its
target and ``‖v‖`` stays at most its phase-1 value. (llm-steering-opt's ``make_melbo_loss_funcs``, with
that library's function signatures, is :func:`steering_opt.compat.melbo.make_melbo_loss_funcs`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import arch
from .data import TokenizedCompletion, TrainingDatapoint, tokenize_datapoints
from .hooks import capture_inputs
from .parameterization import Steering, steer


def target_activations(model: nn.Module, tokenizer: Any, datapoints: Sequence[TrainingDatapoint], layers: list[int],
                       steering: dict[int, Steering] | None, target_layer: int, *, only_hook_prompt: bool = False
                       ) -> list[tuple[TokenizedCompletion, torch.Tensor]]:
    """The residual stream entering block ``target_layer`` from the last prompt token on, ``(n_positions, d)``,
    for every (datapoint, completion), with ``steering`` applied at ``layers`` on each datapoint's ``token``
    positions (prompt only with ``only_hook_prompt``; ``-v`` on ``is_negative`` datapoints; None: unsteered).

    Returns ``(tokenized completion, activations)`` pairs in :func:`~steering_opt.data.tokenize_datapoints`
    order; the activations carry gradients to the steering when gradients are enabled.
    """
    seqs = tokenize_datapoints(tokenizer, datapoints, only_hook_prompt=only_hook_prompt)
    target = arch.get_site_module(model, target_layer)
    dev = arch.input_device(model)
    out = []
    for s in seqs:
        hooks = []
        if steering is not None:
            mask = torch.tensor(s.steer_positions)[None] if s.steer_positions is not None else None
            for layer in layers:
                p = steering[layer]

                def fn(h: torch.Tensor, p: Steering = p, sign: float = s.sign,
                       mask: torch.Tensor | None = mask) -> torch.Tensor:
                    return steer(h, [p], sign * p.vector, mask=mask)

                hooks.append((arch.get_site_module(model, layer), fn))
        with torch.set_grad_enabled(steering is not None and torch.is_grad_enabled()):
            (h,) = capture_inputs(model, [target], {"input_ids": torch.tensor([s.ids], device=dev), "use_cache": False},
                                  steer_hooks=hooks)
        out.append((s, h[0, s.prompt_len - 1:]))
    return out


def make_melbo_objective(
    target_layer: int, *, power: float = 1.0
) -> tuple[Callable[..., dict], Callable[..., torch.Tensor]]:
    """``(pre_loss_func, loss_func)`` for :func:`~steering_opt.optimize.optimize`'s output-constrained phase:
    maximise the mean distance ``‖h_T(steered) − h_T(unsteered)‖^power`` of the residual stream entering
    block ``target_layer`` over the completion positions (from the last prompt token on), averaged over
    completions. ``loss_func`` returns minus that distance (a 0-d tensor to minimise)."""

    def pre_loss_func(model: nn.Module, tokenizer: Any, datapoints: Sequence[TrainingDatapoint], layers: list[int],
                      steering: dict[int, Steering]) -> dict:
        with torch.no_grad():
            acts = target_activations(model, tokenizer, datapoints, layers, None, target_layer)
        return {"unsteered": [a.detach() for _, a in acts]}

    def loss_func(model: nn.Module, tokenizer: Any, datapoints: Sequence[TrainingDatapoint], layers: list[int],
                  steering: dict[int, Steering], unsteered: list[torch.Tensor]) -> torch.Tensor:
        steered = target_activations(model, tokenizer, datapoints, layers, steering, target_layer)
        dist = [(a.float() - b.float()).norm(dim=-1).pow(power).mean() for (_, a), b in zip(steered, unsteered)]
        return -torch.stack(dist).mean()

    return pre_loss_func, loss_func
