"""The optimisation loop: one per-job state, one driver for one job or many.

A :class:`JobState` holds one optimisation's parameters (a :class:`~steering_opt.parameterization.Steering`
per steered layer, possibly one object shared by several layers), its Adam state and its stopping
state. :func:`run_jobs` drives any number of them through one engine: each round it evaluates every
active job's loss in one batched pass (each row steered by its own job's parameters), then every job
checks its stop conditions and takes its step (:meth:`JobState.after_eval`). ``optimize`` runs one
job; ``optimize_many`` runs groups of them; the minibatch path gives a job a subset schedule.

Per round, for each job: evaluate → ``callback`` → stop checks (non-finite, target, step cap,
convergence, plateau, time budget, callback) → optimiser step (``optimizer``: Adam, scheduled Adam,
normalised gradient or L-BFGS) → projection. ``max_iters`` caps the steps (a plateau, the time budget or
the callback may stop earlier). The parameters returned are those whose loss was measured last, except
after a plateau, time-budget, callback or interrupt stop, which return the best evaluated parameters;
a non-finite evaluation restores the last finite parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .data import TokenizedCompletion, nest_losses
from .engine import LossEngine, SteerSpec
from .optimizers import make_optimizer
from .options import OptimizeOptions
from .parameterization import Additive, Affine, Clamp, Steering
from .progress import progress_bar

log = logging.getLogger(__name__)


def unique_params(steering: dict[int, Steering]) -> list[Steering]:
    """The distinct parameterisation objects of ``steering`` (layers may share one)."""
    out: list[Steering] = []
    for p in steering.values():
        if not any(p is q for q in out):
            out.append(p)
    return out


@dataclasses.dataclass
class OptimizeResult:
    """What an optimisation returns.

    Attributes:
        steering: ``{layer: Steering}`` (layers optimised with one shared vector share the object).
        options: the settings used.
        iters: optimiser steps taken.
        losses: per-completion losses ``(n_completions,)`` of the returned parameters (nats).
        completion_losses: the same as ``[datapoint][0 = src, 1 = dst][completion]``.
        loss_history: summed (``loss_reduction='mean'``: mean) loss (nats) at every evaluation.
        status: ``"max_iters"``, ``"target_reached"``, ``"converged"``, ``"plateau"``, ``"time_budget"``,
            ``"callback"``, ``"interrupted"`` or ``"nonfinite"``.
        extra: phase-specific entries (output-constrained phase, processes, job name), copied into
            :attr:`info`.
        provenance: what the vector was made from, recorded by :meth:`to_steering_vector` (and so by every
            save): ``{"model": arch.model_fingerprint(model), "datapoints": describe_datapoints(...)}``.
    """

    steering: dict[int, Steering]
    options: OptimizeOptions
    iters: int
    losses: torch.Tensor
    completion_losses: list[list[list[float]]]
    loss_history: list[float]
    status: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    per_layer: bool = False  # one vector per layer (``optimize(..., per_layer=True)``), even for one layer
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    evals: int = 0  # loss evaluations (iters + 1, plus L-BFGS line-search evaluations)

    @property
    def layers(self) -> list[int]:
        return sorted(self.steering)

    @property
    def shared(self) -> bool:
        """Whether every layer holds the same parameters (one vector steering several layers)."""
        return len(unique_params(self.steering)) == 1

    @property
    def loss(self) -> float:
        """Loss of the returned parameters (nats): the sum over completions (their mean with
        ``loss_reduction='mean'``)."""
        return float(self.losses.mean() if self.options.loss_reduction == "mean" else self.losses.sum())

    @property
    def vector(self) -> torch.Tensor:
        """The optimised vector ``(d,)`` (one shared vector; see :attr:`vectors` otherwise)."""
        if self.per_layer:
            raise ValueError("this result holds one vector per layer: use `.vectors`")
        return self.steering[self.layers[0]].vector

    @property
    def vectors(self) -> dict[int, torch.Tensor]:
        return {k: p.vector for k, p in sorted(self.steering.items())}

    @property
    def matrix(self) -> torch.Tensor | None:
        """The dense affine map ``M`` ``(d, d)`` of an affine result, else None."""
        p = self.steering[self.layers[0]]
        return p.dense().detach() if isinstance(p, Affine) else None

    @property
    def norm(self) -> float:
        return float(self.vectors[self.layers[0]].norm())

    @property
    def info(self) -> dict[str, Any]:
        """The reference library's ``info`` dict: ``iters``, ``loss`` (summed, or nested per completion
        with ``do_target_loss_sum=False``), ``norm`` (``norms`` per layer), ``loss_history``, ``status``,
        ``completion_losses``, ``loss_units``, plus the phase-specific entries, and the provenance:
        ``parameterization`` (its kind) and ``vector_clamp`` for clamp steering. (The only dict values are
        per-layer floats, as the reference tutorial's loops expect; the options are in :attr:`options`.)"""
        out: dict[str, Any] = {
            "iters": self.iters,
            "loss": self.loss if self.options.do_target_loss_sum else self.completion_losses,
            "completion_losses": self.completion_losses,
            "loss_history": self.loss_history,
            "status": self.status,
            "loss_units": "nats",
        }
        first = self.steering[self.layers[0]]
        out["parameterization"] = first.kind or type(first).__name__
        if isinstance(first, Clamp):
            out["vector_clamp"] = first.coefficient
        if not self.per_layer:
            out["norm"] = self.norm
            p = self.steering[self.layers[0]]
            if isinstance(p, Affine) and p.left is not None and p.right is not None:
                out["affine_factors"] = (p.left.detach(), p.right.detach())
        else:
            out["norms"] = {k: float(v.norm()) for k, v in self.vectors.items()}
        out.update(self.extra)
        return out

    def astuple(self) -> tuple[Any, ...]:
        """``(vector, info)``, ``(vector, matrix, info)`` for affine steering, or ``({layer: vector}, info)``
        for one vector per layer: the reference library's return shapes."""
        if self.per_layer:
            return self.vectors, self.info
        if isinstance(self.steering[self.layers[0]], Affine):
            return self.vector, self.matrix, self.info
        return self.vector, self.info

    def __iter__(self) -> Iterator[Any]:
        """Unpack like the tuple: ``vector, info = optimize_many(...)[0]``."""
        return iter(self.astuple())

    def __len__(self) -> int:
        return len(self.astuple())

    def __getitem__(self, i: int) -> Any:
        return self.astuple()[i]

    def to_steering_vector(self, metadata: dict[str, Any] | None = None) -> Any:
        """A :class:`~steering_opt.vector.SteeringVector` (to apply, combine, save) that records the
        parameterisation, the options, the final loss, and (from :func:`~steering_opt.optimize.optimize`) the
        model's fingerprint and a summary of the datapoints."""
        from .vector import SteeringVector

        meta = {"method": "optimize", "iters": self.iters, "loss": self.loss, "status": self.status,
                "loss_units": "nats", "options": self.options.to_dict(), **self.provenance}
        meta.update(metadata or {})
        return SteeringVector.from_steering(self.steering, metadata=meta)


RegFn = Callable[[dict[int, Steering]], torch.Tensor]
SubsetFn = Callable[[int], "list[int] | None"]


class JobState:
    """One optimisation's parameters, optimiser and stopping state.

    Args:
        steering: ``{layer: Steering}`` already on the right devices and requiring grad.
        seqs: the job's tokenised completions; ``n_datapoints`` datapoints.
        options: the settings (stopping rule, caps, noise, lr).
        gen: the job's random generator (noise draws continue from the initial parameters' draws).
        reg_fn: an extra differentiable penalty of the parameters, added to the objective.
        subset_fn: ``step -> indices of seqs`` evaluated at that step (minibatches); None = all.
    """

    def __init__(self, steering: dict[int, Steering], seqs: list[TokenizedCompletion], n_datapoints: int,
                 options: OptimizeOptions, gen: torch.Generator, *, reg_fn: RegFn | None = None,
                 subset_fn: SubsetFn | None = None, name: str | None = None):
        self.steering, self.seqs, self.n_dp, self.options, self.gen = steering, seqs, n_datapoints, options, gen
        self.reg_fn, self.subset_fn, self.name = reg_fn, subset_fn, name
        self.params = unique_params(steering)
        self.tensors = [t for p in self.params for t in p.parameters()]
        self.targets = torch.tensor([s.target if s.target is not None else math.inf for s in seqs])
        self.owner = torch.tensor([s.datapoint for s in seqs])
        self.signs = torch.tensor([s.sign for s in seqs])
        self.sat_targets = self._satisfice_targets()
        #: noise draws per step (``noise_iters`` with noise, else one evaluation)
        self.passes = options.noise_iters if options.noise_scale else 1
        self.tangent: torch.Tensor | None = None  # (n_dp, d) unsteered-loss gradients for tangent noise
        self.prev_noise: dict[int, torch.Tensor] = {}  # datapoint -> (passes, d) last draw, for anti-PGD
        self.round_noise: torch.Tensor | None = None  # (n_seqs, passes, d) this round's perturbations
        self.round_losses: torch.Tensor | None = None  # losses of this round's subset, summed over passes
        self.start = 0  # offset of this job's sequences in the engine's list
        self.history: list[float] = []
        self.vec_history: list[list[Any]] = []
        self.hits, self.steps = 0, 0
        self.prev: float | None = None
        self.status = "max_iters"
        self.losses = torch.full((len(seqs),), math.nan)  # no finite evaluation yet: never report a made-up loss
        self.done = self.final_eval = False
        self.subset: list[int] | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.sched: torch.optim.lr_scheduler.LambdaLR | None = None
        self.last_good: list[torch.Tensor] = []
        self.evals = 0  # loss evaluations (L-BFGS line searches add some per step)
        self.best: tuple[float, list[torch.Tensor], torch.Tensor] | None = None  # (objective, params, losses)
        self.best_trace: list[float] = []  # best objective after each evaluation (plateau test)
        self.t0 = 0.0
        #: L-BFGS: one more evaluation of this job alone (set by run_jobs), and the last one's results
        self.reeval: Callable[[], torch.Tensor] | None = None
        self.cached: tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor | None]] | None = None
        self.from_cache = False
        if options.optimizer == "lbfgs" and subset_fn is not None:
            raise ValueError("`optimizer='lbfgs'` needs the same loss at every step: it cannot be combined with "
                             "minibatches")

    def _satisfice_targets(self) -> torch.Tensor | None:
        """Per-sequence targets of ``satisfice`` (the completion's own target, else ``target_loss``)."""
        if not self.options.satisfice:
            return None
        t = [s.target if s.target is not None else self.options.target_loss for s in self.seqs]
        missing = [i for i, x in enumerate(t) if x is None or not math.isfinite(x)]
        if missing:
            s = self.seqs[missing[0]]
            raise ValueError(f"`satisfice=True` needs a finite target for every completion: give `target_loss` or "
                             f"per-completion target losses (datapoints[{s.datapoint}] has none for completion "
                             f"{s.index} of its {'src' if s.kind == 0 else 'dst'}_completions)")
        return torch.tensor(t, dtype=torch.float32)

    # ------------------------------------------------------------------ state
    def project(self) -> None:
        for p in self.params:
            p.project(self.options)

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.tensors]

    def restore(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(self.tensors, snap):
                t.copy_(s)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors)

    def usable(self) -> bool:
        return all(p.usable() for p in self.params)

    def _stop_nonfinite(self, what: str) -> None:
        self.restore(self.last_good)
        self.status, self.done = "nonfinite", True
        log.warning("%snon-finite %s at step %d; restored the last finite parameters",
                    f"{self.name}: " if self.name else "", what, self.steps)

    def _debug(self, msg: str, *args: Any) -> None:
        if self.options.debug:
            log.debug("%s" + msg, f"{self.name}: " if self.name else "", *args)

    # ------------------------------------------------------------------ the loop's phases
    def begin(self) -> None:
        """Project the start (the caps hold from the first evaluation on) and create the optimiser."""
        self.project()
        self.opt, self.sched = make_optimizer(self.tensors, self.options)
        self.last_good = self.snapshot()
        self.t0 = time.perf_counter()

    def prepare(self, d: int | None = None) -> None:
        """Before an evaluation: clear gradients, pick the subset, refuse unusable parameters, and draw
        this round's noise (hidden size ``d``; None: no noise is drawn)."""
        assert self.opt is not None
        self.final_eval = self.steps >= self.options.step_cap
        self.opt.zero_grad(set_to_none=True)
        self.round_losses = None
        if not self.usable():  # the last step made them non-finite (or a clamp vector zero): don't run it
            self._stop_nonfinite("(or zero clamp) parameters")
            return
        self.subset = self.subset_fn(self.steps) if self.subset_fn is not None else None
        self.round_noise = self.draw_noise(d, self.passes) if d is not None else None
        c = self.cached
        self.from_cache = c is not None and all(torch.equal(t, s) for t, s in zip(self.tensors, c[0]))
        if self.from_cache:  # L-BFGS: its line search already evaluated these parameters
            assert c is not None
            for t, g in zip(self.tensors, c[2]):
                t.grad = None if g is None or self.final_eval else g.clone()
            self.round_losses = c[1].clone()
        self.cached = None

    def indices(self) -> list[int]:
        """This round's sequences, as indices into the engine's list."""
        local = range(len(self.seqs)) if self.subset is None else self.subset
        return [self.start + i for i in local]

    def draw_noise(self, d: int, passes: int = 1) -> torch.Tensor | None:
        """Per-sequence perturbations ``(n_seqs, passes, d)`` of one step (None without noise).

        One Gaussian draw ``ξ`` ``(passes, d)`` (std ``noise_scale``) per datapoint of this round, in
        datapoint order, shared by the datapoint's completions (its prompt is computed once). The
        perturbation is ``ξ_t`` (``ξ_t - ξ_{t-1}`` with ``do_antipgd``, ``ξ_{-1} = 0``); tangent noise
        then removes its component along the datapoint's unsteered-loss gradient ``g``: ``n - c g`` with
        ``c = n·g/‖g‖²`` (``min(c, 0)`` with ``do_noise_abl_relu``: only a downhill component is removed).
        Rows of sequences outside this round's subset are zero.
        """
        o = self.options
        if not o.noise_scale:
            return None
        local = range(len(self.seqs)) if self.subset is None else self.subset
        dps = sorted({self.seqs[i].datapoint for i in local})
        xi = torch.randn(len(dps), passes, d, generator=self.gen) * o.noise_scale
        pert = xi
        if o.do_antipgd:
            zero = torch.zeros(passes, d)
            pert = xi - torch.stack([self.prev_noise.get(dp, zero) for dp in dps])
            self.prev_noise.update({dp: xi[i] for i, dp in enumerate(dps)})
        if self.tangent is not None:
            g = self.tangent[dps][:, None, :]
            g2 = (g * g).sum(-1, keepdim=True)
            coef = torch.where(g2 > 0, (pert * g).sum(-1, keepdim=True) / g2.clamp_min(1e-30), torch.zeros_like(g2))
            if o.do_noise_abl_relu:
                coef = coef.clamp(max=0)
            pert = pert - coef * g
        row = torch.full((self.n_dp,), -1, dtype=torch.long)
        row[dps] = torch.arange(len(dps))
        out = torch.zeros(len(self.seqs), passes, d)
        idx = torch.tensor(list(local), dtype=torch.long)
        out[idx] = pert[row[self.owner[idx]]]
        return out

    def noise(self, d: int) -> torch.Tensor | None:
        """One evaluation's per-sequence noise rows ``(n_seqs, d)`` (see :meth:`draw_noise`)."""
        rows = self.draw_noise(d, 1)
        return None if rows is None else rows[:, 0]

    def noise_rows(self, j: int) -> torch.Tensor | None:
        """This round's perturbation rows ``(n_seqs, d)`` for noise draw ``j``."""
        return None if self.round_noise is None else self.round_noise[:, j]

    def weights(self, losses: torch.Tensor | None) -> torch.Tensor:
        """Gradient weights of this round's sequences ``(len(indices()),)`` for one pass: ``1/passes``, times
        ``2·(loss - target)`` with ``satisfice`` (the gradient of ``(loss - target)²``); ``losses`` are
        that pass's losses (needed with ``satisfice`` only)."""
        n = len(self.indices())
        w = torch.full((n,), 1.0 / self.passes)
        if self.sat_targets is not None:
            assert losses is not None
            t = self.sat_targets if self.subset is None else self.sat_targets[self.subset]
            w = w * 2 * (losses - t)
        return w

    def add_pass(self, losses: torch.Tensor) -> None:
        """Accumulate one pass's losses of this round's subset."""
        self.round_losses = losses if self.round_losses is None else self.round_losses + losses

    def reduce(self, losses: torch.Tensor) -> float:
        """The reported loss of an evaluation: the sum (or mean, ``loss_reduction='mean'``) of ``losses``."""
        return float(losses.mean() if self.options.loss_reduction == "mean" else losses.sum())

    def objective(self, sub: torch.Tensor) -> float:
        """The value whose gradient the engine accumulates (L-BFGS needs the two to match): the sum of ``sub``
        (of ``(sub - target)²`` with ``satisfice``), without the regulariser."""
        if self.sat_targets is not None:
            t = self.sat_targets if self.subset is None else self.sat_targets[self.subset]
            return float(((sub - t) ** 2).sum())
        return float(sub.sum())

    def _keep_best(self, total: float) -> None:
        """Remember the parameters of the best full evaluation (minibatch losses are not comparable)."""
        if self.subset_fn is not None:
            return
        if self.best is None or total < self.best[0]:
            self.best = (total, self.snapshot(), self.losses.clone())
        self.best_trace.append(self.best[0])

    def _stop_with_best(self, status: str) -> None:
        """Stop early with the best evaluated parameters (the last evaluated ones with minibatches)."""
        if self.best is not None:
            self.restore(self.best[1])
            self.losses = self.best[2].clone()
        else:
            self.restore(self.last_good)
        self.status, self.done = status, True
        self._debug("stopping after %d steps: %s", self.steps, status)

    def _plateaued(self) -> bool:
        k, tr = self.options.plateau_patience, self.best_trace
        if k is None or len(tr) <= k:
            return False
        old, new = tr[-1 - k], tr[-1]
        return old - new <= self.options.plateau_rel_tol * abs(old) + self.options.eps

    def after_eval(self, sub: torch.Tensor) -> None:
        """Stop checks and the optimiser step after an evaluation with losses ``sub`` (this round's
        subset, nats, averaged over the noise draws); the completion-loss gradients are already in ``.grad``."""
        opts = self.options
        self.evals += 0 if self.from_cache else 1
        total = self.reduce(sub)
        total_obj = total
        if self.reg_fn is not None:
            reg = self.reg_fn(self.steering)
            if not self.final_eval and reg.requires_grad:  # all-zero weights: a constant, nothing to do
                reg.backward()
            total_obj += float(reg.detach())
        if not math.isfinite(total_obj) or not self.finite():
            self._stop_nonfinite("loss or parameters")
            return
        if self.subset is None:
            self.losses = sub
        else:
            self.losses = self.losses.clone()
            self.losses[self.subset] = sub
        self.last_good = self.snapshot()
        self.history.append(total)
        self._keep_best(total_obj)
        self._debug("step %d: loss %.6g nats; per completion %s", self.steps, total,
                    [round(x, 6) for x in sub.tolist()])
        stop_asked = bool(opts.callback(self.steps, total, self.steering)) if opts.callback is not None else False
        if opts.target_loss is not None or bool((self.targets < math.inf).any()):
            tol = opts.eps if opts.satisfice else 0.0  # satisficing approaches the target from either side
            if opts.do_target_loss_sum:
                hit = opts.target_loss is not None and total <= opts.target_loss + tol
            else:
                t = self.targets if self.subset is None else self.targets[self.subset]
                hit = bool((sub <= t + tol).all())
            self.hits = self.hits + 1 if hit else 0
            if hit:
                self._debug("target loss hit (%d of %d consecutive)", self.hits, opts.target_loss_target_iters)
            if self.hits >= opts.target_loss_target_iters:
                self.status, self.done = "target_reached", True
                self._debug("stopping: target loss reached after %d steps", self.steps)
                return
        if self.final_eval:
            self.status, self.done = "max_iters", True
            self._debug("stopping: %d steps (max_iters)", self.steps)
            return
        if opts.max_iters is None and opts.target_loss is None and self.prev is not None \
                and abs(self.prev - total) < opts.eps:
            self.status, self.done = "converged", True
            self._debug("stopping: loss changed by less than eps=%g", opts.eps)
            return
        for status, stop in (("callback", stop_asked), ("plateau", self._plateaued()),
                             ("time_budget", opts.time_budget_s is not None
                              and time.perf_counter() - self.t0 >= opts.time_budget_s)):
            if stop:
                self._stop_with_best(status)
                return
        self.prev = total
        assert self.opt is not None
        if opts.optimizer == "lbfgs":
            self._lbfgs_step(sub)
        else:
            self.opt.step()
            if self.sched is not None:
                self.sched.step()
        self.project()
        self.steps += 1
        if opts.return_vec_history:
            self.vec_history.append([t.detach().float().cpu().clone().numpy() for t in self.tensors])

    def _lbfgs_step(self, sub: torch.Tensor) -> None:
        """One L-BFGS iteration. Its first closure call returns this round's evaluation (the gradients are in
        ``.grad``); each further call (the line search) is one engine evaluation of this job, whose results are
        kept so that the next round reuses them when the step lands on the last evaluated point."""
        assert self.opt is not None and self.reeval is not None
        reeval = self.reeval
        calls = [0]
        # torch's first step is -g·min(1, 1/‖g‖₁) (tiny for these losses; the line search then spends evaluations
        # growing it): make it lr·√numel long instead, as a normalised step; later steps use the curvature (t=1)
        group = self.opt.param_groups[0]
        group["lr"] = 1.0
        if self.steps == 0:
            grads = [t.grad for t in self.tensors if t.grad is not None]
            g2 = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            g1 = sum(float(g.abs().sum()) for g in grads)
            if g2 > 0 and math.isfinite(g1):
                numel = sum(t.numel() for t in self.tensors)
                group["lr"] = self.options.lr * math.sqrt(numel) / (g2 * min(1.0, 1 / g1))

        def closure() -> float:
            calls[0] += 1
            if calls[0] == 1:
                value = self.objective(sub)
                if self.reg_fn is not None:
                    value += float(self.reg_fn(self.steering).detach())
                return value
            for t in self.tensors:
                t.grad = None
            self.round_losses = None
            losses = reeval()
            self.evals += 1
            self.cached = (self.snapshot(), losses.clone(),
                           [None if t.grad is None else t.grad.detach().clone() for t in self.tensors])
            value = self.objective(losses)
            if self.reg_fn is not None:
                reg = self.reg_fn(self.steering)
                if reg.requires_grad:
                    reg.backward()
                value += float(reg.detach())
            return value if math.isfinite(value) else math.inf

        self.opt.step(closure)

    def finish_interrupted(self) -> None:
        """After a KeyboardInterrupt: the best evaluated parameters, status ``"interrupted"``."""
        self._stop_with_best("interrupted")

    def result(self, extra: dict[str, Any] | None = None, *, per_layer: bool = False) -> OptimizeResult:
        steering = {k: p.detach() for k, p in self.steering.items()}
        shared = {id(p): steering[k] for k, p in self.steering.items()}  # keep shared layers shared
        steering = {k: shared[id(p)] for k, p in self.steering.items()}
        out = dict(extra or {})
        if self.name is not None:
            out["job"] = self.name
        if self.options.return_vec_history:
            out["vec_history"] = self.vec_history
        return OptimizeResult(steering=steering, options=self.options, iters=self.steps, losses=self.losses,
                              completion_losses=nest_losses(self.seqs, self.losses.tolist(), self.n_dp),
                              loss_history=self.history, status=self.status, extra=out, per_layer=per_layer,
                              evals=self.evals)


