"""Steering optimisation: find vectors / low-rank affine maps by gradient descent.

Public entry points: :func:`optimize_vector`, :func:`optimize_vectors`,
:func:`optimize_vector_minibatch_hf`. All of them:

* tokenise once, then hand per-completion losses to an engine (``engine="fast"`` by default,
  ``"reference"`` for the naive algorithm);
* optimise with Adam (constant lr) and project after every step (``‖v‖ ≤ max_norm``, affine factor
  rows ``≤ max_affine_norm``);
* take exactly ``max_iters`` optimiser steps (or stop earlier on ``target_loss``) and return the
  parameters whose loss was measured last, with ``info['loss']`` being that loss;
* leave the model exactly as they found it (weights, hooks, ``requires_grad`` flags, train/eval
  mode), also when they raise or are interrupted.

Losses are in nats (natural log).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import arch
from .data import TokenizedCompletion as Seq
from .data import TrainingDatapoint, nest_losses, tokenize_datapoints
from .engine import Engine, Objective, SteerSpec, make_engine
from .hooks import frozen_model

log = logging.getLogger(__name__)

DEFAULT_MAX_ITERS = 1000  # cap used when neither max_iters nor a reachable target ends the loop


@dataclasses.dataclass
class _Params:
    """Trainable steering parameters; ``vectors`` may map several layers to one shared tensor."""

    vectors: dict[int, torch.Tensor]
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    clamp: float | None = None

    def tensors(self) -> list[torch.Tensor]:
        uniq: list[torch.Tensor] = []
        for v in self.vectors.values():
            if not any(v is u for u in uniq):
                uniq.append(v)
        return uniq + [t for t in (self.left, self.right) if t is not None]

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.tensors()]

    def restore(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(self.tensors(), snap):
                t.copy_(s)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors())

    def usable(self) -> bool:
        """Finite, and (clamp steering) no zero vector, whose direction would be undefined."""
        return self.finite() and (self.clamp is None or all(bool(v.abs().sum() > 0) for v in self.vectors.values()))

    def matrix(self) -> torch.Tensor | None:
        """Dense ``M = leftᵀ right`` ``(d, d)`` (for returning to the user only)."""
        if self.left is None or self.right is None:
            return None
        return (self.left.T @ self.right).detach()

    def norm_objective(self) -> torch.Tensor:
        """``Σ‖v‖ + ‖M‖_F`` (the output-constrained phase minimises this); ``‖M‖_F`` via the factors."""
        total = sum(v.norm() for v in self.tensors()[: len(self.tensors()) - (2 if self.left is not None else 0)])
        if self.left is not None and self.right is not None:
            # ‖LᵀR‖_F² = tr(LLᵀ RRᵀ): r×r products only
            total = total + torch.sqrt(((self.left @ self.left.T) * (self.right @ self.right.T)).sum().clamp_min(0))
        return total

    def spec_fn(self, seqs: Sequence[Seq], noise: dict[int, torch.Tensor] | None = None
                ) -> Callable[[list[int]], SteerSpec]:
        signs = torch.tensor([s.sign for s in seqs])

        def fn(idx: list[int]) -> SteerSpec:
            rows = {}
            for layer, v in self.vectors.items():
                r = signs[idx][:, None].to(v) * v[None]
                if noise is not None and layer in noise:
                    r = r + noise[layer][idx].to(v)
                rows[layer] = r
            return SteerSpec(rows=rows, left=self.left, right=self.right, clamp=self.clamp)

        return fn


def _check_positive(name: str, value: Any, *, allow_none: bool = True, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be a {'non-negative' if allow_zero else 'positive'} finite number, "
                         f"got {value!r}")


MAX_LR = 1e30  # Adam's first step is up to 10x lr: beyond ~3e37 it overflows float32 inside torch


def _check_lr(name: str, value: Any, *, allow_none: bool = False) -> None:
    _check_positive(name, value, allow_none=allow_none)
    if value is not None and value > MAX_LR:
        raise ValueError(f"`{name}` must be at most {MAX_LR:g} (Adam's steps would overflow float32), got {value!r}")


def _check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def _check_target(target_loss: Any) -> None:
    if target_loss is not None and (isinstance(target_loss, bool) or not isinstance(target_loss, (int, float))
                                    or math.isnan(target_loss)):
        raise ValueError(f"`target_loss` must be a number (nats) or None, got {target_loss!r}")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a HuggingFace causal LM (a torch.nn.Module), got {type(model).__name__}")


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None:
        raise ValueError("`tokenizer` is required: pass the model's HuggingFace tokenizer (tokenizer=...)")
    if not callable(tokenizer):
        raise TypeError(f"`tokenizer` must be the model's HuggingFace tokenizer (callable), got "
                        f"{type(tokenizer).__name__} {tokenizer!r:.60}")


def _check_engine(engine: Any) -> None:
    if engine not in ("fast", "reference"):
        raise ValueError(f"`engine` must be 'fast' or 'reference', got {engine!r}")


def _check_datapoints(datapoints: Any) -> list[TrainingDatapoint]:
    if isinstance(datapoints, TrainingDatapoint):
        datapoints = [datapoints]
    if not isinstance(datapoints, (list, tuple)) or len(datapoints) == 0:
        raise ValueError(f"`datapoints` must be a non-empty list of TrainingDatapoint, got {datapoints!r}")
    for i, dp in enumerate(datapoints):
        if not isinstance(dp, TrainingDatapoint):
            raise TypeError(f"`datapoints[{i}]` must be a TrainingDatapoint, got {type(dp).__name__}")
    return list(datapoints)


def _check_layers(model: nn.Module, layer: Any, name: str) -> list[int]:
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise ValueError(f"`{name}` is empty; expected at least one layer index")
    resolved = [arch.resolve_layer(model, x, name=name) for x in layers]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`{name}` contains duplicate layers: {layers!r}")
    return resolved


def _context_length(model: nn.Module) -> int | None:
    return arch.context_length(model)


def _check_vec(starting_vec: Any, d: int, name: str = "starting_vec") -> None:
    if not isinstance(starting_vec, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(starting_vec).__name__}")
    if tuple(starting_vec.shape) != (d,):
        raise ValueError(f"`{name}` must have shape ({d},) (the model's hidden size), "
                         f"got {tuple(starting_vec.shape)}")
    if starting_vec.is_meta or starting_vec.is_complex():
        raise ValueError(f"`{name}` must be a real-valued tensor with data, got a {starting_vec.dtype} tensor "
                         f"on {starting_vec.device}")
    if not bool(torch.isfinite(starting_vec).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values")


def _init_vector(d: int, starting_norm: float, starting_vec: torch.Tensor | None, gen: torch.Generator,
                 device: torch.device, name: str = "starting_vec") -> torch.Tensor:
    if starting_vec is not None:
        _check_vec(starting_vec, d, name)
        v = starting_vec.detach().float().clone()
    else:
        v = torch.randn(d, generator=gen)
        v = starting_norm * v / v.norm()
    return v.to(device).requires_grad_(True)


def _project(params: _Params, max_norm: float | None, max_affine_norm: float | None) -> None:
    with torch.no_grad():
        if max_norm is not None:
            for v in params.tensors()[: len(params.tensors()) - (2 if params.left is not None else 0)]:
                n = v.norm()
                if not torch.isfinite(n):  # float32 overflow (‖v‖ ≳ 1e19) would scale v to zero: use float64
                    n = v.double().norm()
                if n > max_norm:
                    v.mul_(max_norm / n)
        if max_affine_norm is not None:
            for m in (params.left, params.right):
                if m is not None:
                    n = m.norm(dim=1, keepdim=True)
                    if not bool(torch.isfinite(n).all()):
                        n = m.double().norm(dim=1, keepdim=True)
                    m.mul_(torch.where(n > max_affine_norm, max_affine_norm / n, torch.ones_like(n)))


def _show_progress(progress: bool | None) -> bool:
    """``None`` means: on inside a Jupyter kernel, off elsewhere (scripts, tests)."""
    if progress is not None:
        return bool(progress)
    import sys

    return "ipykernel" in sys.modules


@dataclasses.dataclass
class _LoopResult:
    steps: int
    losses: torch.Tensor  # per-sequence losses of the returned parameters
    history: list[float]
    status: str


def _run_loop(
    engine: Engine,
    params: _Params,
    *,
    lr: float,
    max_iters: int | None,
    eps: float,
    target_loss: float | None,
    do_target_loss_sum: bool,
    target_loss_target_iters: int,
    max_norm: float | None,
    max_affine_norm: float | None,
    noise_fn: Callable[[], dict[int, torch.Tensor]] | None = None,
    reg_fn: Callable[[], torch.Tensor] | None = None,
    subset_fn: Callable[[int], list[int] | None] | None = None,
    progress: bool | None = None,
    desc: str = "optimize",
) -> _LoopResult:
    """Adam loop shared by every optimiser. Evaluate → check stop → step → project."""
    seqs = engine.seqs
    _project(params, max_norm, max_affine_norm)  # the caps hold from the first evaluation on
    opt = torch.optim.Adam(params.tensors(), lr=lr)
    cap = max_iters if max_iters is not None else DEFAULT_MAX_ITERS
    targets = torch.tensor([s.target if s.target is not None else math.inf for s in seqs])
    history: list[float] = []
    hits, steps, prev = 0, 0, None
    last_good = params.snapshot()
    status = "max_iters"
    losses = torch.full((len(seqs),), math.nan)  # no finite evaluation yet: never report a made-up loss
    bar = tqdm(total=cap, desc=desc, disable=not _show_progress(progress), leave=False)
    try:
        while True:
            final_eval = steps >= cap
            opt.zero_grad(set_to_none=True)
            if not params.usable():  # the last step made them non-finite (or a clamp vector zero): don't run it
                params.restore(last_good)
                status = "nonfinite"
                log.warning("non-finite (or zero clamp) parameters at step %d; restored the last finite parameters",
                            steps)
                break
            subset = subset_fn(steps) if subset_fn is not None else None
            noise = noise_fn() if noise_fn is not None else None
            sub_losses = engine.run(params.spec_fn(seqs, noise), backward=not final_eval, subset=subset)
            total = float(sub_losses.sum())
            if reg_fn is not None:
                reg = reg_fn()
                if not final_eval and reg.requires_grad:  # all-zero weights: a constant, nothing to do
                    reg.backward()
                total_obj = total + float(reg.detach())
            else:
                total_obj = total
            if not math.isfinite(total_obj) or not params.finite():
                params.restore(last_good)
                status = "nonfinite"
                log.warning("non-finite loss or parameters at step %d; restored the last finite parameters",
                            steps)
                break
            if subset is None:
                losses = sub_losses
            else:
                losses = losses.clone()
                losses[subset] = sub_losses
            last_good = params.snapshot()
            history.append(total)
            bar.set_postfix(loss=f"{total:.4g}")
            if target_loss is not None or (targets < math.inf).any():
                if do_target_loss_sum:
                    hit = target_loss is not None and total <= target_loss
                else:
                    sub_t = targets if subset is None else targets[subset]
                    hit = bool((sub_losses <= sub_t).all())
                hits = hits + 1 if hit else 0
                if hits >= target_loss_target_iters:
                    status = "target_reached"
                    break
            if final_eval:
                status = "max_iters"
                break
            if max_iters is None and target_loss is None and prev is not None and abs(prev - total) < eps:
                status = "converged"
                break
            prev = total
            opt.step()
            _project(params, max_norm, max_affine_norm)
            steps += 1
            bar.update(1)
    finally:
        bar.close()
    return _LoopResult(steps=steps, losses=losses, history=history, status=status)


def _tangent_noise_fn(engine: Engine, params: _Params, layers: list[int], noise_scale: float,
                      tangent: bool, gen: torch.Generator) -> Callable[[], dict[int, torch.Tensor]]:
    """Gaussian noise (std ``noise_scale``) drawn per datapoint at every loss evaluation; the tangent
    variant removes the component along the gradient ``g`` of the datapoint's unsteered loss,
    ``n - (n·g/‖g‖²) g`` (``g`` computed once: it does not change). Returns per-sequence rows."""
    seqs = engine.seqs
    owner = torch.tensor([s.datapoint for s in seqs])
    n_dp = int(owner.max()) + 1
    v0 = next(iter(params.vectors.values()))
    d = v0.shape[0]
    grads = None
    if tangent:
        zero = torch.zeros(len(seqs), d, device=v0.device, requires_grad=True)

        def zero_spec(idx: list[int]) -> SteerSpec:
            return SteerSpec(rows={layer: zero[idx] for layer in layers})

        engine.run(zero_spec, backward=True)
        per_seq = zero.grad.detach().float().cpu() if zero.grad is not None else torch.zeros(len(seqs), d)
        grads = torch.zeros(n_dp, d).index_add(0, owner, per_seq)

    def fn() -> dict[int, torch.Tensor]:
        n = torch.randn(n_dp, d, generator=gen) * noise_scale
        if grads is not None:
            g2 = (grads * grads).sum(-1, keepdim=True)
            coef = torch.where(g2 > 0, (n * grads).sum(-1, keepdim=True) / g2.clamp_min(1e-30), torch.zeros_like(g2))
            n = n - coef * grads
        rows = n[owner].to(v0.device)
        return {layer: rows for layer in layers}

    fn.grads = grads  # type: ignore[attr-defined]
    return fn


def _output_constrained(
    engine: Engine,
    params: _Params,
    *,
    start_losses: torch.Tensor,
    target_loss: float | None,
    do_target_loss_sum: bool,
    lr: float,
    max_iters: int,
    damping: float,
    patience: int,
    custom_loss: Callable[[], torch.Tensor] | None = None,
    norm_bound_scale: float = 1.0,
) -> tuple[int, torch.Tensor, bool, list[float]]:
    """Minimise ``f = ‖v‖ (+‖M‖_F)`` subject to loss constraints by the modified differential method
    of multipliers (Platt & Barr 1988), with projected multipliers for the inequality constraints.

    Constraints ``g_i = loss_i - t_i ≤ 0``: one on the summed loss (``do_target_loss_sum``) or one
    per completion. ``t_i = max(target_i, loss_i at the start)``, so the start point is feasible.
    The parameter update follows ``∇f + Σ_i max(0, λ_i + c·s·g_i)·s·∇g_i`` (Adam, ``lr``); multipliers
    ascend ``λ_i ← max(0, λ_i + lr·s·g_i)``; ``s = f₀ / Σ|t_i|`` puts the constraints on the
    objective's scale. One forward+backward per iteration: the multiplier weights use the constraint
    values of the previous evaluation. With ``custom_loss`` (e.g. MELBO) the objective is that
    function and ``‖v‖ (+‖M‖_F) ≤ norm_bound_scale × its start value`` is one more constraint.

    Returns (iterations, losses of the returned parameters, whether they satisfy every constraint,
    objective history). The returned parameters are the feasible ones with the smallest objective
    seen (the start point if none is better).
    """
    seqs = engine.seqs
    per_seq_t = torch.tensor([s.target if s.target is not None else (target_loss if target_loss is not None
                                                                        else math.inf) for s in seqs])
    if do_target_loss_sum:
        t = torch.tensor([max(target_loss if target_loss is not None else -math.inf, float(start_losses.sum()))])
    else:
        t = torch.maximum(torch.where(per_seq_t < math.inf, per_seq_t, start_losses), start_losses)
    norm0 = float(params.norm_objective().detach())
    scale = norm0 / max(float(t.abs().sum()), 1e-6)
    lam = torch.zeros_like(t)
    lam_norm = 0.0
    g = (start_losses.sum()[None] if do_target_loss_sum else start_losses) - t
    g_norm = 0.0

    def objective() -> torch.Tensor:
        return custom_loss() if custom_loss is not None else params.norm_objective()

    opt = torch.optim.Adam(params.tensors(), lr=lr)
    best = (float(objective().detach()), params.snapshot(), start_losses.clone())
    since_best, it = 0, 0
    history: list[float] = []
    for it in range(1, max_iters + 1):  # noqa: B007
        opt.zero_grad(set_to_none=True)
        mult = torch.clamp(lam + damping * scale * g, min=0) * scale
        w = mult.expand(len(seqs)) if do_target_loss_sum else mult
        losses = engine.run(params.spec_fn(seqs), weights=w, backward=True)
        f = objective()
        f_val = float(f.detach())
        if custom_loss is not None:  # keep ‖v‖ bounded while optimising a custom objective
            nrm = params.norm_objective()
            g_norm = float(nrm.detach()) - norm_bound_scale * norm0
            f = f + max(0.0, lam_norm + damping * g_norm) * nrm
        f.backward()
        g = (losses.sum()[None] if do_target_loss_sum else losses) - t
        feasible = bool((g <= 1e-6).all()) and g_norm <= 1e-6
        history.append(f_val)
        if feasible and f_val < best[0] - 1e-9:
            best = (f_val, params.snapshot(), losses.clone())
            since_best = 0
        else:
            since_best += 1
        if since_best >= patience:
            break
        opt.step()
        lam = torch.clamp(lam + lr * scale * g, min=0)
        lam_norm = max(0.0, lam_norm + lr * g_norm)
    params.restore(best[1])
    final = engine.run(params.spec_fn(seqs), backward=False)
    g = (final.sum()[None] if do_target_loss_sum else final) - t
    return it, final, bool((g <= 1e-4).all()), history


def make_melbo_loss_funcs(
    target_layer: int, *, power: float = 1.0
) -> tuple[Callable[..., dict], Callable[..., torch.Tensor]]:
    """MELBO objective (Mack & Turner 2024) for the output-constrained phase.

    Returns ``(pre_loss_func, loss_func)`` to pass as ``custom_output_constr_pre_loss_func`` /
    ``custom_output_constr_loss_func`` of :func:`optimize_vector`: the phase then *maximises* the mean
    distance ``‖h_T(steered) − h_T(unsteered)‖^power`` of the residual stream entering block
    ``target_layer`` over the completion positions (from the last prompt token on), while the
    completion losses stay within their targets and ``‖v‖`` stays ≤ its phase-1 value.
    """

    def _acts(model: nn.Module, tokenizer: Any, datapoints: Sequence[TrainingDatapoint], layers: list[int],
              params: _Params | None) -> list[torch.Tensor]:
        from .hooks import steer

        seqs = tokenize_datapoints(tokenizer, datapoints)
        block = arch.get_site_module(model, target_layer)
        dev = arch.input_device(model)
        out = []
        for s in seqs:
            captured: dict[str, torch.Tensor] = {}
            handles = []
            if params is not None:
                sign = s.sign
                for layer in layers:
                    def hook(m: nn.Module, args: tuple, kwargs: dict, layer: int = layer,
                             sign: float = sign) -> tuple[tuple, dict]:
                        h = arch.get_hidden_states(args, kwargs)
                        h = steer(h, sign * params.vectors[layer], left=params.left, right=params.right,
                                  clamp=params.clamp)
                        return arch.replace_hidden_states(args, kwargs, h)
                    handles.append(arch.get_site_module(model, layer).register_forward_pre_hook(hook, with_kwargs=True))

            def grab(m: nn.Module, args: tuple, kwargs: dict, captured: dict = captured, start: int = s.prompt_len - 1
                     ) -> None:
                captured["h"] = arch.get_hidden_states(args, kwargs)[0, start:]
                raise _StopForward

            handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))
            try:
                with torch.set_grad_enabled(params is not None):
                    model(input_ids=torch.tensor([s.ids], device=dev), use_cache=False)
            except _StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
            out.append(captured["h"])
        return out

    def pre_loss_func(model: nn.Module, tokenizer: Any, datapoints: Sequence[TrainingDatapoint], layers: list[int],
                      params: _Params) -> dict:
        with torch.no_grad():
            return {"unsteered": [a.detach() for a in _acts(model, tokenizer, datapoints, layers, None)]}

    def loss_func(model: nn.Module, tokenizer: Any, datapoints: Sequence[TrainingDatapoint], layers: list[int],
                  params: _Params, unsteered: list[torch.Tensor]) -> torch.Tensor:
        steered = _acts(model, tokenizer, datapoints, layers, params)
        dist = [(a.float() - b.float()).norm(dim=-1).pow(power).mean() for a, b in zip(steered, unsteered)]
        return -torch.stack(dist).mean()

    return pre_loss_func, loss_func


class _StopForward(Exception):
    pass


def _base_info(seqs: list[Seq], n_dp: int, res: _LoopResult, do_target_loss_sum: bool) -> dict[str, Any]:
    nested = nest_losses(seqs, res.losses.tolist(), n_dp)
    return {
        "iters": res.steps,
        "loss": float(res.losses.sum()) if do_target_loss_sum else nested,
        "completion_losses": nested,
        "loss_history": res.history,
        "status": res.status,
        "loss_units": "nats",
    }


def optimize_vector(
    model: nn.Module,
    datapoints: Sequence[TrainingDatapoint],
    layer: int | Sequence[int],
    *,
    tokenizer: Any = None,
    eps: float = 1e-6,
    lr: float = 0.01,
    max_iters: int | None = None,
    coldness: float = 0.7,
    normalize_token_length: bool = False,
    only_hook_prompt: bool = False,
    target_loss: float | None = None,
    do_target_loss_sum: bool = True,
    target_loss_target_iters: int = 1,
    do_one_minus: bool = True,
    max_norm: float | None = None,
    starting_norm: float = 1.0,
    starting_vec: torch.Tensor | None = None,
    vector_clamp: float | None = None,
    affine_rank: int | None = None,
    max_affine_norm: float | None = 2.0,
    starting_affine_norm: float = 1.0,
    noise_scale: float | None = None,
    do_tangent_space_noise: bool = True,
    do_output_constr: bool = False,
    output_constr_lr: float | None = None,
    max_output_constr_iters: int | None = None,
    output_constr_damping: float = 1.0,
    output_constr_patience: int = 20,
    custom_output_constr_loss_func: Callable[..., torch.Tensor] | None = None,
    custom_output_constr_pre_loss_func: Callable[..., dict] | None = None,
    output_constr_norm_initial_scale: float = 1.0,
    seed: int | None = None,
    engine: str = "fast",
    max_batch_tokens: int = 16384,
    progress: bool | None = None,
    return_info: bool = True,
) -> Any:
    """Optimise one steering vector (optionally with a rank-r affine map) at ``layer``.

    The vector is added to the residual stream entering decoder block ``layer`` (or each block of a
    list of layers, sharing one vector). Loss (nats): see :mod:`steering_opt.engine`.

    Args:
        model: a HF causal LM (any device/dtype; the loss is computed in float32).
        datapoints: list of :class:`TrainingDatapoint`.
        layer: block index (negative counts from the end) or a list of them sharing one vector.
        tokenizer: the model's tokenizer (required).
        eps: convergence threshold on the loss change when neither ``max_iters`` nor ``target_loss``
            is given.
        lr: Adam learning rate (constant).
        max_iters: exact number of optimiser steps (``None``: until target/convergence, capped at
            ``DEFAULT_MAX_ITERS``).
        coldness: inverse temperature applied to logits in the loss.
        normalize_token_length: divide each completion's loss by its token count.
        only_hook_prompt: steer prompt positions only.
        target_loss: stop when the summed loss (``do_target_loss_sum=True``) or every completion's loss
            (its own target from the datapoint if given) is ≤ this, for ``target_loss_target_iters``
            consecutive evaluations.
        do_one_minus: suppression loss ``-Σ log(1-p)`` (True) or ``+Σ log p`` (False).
        max_norm: cap on ``‖v‖`` (projection after every step).
        starting_norm / starting_vec: random initial direction with this norm, or an explicit start.
        vector_clamp: clamp steering ``h -> h - (h·v̂)v̂ + c·v`` with ``c = vector_clamp``.
        affine_rank / max_affine_norm / starting_affine_norm: learn ``M = LᵀR`` (``L, R ∈ ℝ^{r×d}``),
            steering ``h -> h + h Mᵀ + v``; rows of ``L`` and ``R`` are kept at norm ≤ ``max_affine_norm``.
        noise_scale / do_tangent_space_noise: Gaussian noise (std ``noise_scale``) added to ``v`` in
            every loss evaluation, optionally projected orthogonal to the unsteered-loss gradient.
        do_output_constr / output_constr_lr / max_output_constr_iters: after the first phase, minimise
            ``‖v‖ (+‖M‖_F)`` while keeping the losses at or below target (modified differential
            method of multipliers); see :func:`_output_constrained`.
        seed: seed for the initial vector and the noise (reproducible trajectories).
        engine: ``"fast"`` (default) or ``"reference"`` (naive algorithm).
        max_batch_tokens: memory bound of one forward/backward chunk (fast engine).
        progress: show a tqdm bar (default: on in Jupyter, off elsewhere).

    Returns:
        ``(vector, info)``, or ``(vector, matrix, info)`` with ``affine_rank``. ``vector`` has shape
        ``(d,)`` and lives on the steered block's device, float32. ``info``: ``iters`` (optimiser
        steps), ``loss`` (summed loss in nats, or ``loss[i][j][k]`` per completion with
        ``do_target_loss_sum=False``), ``norm``, ``loss_history`` (loss at every evaluation),
        ``status`` ("target_reached", "max_iters", "converged", "nonfinite"), and for the
        output-constrained phase ``output_constr_iters``, ``constraints_satisfied``,
        ``norm_before_output_constr``.
    """
    _check_model(model)
    datapoints = _check_datapoints(datapoints)
    layers = _check_layers(model, layer, "layer")
    _check_tokenizer(tokenizer)
    _check_lr("lr", lr)
    _check_positive("eps", eps, allow_none=False, allow_zero=True)
    _check_target(target_loss)
    _check_positive("starting_affine_norm", starting_affine_norm, allow_none=False)
    _check_positive("output_constr_damping", output_constr_damping, allow_none=False, allow_zero=True)
    _check_int("max_output_constr_iters", max_output_constr_iters, 0, allow_none=True)
    _check_int("output_constr_patience", output_constr_patience, 1)
    _check_int("max_batch_tokens", max_batch_tokens, 1)
    _check_positive("coldness", coldness, allow_none=False)
    _check_positive("max_norm", max_norm)
    _check_positive("starting_norm", starting_norm, allow_none=False)
    _check_positive("noise_scale", noise_scale, allow_zero=True)
    _check_lr("output_constr_lr", output_constr_lr, allow_none=True)
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0):
        raise ValueError(f"`max_iters` must be a non-negative int or None, got {max_iters!r}")
    _check_int("target_loss_target_iters", target_loss_target_iters, 1)
    if vector_clamp is not None and not (isinstance(vector_clamp, (int, float)) and math.isfinite(vector_clamp)):
        raise ValueError(f"`vector_clamp` must be a finite number, got {vector_clamp!r}")
    d = arch.hidden_size(model)
    if affine_rank is not None:
        if isinstance(affine_rank, bool) or not isinstance(affine_rank, int) or not 1 <= affine_rank <= d:
            raise ValueError(f"`affine_rank` must be an int in [1, {d}] (the hidden size), got {affine_rank!r}")
        if vector_clamp is not None:
            raise ValueError("`vector_clamp` and `affine_rank` cannot be combined")
    _check_positive("max_affine_norm", max_affine_norm)
    if starting_vec is not None:
        _check_vec(starting_vec, d)
    if starting_vec is not None and vector_clamp is not None and float(starting_vec.norm()) == 0:
        raise ValueError("`vector_clamp` needs a non-zero `starting_vec` (got a zero vector)")
    _check_engine(engine)

    seqs = tokenize_datapoints(tokenizer, datapoints, only_hook_prompt=only_hook_prompt,
                               target_loss=None if do_target_loss_sum else target_loss,
                               max_length=_context_length(model))
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    device = arch.execution_device(arch.get_site_module(model, layers[0]))

    with frozen_model(model):
        vec = _init_vector(d, starting_norm, starting_vec, gen, device)
        left = right = None
        if affine_rank is not None:
            left = torch.randn(affine_rank, d, generator=gen)
            right = torch.randn(affine_rank, d, generator=gen)
            left = (left * (starting_affine_norm / left.norm(dim=1, keepdim=True))).to(device).requires_grad_(True)
            right = (right * (starting_affine_norm / right.norm(dim=1, keepdim=True))).to(device).requires_grad_(True)
        params = _Params(vectors={layer_: vec for layer_ in layers}, left=left, right=right, clamp=vector_clamp)
        objective = Objective(coldness=coldness, do_one_minus=do_one_minus,
                              normalize_token_length=normalize_token_length)
        eng = make_engine(engine, model, seqs, layers, objective, max_batch_tokens=max_batch_tokens)
        noise_fn = None
        if noise_scale:
            noise_fn = _tangent_noise_fn(eng, params, layers, noise_scale, do_tangent_space_noise, gen)
        res = _run_loop(eng, params, lr=lr, max_iters=max_iters, eps=eps, target_loss=target_loss,
                        do_target_loss_sum=do_target_loss_sum, target_loss_target_iters=target_loss_target_iters,
                        max_norm=max_norm, max_affine_norm=max_affine_norm, noise_fn=noise_fn,
                        progress=progress)
        info = _base_info(seqs, len(datapoints), res, do_target_loss_sum)
        info["norm"] = float(vec.detach().norm())
        if do_output_constr and res.status != "nonfinite":
            custom = None
            if custom_output_constr_loss_func is not None:
                pre = {}
                if custom_output_constr_pre_loss_func is not None:
                    pre = custom_output_constr_pre_loss_func(model, tokenizer, datapoints, layers, params) or {}

                def custom() -> torch.Tensor:
                    return custom_output_constr_loss_func(model, tokenizer, datapoints, layers, params, **pre)

            info["norm_before_output_constr"] = info["norm"]
            it, final, ok, norms = _output_constrained(
                eng, params, start_losses=res.losses, target_loss=target_loss,
                do_target_loss_sum=do_target_loss_sum,
                lr=output_constr_lr if output_constr_lr is not None else lr,
                max_iters=max_output_constr_iters if max_output_constr_iters is not None else 200,
                damping=output_constr_damping, patience=output_constr_patience, custom_loss=custom,
                norm_bound_scale=output_constr_norm_initial_scale)
            nested = nest_losses(seqs, final.tolist(), len(datapoints))
            info.update(output_constr_iters=it, constraints_satisfied=ok, output_constr_norm_history=norms,
                        norm=float(vec.detach().norm()), completion_losses=nested,
                        loss=float(final.sum()) if do_target_loss_sum else nested)
    out_vec = vec.detach()
    if not return_info:
        return (out_vec, params.matrix()) if affine_rank is not None else out_vec
    if affine_rank is not None:
        info["affine_factors"] = (left.detach(), right.detach())
        return out_vec, params.matrix(), info
    return out_vec, info


def optimize_vectors(
    model: nn.Module,
    datapoints: Sequence[TrainingDatapoint],
    layers: Sequence[int],
    *,
    tokenizer: Any = None,
    lr: float = 0.01,
    max_iters: int | None = None,
    eps: float = 1e-6,
    coldness: float = 0.7,
    normalize_token_length: bool = False,
    only_hook_prompt: bool = False,
    target_loss: float | None = None,
    do_target_loss_sum: bool = True,
    target_loss_target_iters: int = 1,
    do_one_minus: bool = True,
    max_norm: float | None = None,
    starting_norm: float = 1.0,
    regularization_weight: float = 0.0,
    regularization_type: str = "l1",
    sparsity_weight: float = 0.0,
    entropy_weight: float = 0.0,
    seed: int | None = None,
    engine: str = "fast",
    max_batch_tokens: int = 16384,
    progress: bool | None = None,
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Jointly optimise one vector per layer in ``layers``.

    Objective (nats): the completion losses plus
    ``regularization_weight · Σ_l R(v_l)`` with ``R`` = L1 norm (``"l1"``) or max-abs (``"max"``),
    ``sparsity_weight · Σ_l ‖v_l‖₂`` and ``entropy_weight · H(softmax(‖v_1‖, …, ‖v_L‖))`` (pushes
    the steering into few layers).

    Returns:
        ``({layer: vector (d,)}, info)`` with ``info['norms'][layer]``, ``iters``, ``loss`` (the
        completion loss without regularisers), ``loss_history``, ``status``.
    """
    _check_model(model)
    datapoints = _check_datapoints(datapoints)
    layer_list = _check_layers(model, layers, "layers")
    _check_tokenizer(tokenizer)
    _check_lr("lr", lr)
    _check_positive("eps", eps, allow_none=False, allow_zero=True)
    _check_positive("coldness", coldness, allow_none=False)
    _check_positive("starting_norm", starting_norm, allow_none=False)
    _check_target(target_loss)
    _check_int("target_loss_target_iters", target_loss_target_iters, 1)
    _check_int("max_batch_tokens", max_batch_tokens, 1)
    _check_engine(engine)
    _check_positive("max_norm", max_norm)
    for name, val in (("regularization_weight", regularization_weight), ("sparsity_weight", sparsity_weight),
                      ("entropy_weight", entropy_weight)):
        _check_positive(name, val, allow_none=False, allow_zero=True)
    if regularization_type not in ("l1", "max"):
        raise ValueError(f"`regularization_type` must be 'l1' or 'max', got {regularization_type!r}")
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0):
        raise ValueError(f"`max_iters` must be a non-negative int or None, got {max_iters!r}")
    seqs = tokenize_datapoints(tokenizer, datapoints, only_hook_prompt=only_hook_prompt,
                               target_loss=None if do_target_loss_sum else target_loss,
                               max_length=_context_length(model))
    d = arch.hidden_size(model)
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    with frozen_model(model):
        vecs = {}
        for layer_ in layer_list:
            block = arch.get_site_module(model, layer_)
            dev = arch.execution_device(block)
            vecs[layer_] = _init_vector(d, starting_norm, None, gen, dev)
        params = _Params(vectors=vecs)

        def reg_fn() -> torch.Tensor:
            vs = [v.to(vecs[layer_list[0]].device) for v in vecs.values()]
            norms = torch.stack([v.norm() for v in vs])
            reg = torch.zeros((), device=norms.device)
            if regularization_weight:
                per = torch.stack([v.abs().sum() if regularization_type == "l1" else v.abs().max() for v in vs])
                reg = reg + regularization_weight * per.sum()
            if sparsity_weight:
                reg = reg + sparsity_weight * norms.sum()
            if entropy_weight:
                p = torch.softmax(norms, 0)
                reg = reg + entropy_weight * -(p * torch.log(p.clamp_min(1e-30))).sum()
            return reg

        objective = Objective(coldness=coldness, do_one_minus=do_one_minus,
                              normalize_token_length=normalize_token_length)
        eng = make_engine(engine, model, seqs, layer_list, objective, max_batch_tokens=max_batch_tokens)
        res = _run_loop(eng, params, lr=lr, max_iters=max_iters, eps=eps, target_loss=target_loss,
                        do_target_loss_sum=do_target_loss_sum, target_loss_target_iters=target_loss_target_iters,
                        max_norm=max_norm, max_affine_norm=None, reg_fn=reg_fn, progress=progress,
                        desc="optimize_vectors")
    info = _base_info(seqs, len(datapoints), res, do_target_loss_sum)
    info["norms"] = {layer_: float(v.detach().norm()) for layer_, v in vecs.items()}
    return {layer_: v.detach() for layer_, v in vecs.items()}, info


