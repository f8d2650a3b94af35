"""The optimisers of ``OptimizeOptions.optimizer`` (see :func:`make_optimizer`).

* ``"adam"``: ``torch.optim.Adam`` at the constant ``lr`` (llm-steering-opt's optimiser).
* ``"adam_cosine"``: Adam with a linear warm-up over the first 5% of the step cap, then a cosine decay of the
  lr to a tenth of ``lr`` at the cap (:func:`lr_factor`).
* ``"normalized"``: :class:`NormalizedGD` (steps of a fixed length along the gradient) with the same schedule.
* ``"lbfgs"``: ``torch.optim.LBFGS`` with a strong-Wolfe line search, one iteration per round of the loop
  (:meth:`steering_opt.loop.JobState.after_eval`); the first step is ``lr · sqrt(numel)`` long (torch's own first
  step, ``-g · min(1, 1/‖g‖₁)``, is tiny for these losses and costs line-search evaluations to grow), later steps
  follow the curvature estimate.

The projection onto the norm caps runs after every step, whichever the optimiser.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .options import DEFAULT_MAX_ITERS, OptimizeOptions

__all__ = ["NormalizedGD", "lr_factor", "make_optimizer"]


class NormalizedGD(torch.optim.Optimizer):
    """Normalised gradient descent: every tensor ``p`` moves by ``lr · sqrt(p.numel()) · g / ‖g‖`` (a step
    as long as an Adam step of ``lr`` per coordinate, whatever the gradient's scale)."""

    def __init__(self, params: Any, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                n = float(p.grad.norm())
                if n > 0 and math.isfinite(n):
                    p.sub_(p.grad, alpha=group["lr"] * math.sqrt(p.numel()) / n)


def lr_factor(step: int, cap: int) -> float:
    """The schedule of ``adam_cosine`` / ``normalized``: the lr multiplier at ``step`` of ``cap`` steps: linear
    warm-up over the first 5% (at least one step), then cosine decay from 1 to 0.1 at ``cap``."""
    warm = max(1, round(0.05 * cap))
    if step < warm:
        return (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, cap - warm))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))


def make_optimizer(tensors: list[torch.Tensor], options: OptimizeOptions
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR | None]:
    """The optimiser of ``options.optimizer`` over ``tensors`` and its lr schedule (None: constant)."""
    name = options.optimizer
    if name == "lbfgs":  # one iteration per round; the line search re-evaluates through the engine
        return torch.optim.LBFGS(tensors, lr=1.0, max_iter=1, max_eval=25, history_size=20,
                                 line_search_fn="strong_wolfe"), None
    if name == "normalized":
        opt: torch.optim.Optimizer = NormalizedGD(tensors, lr=options.lr)
    else:
        opt = torch.optim.Adam(tensors, lr=options.lr)
    if name == "adam":
        return opt, None
    cap = options.max_iters if options.max_iters is not None else DEFAULT_MAX_ITERS
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cap))