# ---------------------------------------------------------------------------- steering of a round


def spec_for(states: Sequence[JobState], layers: Sequence[int], seq_job: torch.Tensor, signs: torch.Tensor,
             noise: torch.Tensor | None) -> Callable[[list[int]], SteerSpec]:
    """Per-sequence steering of the given jobs: sequence ``s`` of job ``j`` is steered at every layer
    by job ``j``'s parameters with vector ``sign_s · (v + noise_s)``.

    Args:
        seq_job: ``(n_seqs,)`` index into ``states`` of each engine sequence (-1: not in this round).
        signs: ``(n_seqs,)`` ±1 per sequence; noise: ``(n_seqs, d)`` or None.
    """
    per_layer = {layer: [st.steering[layer] for st in states] for layer in layers}
    vecs = {layer: torch.stack([p.vector for p in ps]) for layer, ps in per_layer.items()}  # (J, d)

    def fn(idx: list[int]) -> SteerSpec:
        job = seq_job[idx]
        rows = {}
        for layer, v in vecs.items():
            r = v[job.to(v.device)]
            if noise is not None:
                r = r + noise[idx].to(r)
            rows[layer] = signs[idx][:, None].to(r) * r
        return SteerSpec(rows=rows, params=per_layer, which=job if len(states) > 1 else None)

    return fn