def optimize_vector_minibatch_hf(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layer: int | Sequence[int],
    src_completions: Sequence[str] | None = None,
    dst_completions: Sequence[str] | None = None,
    minibatch_size: int = 5,
    *,
    lr: float = 0.01,
    max_iters: int | None = None,
    eps: float = 1e-6,
    coldness: float = 0.7,
    target_loss: float | None = None,
    target_loss_target_iters: int = 1,
    starting_norm: float = 1.0,
    max_norm: float | None = None,
    affine_rank: int | None = None,
    max_affine_norm: float | None = None,
    vector_clamp: float | None = None,
    do_one_minus: bool = True,
    normalize_token_length: bool = False,
    seed: int | None = None,
    engine: str = "fast",
    progress: bool | None = None,
    distributed: Any = None,
) -> tuple[torch.Tensor, dict[str, Any]] | tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Optimise one vector over many prompts sharing the same completions, in minibatches.

    Step ``i`` uses the ``i``-th minibatch of ``minibatch_size`` prompts (cycling in order), so every
    prompt is used once per epoch. ``target_loss`` applies to the current minibatch's summed loss.
    Padding is handled internally (sequences are right-padded and positions are exact), so the
    tokenizer's padding side does not matter.

    Data parallelism (``distributed``): ``None`` (default) = automatic: on when ``torch.distributed``
    is initialised with several processes (or a launcher such as ``accelerate launch`` /
    ``torchrun`` set ``WORLD_SIZE > 1``: the process group is then initialised from its variables);
    ``True`` = on (an error without a process group); ``False`` = off; or a ``ProcessGroup``. When on,
    every process must make the same call: each computes a shard of every minibatch's prompts, the
    gradients and losses are summed over processes, and all processes return the same vector (that of
    a single-process run, up to float32 rounding); ``info['processes']`` is the number of processes.
    See :mod:`steering_opt.scale`.

    Returns ``(vector, info)`` (or ``(vector, matrix, info)`` with ``affine_rank``).
    """
    _check_model(model)
    _check_tokenizer(tokenizer)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r:.60}")
    _check_int("minibatch_size", minibatch_size, 1)
    for name, comps in (("src_completions", src_completions), ("dst_completions", dst_completions)):
        if isinstance(comps, str):
            raise TypeError(f"`{name}` must be a list of strings, got a single str ({comps[:30]!r}); wrap it in a list")
    dps = []
    for i, p in enumerate(prompts):
        try:
            dps.append(TrainingDatapoint(p, src_completions=list(src_completions or []),
                                         dst_completions=list(dst_completions or [])))
        except (TypeError, ValueError) as e:
            msg = str(e).removeprefix("TrainingDatapoint: ").replace("`prompt`", f"`prompts[{i}]`")
            raise type(e)(msg) from None
    per_dp = len(dps[0].src_completions) + len(dps[0].dst_completions)
    batches = [list(range(i, min(i + minibatch_size, len(dps)))) for i in range(0, len(dps), minibatch_size)]
    seq_batches = [[d * per_dp + k for d in b for k in range(per_dp)] for b in batches]

    def subset_fn(step: int) -> list[int] | None:
        return None if len(seq_batches) == 1 else seq_batches[step % len(seq_batches)]

    return _optimize_with_subsets(
        model, tokenizer, dps, layer, subset_fn, lr=lr, max_iters=max_iters, eps=eps, coldness=coldness,
        target_loss=target_loss, target_loss_target_iters=target_loss_target_iters, starting_norm=starting_norm,
        max_norm=max_norm, affine_rank=affine_rank, max_affine_norm=max_affine_norm, vector_clamp=vector_clamp,
        do_one_minus=do_one_minus, normalize_token_length=normalize_token_length, seed=seed, engine=engine,
        progress=progress, distributed=distributed)


def _optimize_with_subsets(model: nn.Module, tokenizer: Any, dps: list[TrainingDatapoint], layer: Any,
                           subset_fn: Callable[[int], list[int] | None], *, lr: float, max_iters: int | None,
                           eps: float, coldness: float, target_loss: float | None, target_loss_target_iters: int,
                           starting_norm: float, max_norm: float | None, affine_rank: int | None,
                           max_affine_norm: float | None, vector_clamp: float | None, do_one_minus: bool,
                           normalize_token_length: bool, seed: int | None, engine: str, progress: bool,
                           distributed: Any = False) -> Any:
    layers = _check_layers(model, layer, "layer")
    _check_lr("lr", lr)
    _check_positive("eps", eps, allow_none=False, allow_zero=True)
    _check_positive("coldness", coldness, allow_none=False)
    _check_positive("starting_norm", starting_norm, allow_none=False)
    _check_positive("max_affine_norm", max_affine_norm)
    _check_target(target_loss)
    _check_int("max_iters", max_iters, 0, allow_none=True)
    _check_int("target_loss_target_iters", target_loss_target_iters, 1)
    _check_engine(engine)
    if vector_clamp is not None and (isinstance(vector_clamp, bool) or not isinstance(vector_clamp, (int, float))
                                     or not math.isfinite(vector_clamp)):
        raise ValueError(f"`vector_clamp` must be a finite number, got {vector_clamp!r}")
    _check_positive("max_norm", max_norm)
    d = arch.hidden_size(model)
    if affine_rank is not None and (not isinstance(affine_rank, int) or not 1 <= affine_rank <= d):
        raise ValueError(f"`affine_rank` must be an int in [1, {d}], got {affine_rank!r}")
    group = None
    if distributed is not False:
        from .scale import resolve_distributed

        group = resolve_distributed(distributed)
    seqs = tokenize_datapoints(tokenizer, dps, max_length=_context_length(model))
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    block = arch.get_site_module(model, layers[0])
    device = arch.execution_device(block)
    with frozen_model(model):
        vec = _init_vector(d, starting_norm, None, gen, device)
        left = right = None
        if affine_rank is not None:
            left = (torch.randn(affine_rank, d, generator=gen) / math.sqrt(d)).to(device).requires_grad_(True)
            right = (torch.randn(affine_rank, d, generator=gen) / math.sqrt(d)).to(device).requires_grad_(True)
        params = _Params(vectors={x: vec for x in layers}, left=left, right=right, clamp=vector_clamp)
        objective = Objective(coldness=coldness, do_one_minus=do_one_minus,
                              normalize_token_length=normalize_token_length)
        eng = make_engine(engine, model, seqs, layers, objective)
        if group is not None:  # each process computes a shard of every minibatch; grads/losses summed
            from .scale import DataParallelEngine

            settings = (lr, max_iters, eps, coldness, target_loss, target_loss_target_iters, starting_norm, max_norm,
                        affine_rank, max_affine_norm, vector_clamp, do_one_minus, normalize_token_length,
                        [subset_fn(i) for i in range(3)])
            eng = DataParallelEngine(eng, params.tensors(), group, fingerprint=repr(settings))
        res = _run_loop(eng, params, lr=lr, max_iters=max_iters, eps=eps, target_loss=target_loss,
                        do_target_loss_sum=True, target_loss_target_iters=target_loss_target_iters,
                        max_norm=max_norm, max_affine_norm=max_affine_norm, subset_fn=subset_fn,
                        progress=progress, desc="minibatch")
    info = {"iters": res.steps, "loss": res.history[-1] if res.history else math.nan,
            "loss_history": res.history, "status": res.status, "norm": float(vec.detach().norm()), "loss_units": "nats"}
    if group is not None:
        info["processes"] = eng.world
    if affine_rank is not None:
        return vec.detach(), params.matrix(), info
    return vec.detach(), info
