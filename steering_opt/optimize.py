"""Steering optimisation: find vectors / clamp vectors / low-rank affine maps by gradient descent.

:func:`optimize` is the entry point (the reference library's ``optimize_vector`` family, with its tuple
returns, is a thin layer over it in :mod:`steering_opt.compat.llm_steering_opt`). It:

* checks every argument (:class:`~steering_opt.options.OptimizeOptions`) before any model work;
* tokenises once, then hands per-completion losses (nats) to an engine (``engine="fast"`` by default,
  ``"reference"`` for the naive algorithm);
* optimises with ``optimizer`` (Adam at a constant lr by default; :mod:`steering_opt.optimizers`),
  projecting after every step (``‖v‖ ≤ max_norm``, affine factor rows ``≤ max_affine_norm``), for
  ``max_iters`` steps or until ``target_loss``, a plateau of the loss (``plateau_patience`` /
  ``plateau_rel_tol``), ``time_budget_s`` or ``callback`` stops it (:mod:`steering_opt.loop`); with
  ``return_on_interrupt=True`` a KeyboardInterrupt returns the best parameters seen (status
  ``"interrupted"``) instead of propagating;
* optionally runs the output-constrained phase (smallest norm that keeps the losses on target);
* leaves the model exactly as it found it (weights, hooks, ``requires_grad`` flags, train/eval
  mode), also when it raises or is interrupted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import arch, validate
from .data import TrainingDatapoint, describe_datapoints, tokenize_datapoints
from .engine import LossEngine, Objective, SteerSpec, make_engine
from .hooks import frozen_model
from .loop import JobState, OptimizeResult, RegFn, run_jobs
from .options import DEFAULT_OUTPUT_CONSTR_ITERS, OptimizeOptions
from .parameterization import Steering, class_for
from .util import make_module_callable

__all__ = ["OptimizeResult", "initial_steering", "make_generator", "optimize", "output_constrained", "provenance",
           "regularizer"]

#: ``custom_output_constr_loss_func(model, tokenizer, datapoints, layers, steering, **pre) -> scalar``
CustomLoss = Callable[..., torch.Tensor]


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (None: a seed drawn from torch's global RNG)."""
    return torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))


def initial_steering(model: nn.Module, layers: Sequence[int], options: OptimizeOptions, gen: torch.Generator,
                     *, per_layer: bool = False) -> dict[int, Steering]:
    """The starting parameters ``{layer: Steering}`` (requiring grad, on each layer's device): one
    object shared by all ``layers``, or one per layer (``per_layer``, drawn in layer order)."""
    d = arch.hidden_size(model)
    cls = class_for(options)
    out: dict[int, Steering] = {}
    shared: Steering | None = None
    for layer in layers:
        if shared is None or per_layer:
            device = arch.execution_device(arch.get_site_module(model, layer if per_layer else layers[0]))
            shared = cls.initial(d, options, gen).map(lambda t, dev=device: t.to(dev).float()).requires_grad_()
        out[layer] = shared
    return out


def regularizer(options: OptimizeOptions) -> RegFn | None:
    """The per-layer penalty of ``options`` (None if all its weights are 0), as a function of the
    parameters: ``regularization_weight · Σ_l R(v_l)`` with ``R`` = L1 norm (``"l1"``) or max-abs
    (``"max"``), ``+ sparsity_weight · Σ_l ‖v_l‖₂ + entropy_weight · H(softmax(‖v_1‖, …, ‖v_L‖))``."""
    o = options
    if not (o.regularization_weight or o.sparsity_weight or o.entropy_weight):
        return None

    def reg(steering: dict[int, Steering]) -> torch.Tensor:
        vs = [p.vector for p in steering.values()]
        vs = [v.to(vs[0].device) for v in vs]
        norms = torch.stack([v.norm() for v in vs])
        total = torch.zeros((), device=norms.device)
        if o.regularization_weight:
            per = torch.stack([v.abs().sum() if o.regularization_type == "l1" else v.abs().max() for v in vs])
            total = total + o.regularization_weight * per.sum()
        if o.sparsity_weight:
            total = total + o.sparsity_weight * norms.sum()
        if o.entropy_weight:
            p = torch.softmax(norms, 0)
            total = total + o.entropy_weight * -(p * torch.log(p.clamp_min(1e-30))).sum()
        return total

    return reg