def tangent_gradients(engine: LossEngine, states: Sequence[JobState], layers: Sequence[int], d: int,
                      device: torch.device) -> None:
    """Set ``state.tangent`` ``(n_dp, d)``: the gradient of each datapoint's unsteered loss w.r.t. an
    additive vector, for the jobs with tangent-space noise (one pass for all of them)."""
    todo = [st for st in states if st.options.noise_scale and st.options.do_tangent_space_noise]
    if not todo:
        return
    n = len(engine.seqs)
    zero = torch.zeros(n, d, device=device, requires_grad=True)
    additive: list[Steering] = [Additive(zero[0])]

    def zero_spec(idx: list[int]) -> SteerSpec:
        return SteerSpec(rows={layer: zero[idx] for layer in layers}, params={layer: additive for layer in layers})

    sub = [i for st in todo for i in range(st.start, st.start + len(st.seqs))]
    engine.run(zero_spec, backward=True, subset=sub)
    engine.forget(sub)
    per_seq = zero.grad.detach().float().cpu() if zero.grad is not None else torch.zeros(n, d)
    for st in todo:
        st.tangent = torch.zeros(st.n_dp, d).index_add(0, st.owner, per_seq[st.start: st.start + len(st.seqs)])


def run_pass(engine: LossEngine, group: Sequence[JobState], j: int, layers: Sequence[int], signs: torch.Tensor,
             device: torch.device, dp_len: dict[int, int] | None) -> None:
    """Evaluate noise draw ``j`` of this round for the jobs in ``group`` (one batched engine call, two
    with ``satisfice``: its gradient weights need the losses first) and accumulate the losses."""
    seqs = engine.seqs
    seq_job = torch.full((len(seqs),), -1, dtype=torch.long)
    idx: list[int] = []
    noise = None
    for a, st in enumerate(group):
        seq_job[st.start: st.start + len(st.seqs)] = a
        idx += st.indices()
        rows = st.noise_rows(j)
        if rows is not None:
            if noise is None:
                noise = torch.zeros(len(seqs), rows.shape[-1])
            noise[st.start: st.start + len(st.seqs)] = rows
    if dp_len is not None:
        idx.sort(key=lambda i: (-dp_len[seqs[i].datapoint], i))
    spec_fn = spec_for(group, layers, seq_job, signs, None if noise is None else noise.to(device))
    backward = any(not st.final_eval for st in group)
    weights = None
    if backward and any(st.passes > 1 or st.sat_targets is not None for st in group):
        first = None
        if any(st.sat_targets is not None for st in group):
            first = torch.full((len(seqs),), math.nan)
            first[torch.tensor(idx)] = engine.run(spec_fn, backward=False, subset=idx)
        w_seq = torch.zeros(len(seqs))
        for st in group:
            own = torch.tensor(st.indices())
            w_seq[own] = st.weights(None if first is None else first[own])
        weights = w_seq[torch.tensor(idx)]
    losses = engine.run(spec_fn, weights=weights, backward=backward, subset=idx)
    by_seq = torch.full((len(seqs),), math.nan)
    by_seq[torch.tensor(idx)] = losses
    for st in group:
        st.add_pass(by_seq[torch.tensor(st.indices())].clone())