def optimize(
    model: nn.Module,
    tokenizer: Any,
    datapoints: Sequence[TrainingDatapoint] | TrainingDatapoint,
    layer: int | Sequence[int],
    options: OptimizeOptions | None = None,
    *,
    per_layer: bool = False,
    minibatch_size: int | None = None,
    distributed: Any = False,
    custom_output_constr_loss_func: CustomLoss | None = None,
    custom_output_constr_pre_loss_func: Callable[..., dict] | None = None,
    **overrides: Any,
) -> OptimizeResult:
    """Optimise steering at ``layer`` so that the model promotes each datapoint's ``dst_completions``
    and suppresses its ``src_completions``.

    Args:
        model: a HF causal LM (any device/dtype; the loss is computed in float32).
        tokenizer: the model's tokenizer.
        datapoints: :class:`TrainingDatapoint` (s).
        layer: block index (negative counts from the end) whose input is steered, or a list of them.
        options: an :class:`OptimizeOptions`; keyword ``overrides`` (the same names: ``lr``,
            ``max_iters``, ``target_loss``, ``vector_clamp``, ``affine_rank``, ``parameterization``, ...)
            replace its fields.
        per_layer: one vector per listed layer, optimised jointly (with the options' regularisers),
            instead of one vector shared by every listed layer.
        minibatch_size: datapoints per step: step ``i`` uses the ``i``-th block of ``minibatch_size``
            datapoints (cycling in order); ``target_loss`` then applies to the current minibatch.
        distributed: data parallelism for minibatches: ``False`` (off), ``None`` (auto), ``True`` or a
            process group; see :mod:`steering_opt.parallel`.
        custom_output_constr_loss_func / custom_output_constr_pre_loss_func: replace the
            output-constrained phase's objective (``‖v‖``) by ``loss_func(model, tokenizer, datapoints,
            layers, steering, **pre_loss_func(model, tokenizer, datapoints, layers, steering))``
            (e.g. :func:`~steering_opt.melbo.make_melbo_loss_funcs`).

    Returns:
        An :class:`~steering_opt.loop.OptimizeResult`: ``.vector``, ``.steering``, ``.loss`` (nats),
        ``.status``, ``.info`` (the reference library's dict), ``.to_steering_vector()``.
    """
    validate.model(model)
    opts = OptimizeOptions.build(options, overrides)
    dps = validate.datapoints(datapoints)
    layers = validate.layers(model, layer, "layers" if per_layer else "layer")
    validate.tokenizer(tokenizer)
    d = arch.hidden_size(model)
    opts.check(d)
    validate.integer("minibatch_size", minibatch_size, 1, allow_none=True)
    if opts.optimizer == "lbfgs" and minibatch_size is not None and minibatch_size < len(dps):
        raise ValueError("`optimizer='lbfgs'` needs the same loss at every step: it cannot be combined with "
                         "`minibatch_size`")
    group = None
    if distributed is not False:
        from .parallel import resolve_distributed

        group = resolve_distributed(distributed)
    seqs = tokenize_datapoints(tokenizer, dps, only_hook_prompt=opts.only_hook_prompt,
                               target_loss=None if opts.do_target_loss_sum else opts.target_loss,
                               max_length=arch.context_length(model))
    subset_fn = None
    if minibatch_size is not None and minibatch_size < len(dps):
        batches = [[i for i, s in enumerate(seqs) if b <= s.datapoint < b + minibatch_size]
                   for b in range(0, len(dps), minibatch_size)]

        def subset_fn(step: int) -> list[int] | None:
            return batches[step % len(batches)]
    gen = make_generator(opts.seed)
    with frozen_model(model):
        steering = initial_steering(model, layers, opts, gen, per_layer=per_layer)
        # --- KL fluency term (steering_opt.kl; owned by the fluency work): None when kl_weight == 0
        kl_term: Any = None
        if opts.kl_weight:
            from .kl import KLTerm, with_kl

            kl_term = KLTerm.build(model, tokenizer, layers, opts)
        reg_fn = regularizer(opts) if kl_term is None else with_kl(regularizer(opts), kl_term)
        # --- end KL fluency term
        state = JobState(steering, seqs, len(dps), opts, gen, reg_fn=reg_fn, subset_fn=subset_fn)
        objective = Objective(coldness=opts.coldness, do_one_minus=opts.do_one_minus,
                              normalize_token_length=opts.normalize_token_length)
        eng: LossEngine = make_engine(opts.engine, model, seqs, layers, objective,
                                      max_batch_tokens=opts.max_batch_tokens)
        extra: dict[str, Any] = {}
        if group is not None:  # each process computes a shard of every evaluation; grads/losses summed
            from .parallel import DataParallelEngine

            fingerprint = repr((opts.to_dict(), minibatch_size, per_layer, layers))
            wrapped = DataParallelEngine(eng, state.tensors, group, fingerprint=fingerprint)
            extra["processes"] = wrapped.world
            eng = wrapped
        run_jobs(eng, [state], progress=opts.progress, desc="optimize")
        result = state.result(extra, per_layer=per_layer)
        if opts.do_output_constr and state.status not in ("nonfinite", "interrupted"):
            custom = None
            if custom_output_constr_loss_func is not None:
                loss_func = custom_output_constr_loss_func
                pre = {}
                if custom_output_constr_pre_loss_func is not None:
                    pre = custom_output_constr_pre_loss_func(model, tokenizer, dps, layers, steering) or {}

                def custom() -> torch.Tensor:
                    return loss_func(model, tokenizer, dps, layers, steering, **pre)

            norm0 = result.norm
            it, final, ok, history = output_constrained(eng, state, start_losses=state.losses, custom_loss=custom,
                                                        kl_term=kl_term)
            state.losses = final
            result = state.result(extra, per_layer=per_layer)
            result.extra.update(output_constr_iters=it, constraints_satisfied=ok,
                                output_constr_norm_history=history, norm_before_output_constr=norm0)
        if kl_term is not None:  # KL fluency term: info['kl'] of the returned parameters, info['kl_history']
            result.extra.update(kl_term.report(result.steering))
    result.provenance = provenance(model, dps)
    return result