def run_jobs(engine: LossEngine, states: Sequence[JobState], *, progress: bool | None = None,
             desc: str = "optimize") -> None:
    """Optimise ``states`` together on ``engine``, whose sequences are the states' sequences
    concatenated (``state.start`` = offset). Every job has its own optimiser and stops on its own; a
    stopped job leaves the batch. Each round evaluates every active job ``passes`` times (its noise
    draws; once without noise) and averages the losses. Results are read with :meth:`JobState.result`."""
    seqs = engine.seqs
    layers = engine.layers
    d = states[0].params[0].vector.shape[0]
    device = states[0].params[0].vector.device
    signs = torch.cat([st.signs for st in states])
    dp_len: dict[int, int] = {}  # packed length per datapoint (unique across jobs): sort so that chunks pad little
    for s in seqs:
        dp_len[s.datapoint] = dp_len.get(s.datapoint, s.prompt_len) + s.completion_len
    tangent_gradients(engine, states, layers, d, device)
    for st in states:
        st.begin()
        if st.options.optimizer == "lbfgs":
            st.reeval = _reevaluate(engine, st, layers, signs, device)
    bar = progress_bar(max(st.options.step_cap for st in states) + 1, desc, progress=progress, unit="eval")
    try:
        _rounds(engine, states, layers, signs, device, dp_len, d, bar)
    except KeyboardInterrupt:
        running = [st for st in states if not st.done]
        if not running or not all(st.options.return_on_interrupt and st.history for st in running):
            raise
        for st in running:
            st.finish_interrupted()
    finally:
        bar.close()
        if len(states) > 1:
            engine.forget(None)


def _reevaluate(engine: LossEngine, st: JobState, layers: Sequence[int], signs: torch.Tensor,
                device: torch.device) -> Callable[[], torch.Tensor]:
    """One more evaluation of ``st`` alone (forward + backward): its losses (this round's subset, nats)."""
    def run() -> torch.Tensor:
        st.round_losses = None
        run_pass(engine, [st], 0, layers, signs, device, None)
        assert st.round_losses is not None
        return st.round_losses
    return run


def _rounds(engine: LossEngine, states: Sequence[JobState], layers: Sequence[int], signs: torch.Tensor,
            device: torch.device, dp_len: dict[int, int], d: int, bar: Any) -> None:
    """The rounds of :func:`run_jobs` until every job has stopped."""
    active = list(states)
    members: list[int] | None = None
    while active:
        for st in active:
            st.prepare(d)
        active = [st for st in active if not st.done]
        if not active:
            break
        now = [id(st) for st in active]
        if members is not None and members != now:
            engine.forget(None)  # the active set changed: drop the old batches' caches
        members = now
        for j in range(max(st.passes for st in active)):
            group = [st for st in active if st.passes > j and not st.from_cache]
            if group:
                run_pass(engine, group, j, layers, signs, device, dp_len if len(states) > 1 else None)
        for st in active:
            assert st.round_losses is not None
            st.after_eval(st.round_losses / st.passes)
        active = [st for st in active if not st.done]
        bar.update(1)
        if len(states) == 1 and states[0].history:
            bar.set_postfix(loss=f"{states[0].history[-1]:.4g}")