def provenance(model: nn.Module, datapoints: Sequence[Any]) -> dict[str, Any]:
    """What a vector is made from, as recorded in its metadata: ``{"model": arch.model_fingerprint(model),
    "datapoints": describe_datapoints(datapoints)}`` (a sha256 of the datapoints, counts, the first prompts)."""
    return {"model": arch.model_fingerprint(model), "datapoints": describe_datapoints(datapoints)}


def output_constrained(engine: LossEngine, state: JobState, *, start_losses: torch.Tensor,
                       custom_loss: Callable[[], torch.Tensor] | None = None,
                       kl_term: Any = None) -> tuple[int, torch.Tensor, bool, list[float]]:
    """Minimise ``f = ‖v‖ (+‖M‖_F)`` subject to loss constraints by the modified differential method
    of multipliers (Platt & Barr 1988), with projected multipliers for the inequality constraints.

    Constraints ``g_i = loss_i - t_i ≤ 0``: one on the summed loss (``do_target_loss_sum``) or one
    per completion. ``t_i = max(target_i, loss_i at the start)``, so the start point is feasible.
    The parameter update follows ``∇f + Σ_i max(0, λ_i + c·s·g_i)·s·∇g_i`` (Adam); multipliers
    ascend ``λ_i ← max(0, λ_i + lr·s·g_i)``; ``s = f₀ / Σ|t_i|`` puts the constraints on the
    objective's scale. One forward+backward per iteration: the multiplier weights use the constraint
    values of the previous evaluation. With ``custom_loss`` (e.g. MELBO) the objective is that
    function and ``‖v‖ (+‖M‖_F) ≤ output_constr_norm_initial_scale × its start value`` is one more
    constraint. With ``kl_term`` (``kl_weight > 0``) the objective is ``‖v‖ (+‖M‖_F) + λ · KL`` on the KL
    prompts: the smallest, least disruptive steering that keeps the completion losses.

    Returns (iterations, losses of the returned parameters, whether they satisfy every constraint,
    objective history). The returned parameters are the feasible ones with the smallest objective
    seen (the start point if none is better).
    """
    o = state.options
    seqs = engine.seqs
    lr = o.output_constr_lr if o.output_constr_lr is not None else o.lr
    max_iters = o.max_output_constr_iters if o.max_output_constr_iters is not None else DEFAULT_OUTPUT_CONSTR_ITERS
    target_loss, do_sum, damping = o.target_loss, o.do_target_loss_sum, o.output_constr_damping

    def total(losses: torch.Tensor) -> torch.Tensor:  # the loss that target_loss applies to, shape (1,)
        return (losses.mean() if o.loss_reduction == "mean" else losses.sum())[None]

    per_seq_t = torch.tensor([s.target if s.target is not None else (target_loss if target_loss is not None
                                                                        else math.inf) for s in seqs])
    if do_sum:
        t = torch.tensor([max(target_loss if target_loss is not None else -math.inf, float(total(start_losses)))])
    else:
        t = torch.maximum(torch.where(per_seq_t < math.inf, per_seq_t, start_losses), start_losses)

    def norm_objective() -> torch.Tensor:
        return torch.stack([p.norm_objective() for p in state.params]).sum()

    norm0 = float(norm_objective().detach())
    scale = norm0 / max(float(t.abs().sum()), 1e-6)
    lam = torch.zeros_like(t)
    lam_norm, g_norm = 0.0, 0.0
    g = (total(start_losses) if do_sum else start_losses) - t

    def objective() -> torch.Tensor:
        return custom_loss() if custom_loss is not None else norm_objective()

    layers = engine.layers
    params = {layer: [state.steering[layer]] for layer in layers}

    def spec_fn(idx: list[int]) -> SteerSpec:
        sign = state.signs[idx][:, None]
        return SteerSpec(rows={layer: sign.to(p[0].vector) * p[0].vector for layer, p in params.items()},
                         params=params)

    opt = torch.optim.Adam(state.tensors, lr=lr)
    best = (float(objective().detach()), state.snapshot(), start_losses.clone())
    since_best, it = 0, 0
    history: list[float] = []
    for it in range(1, max_iters + 1):  # noqa: B007
        opt.zero_grad(set_to_none=True)
        mult = torch.clamp(lam + damping * scale * g, min=0) * scale
        if do_sum and o.loss_reduction == "mean":
            mult = mult / len(seqs)
        w = mult.expand(len(seqs)) if do_sum else mult
        losses = engine.run(spec_fn, weights=w, backward=True)
        f = objective()
        f_val = float(f.detach())
        if kl_term is not None and custom_loss is None:  # its gradient is accumulated by the call itself
            f_val += float(kl_term(state.steering))
        if custom_loss is not None:  # keep ‖v‖ bounded while optimising a custom objective
            nrm = norm_objective()
            g_norm = float(nrm.detach()) - o.output_constr_norm_initial_scale * norm0
            f = f + max(0.0, lam_norm + damping * g_norm) * nrm
        f.backward()
        g = (total(losses) if do_sum else losses) - t
        feasible = bool((g <= 1e-6).all()) and g_norm <= 1e-6
        history.append(f_val)
        if feasible and f_val < best[0] - 1e-9:
            best = (f_val, state.snapshot(), losses.clone())
            since_best = 0
        else:
            since_best += 1
        if since_best >= o.output_constr_patience:
            break
        opt.step()
        lam = torch.clamp(lam + lr * scale * g, min=0)
        lam_norm = max(0.0, lam_norm + lr * g_norm)
    state.restore(best[1])
    final = engine.run(spec_fn, backward=False)
    g = (total(final) if do_sum else final) - t
    return it, final, bool((g <= 1e-4).all()), history


make_module_callable(__name__)  # `steering_opt.optimize(...)` calls optimize(); the attribute is the module
