"""Every optimiser hyper-parameter, as data: :class:`OptimizeOptions`.

One frozen object holds the settings of an optimisation and checks itself once, when it is built
(:meth:`OptimizeOptions.check` adds the checks that need the model's hidden size). Every optimiser
entry point (``optimize``, ``optimize_vector``, ``optimize_vectors``, the minibatch path,
``optimize_many``'s ``Job``) and the command line are built from it: a field's name is the keyword
argument's name, its default the keyword's default, and its ``help`` metadata the documentation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import validate

if TYPE_CHECKING:
    from .parameterization import Steering

#: Step cap when neither ``max_iters`` nor a reachable ``target_loss`` ends the loop.
DEFAULT_MAX_ITERS = 1000
#: Step cap of the output-constrained phase when ``max_output_constr_iters`` is None.
DEFAULT_OUTPUT_CONSTR_ITERS = 200
#: The values of ``optimizer`` (see :mod:`steering_opt.loop`).
OPTIMIZERS = ("adam", "adam_cosine", "normalized", "lbfgs")


def _f(default: Any, help: str, *, cli: bool = True) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli})


@dataclasses.dataclass(frozen=True)
class OptimizeOptions:
    """Hyper-parameters of one steering optimisation (losses in nats).

    Build with keywords (``OptimizeOptions(lr=0.1, max_iters=30)``); invalid values raise
    ``ValueError``/``TypeError`` naming the field. ``dataclasses.replace`` gives a modified copy.
    """

    # --- optimiser
    lr: float = _f(0.01, "Learning rate (Adam; the peak of the schedule with adam_cosine / normalized).")
    max_iters: int | None = _f(None, "Exact number of optimiser steps; None: until target/convergence "
                                     f"(at most {DEFAULT_MAX_ITERS}).")
    eps: float = _f(1e-6, "Convergence threshold on the loss change (nats), used when neither max_iters nor "
                          "target_loss is given.")
    seed: int | None = _f(None, "Seed of the initial parameters and the noise (reproducible trajectories).")
    optimizer: str = _f("adam", "'adam' (constant lr), 'adam_cosine' (Adam, lr warm-up over 5% of the step cap then "
                                "cosine decay to lr/10), 'normalized' (steps of length lr*sqrt(numel) along the "
                                "gradient, same schedule) or 'lbfgs' (L-BFGS with strong-Wolfe line search; lr sets "
                                "the first step's length, lr*sqrt(numel); no noise or minibatches).")
    # --- objective
    coldness: float = _f(0.7, "Inverse temperature applied to the logits in the loss.")
    normalize_token_length: bool = _f(False, "Divide each completion's loss by its token count.")
    only_hook_prompt: bool = _f(False, "Steer prompt positions only.")
    do_one_minus: bool = _f(True, "Suppression loss -sum log(1-p) (True) or +sum log p (False).")
    # --- stopping
    target_loss: float | None = _f(None, "Stop when the loss (nats) is at or below this.")
    do_target_loss_sum: bool = _f(True, "target_loss applies to the summed loss (True) or to every completion.")
    target_loss_target_iters: int = _f(1, "Consecutive evaluations at or below target_loss needed to stop.")
    plateau_patience: int | None = _f(10, "Stop (status 'plateau') when the best loss improved by less than "
                                          "plateau_rel_tol (relative) over this many steps; None: never.")
    plateau_rel_tol: float = _f(0.01, "Relative improvement of the best loss over plateau_patience steps below which "
                                      "the loop stops.")
    time_budget_s: float | None = _f(None, "Wall-time budget (s): stop (status 'time_budget') and return the best "
                                           "parameters seen once it is used up.")
    callback: Callable[[int, float, dict[int, Steering]], bool | None] | None = _f(
        None, "callback(step, loss, steering) after every evaluation (loss in nats, steering {layer: Steering}); "
              "returning True stops (status 'callback') with the best parameters seen.", cli=False)
    return_on_interrupt: bool = _f(False, "On KeyboardInterrupt return the best parameters seen (status "
                                          "'interrupted') instead of re-raising (the CLI always does, and saves).",
                                   cli=False)
    satisfice: bool = _f(False, "Minimise (loss - target)^2 per completion (target: its own target loss, else "
                                "target_loss): aim at the target instead of below it. Stops within eps of it.")
    loss_reduction: str = _f("sum", "How the completion losses of an evaluation combine into the reported loss, "
                                    "target_loss and the convergence test: 'sum' or 'mean' (e.g. over a minibatch).")
    # --- parameterisation
    max_norm: float | None = _f(None, "Cap on the vector's L2 norm (projection after every step); 0 with "
                                "affine_rank learns the matrix alone.")
    starting_norm: float = _f(1.0, "L2 norm of the random initial vector.")
    starting_vec: torch.Tensor | None = _f(None, "Initial vector (d,) instead of a random one.", cli=False)
    vector_clamp: float | None = _f(None, "Clamp steering h - (h.v^)v^ + c v with c = vector_clamp.")
    affine_rank: int | None = _f(None, "Also learn a rank-r affine map h -> h + h M^T + v (M = L^T R).")
    max_affine_norm: float | None = _f(2.0, "Cap on the norm of every row of the affine factors L and R.")
    starting_affine_norm: float = _f(1.0, "Norm of every row of the random initial affine factors.")
    parameterization: type[Steering] | None = _f(
        None, "A Steering subclass to optimise instead of the one chosen by vector_clamp / affine_rank.", cli=False)
    # --- noise
    noise_scale: float | None = _f(None, "Std of Gaussian noise added to the vector at every evaluation.")
    do_tangent_space_noise: bool = _f(True, "Remove the noise's component along the unsteered-loss gradient.")
    do_noise_abl_relu: bool = _f(False, "Tangent noise: remove that component only where it points downhill "
                                        "(the noise never lowers the loss to first order).")
    noise_iters: int = _f(1, "Noise draws per step; the losses and gradients are averaged over them.")
    do_antipgd: bool = _f(False, "Anti-correlated noise (Orvieto et al. 2022): the perturbation at step t is "
                                 "xi_t - xi_{t-1}.")
    # --- regularisers (one vector per layer: optimize_vectors)
    regularization_weight: float = _f(0.0, "Weight of the L1 (or max-abs) penalty on every vector.")
    regularization_type: str = _f("l1", "'l1' or 'max'.")
    sparsity_weight: float = _f(0.0, "Weight of the sum of per-layer L2 norms.")
    entropy_weight: float = _f(0.0, "Weight of the entropy of softmax(per-layer norms): steer few layers.")
    # --- fluency (steering_opt.kl): lambda * mean KL(unsteered || steered) on neutral prompts
    kl_weight: float = _f(0.0, "Weight of the mean KL(unsteered || steered) of next-token distributions (nats, "
                               "temperature 1) over every position of kl_prompts, added to the objective; "
                               "info['loss'] stays the completion loss, the KL is info['kl']; with do_output_constr "
                               "the norm minimisation's objective becomes norm + kl_weight * KL. 0: off.")
    kl_prompts: tuple[str, ...] | None = _f(None, "Neutral prompts (plain text) of the KL term; None: the "
                                                  "built-in steering_opt.kl.DEFAULT_KL_PROMPTS.", cli=False)
    # --- output-constrained phase
    do_output_constr: bool = _f(False, "After the first phase, minimise the norm while the losses stay on target.")
    output_constr_lr: float | None = _f(None, "Learning rate of that phase (None: lr).")
    max_output_constr_iters: int | None = _f(None, "Iterations of that phase (None: "
                                                   f"{DEFAULT_OUTPUT_CONSTR_ITERS}).")
    output_constr_damping: float = _f(1.0, "Damping of the method of multipliers.")
    output_constr_patience: int = _f(20, "Stop that phase after this many iterations without a smaller norm.")
    output_constr_norm_initial_scale: float = _f(1.0, "With a custom objective: keep the norm <= this x its "
                                                      "starting value.")
    # --- reporting
    return_vec_history: bool = _f(False, "Keep the parameters after every step (info['vec_history']).", cli=False)
    debug: bool = _f(False, "Log every evaluation's losses and the stopping decisions at DEBUG level (logging "
                            "module, logger 'steering_opt.loop').")
    # --- execution
    engine: str = _f("fast", "'fast' (cached, batched) or 'reference' (the naive algorithm).")
    max_batch_tokens: int = _f(16384, "Token budget of one forward/backward chunk (bounds memory).")
    progress: bool | None = _f(None, "Show a progress bar (None: in Jupyter or a terminal; see "
                               "STEERING_OPT_PROGRESS).", cli=False)

    def __post_init__(self) -> None:
        v = validate
        v.lr("lr", self.lr)
        v.integer("max_iters", self.max_iters, 0, allow_none=True)
        v.positive("eps", self.eps, allow_none=False, allow_zero=True)
        v.seed("seed", self.seed)
        v.positive("coldness", self.coldness, allow_none=False)
        for flag in ("normalize_token_length", "only_hook_prompt", "do_one_minus", "do_target_loss_sum",
                     "do_tangent_space_noise", "do_output_constr", "satisfice", "do_noise_abl_relu", "do_antipgd",
                     "return_vec_history", "debug"):
            v.boolean(flag, getattr(self, flag))
        v.real("target_loss", self.target_loss, allow_none=True, finite=False, unit=" (nats)")
        v.integer("target_loss_target_iters", self.target_loss_target_iters, 1)
        v.choice("optimizer", self.optimizer, OPTIMIZERS)
        v.integer("plateau_patience", self.plateau_patience, 1, allow_none=True)
        v.positive("plateau_rel_tol", self.plateau_rel_tol, allow_none=False, allow_zero=True)
        v.positive("time_budget_s", self.time_budget_s)
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"`callback` must be callable(step, loss, steering) or None, got "
                            f"{type(self.callback).__name__}")
        v.boolean("return_on_interrupt", self.return_on_interrupt)
        if self.optimizer == "lbfgs" and self.noise_scale:
            raise ValueError("`optimizer='lbfgs'` needs a deterministic loss: it cannot be combined with `noise_scale`")
        v.choice("loss_reduction", self.loss_reduction, ("sum", "mean"))
        v.integer("noise_iters", self.noise_iters, 1)
        v.positive("max_norm", self.max_norm, allow_zero=True)
        if self.max_norm == 0 and self.affine_rank is None:  # with affine_rank: matrix-only steering (v stays 0)
            raise ValueError("`max_norm` must be positive for vector steering, got 0 (a zero vector steers nothing); "
                             "max_norm=0 is accepted only with `affine_rank`, to learn the matrix alone")
        v.positive("starting_norm", self.starting_norm, allow_none=False)
        v.real("vector_clamp", self.vector_clamp, allow_none=True)
        rank = self.affine_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):  # range: check(d)
            raise ValueError(f"`affine_rank` must be an int in [1, hidden size] or None, got {self.affine_rank!r}")
        v.positive("max_affine_norm", self.max_affine_norm)
        v.positive("starting_affine_norm", self.starting_affine_norm, allow_none=False)
        if self.affine_rank is not None and self.vector_clamp is not None:
            raise ValueError("`vector_clamp` and `affine_rank` cannot be combined")
        if self.parameterization is not None and (self.affine_rank is not None or self.vector_clamp is not None):
            raise ValueError("`parameterization` replaces `vector_clamp` / `affine_rank`: give one or the other")
        v.positive("noise_scale", self.noise_scale, allow_zero=True)
        for name in ("regularization_weight", "sparsity_weight", "entropy_weight", "kl_weight"):
            v.positive(name, getattr(self, name), allow_none=False, allow_zero=True)
        if self.kl_prompts is not None:
            if not isinstance(self.kl_prompts, (list, tuple)) or not self.kl_prompts \
                    or not all(isinstance(p, str) and p for p in self.kl_prompts):
                raise ValueError(f"`kl_prompts` must be a non-empty sequence of non-empty strings or None, got "
                                 f"{self.kl_prompts!r:.80}")
            object.__setattr__(self, "kl_prompts", tuple(self.kl_prompts))
        v.choice("regularization_type", self.regularization_type, ("l1", "max"))
        v.lr("output_constr_lr", self.output_constr_lr, allow_none=True)
        v.integer("max_output_constr_iters", self.max_output_constr_iters, 0, allow_none=True)
        v.positive("output_constr_damping", self.output_constr_damping, allow_none=False, allow_zero=True)
        v.integer("output_constr_patience", self.output_constr_patience, 1)
        v.positive("output_constr_norm_initial_scale", self.output_constr_norm_initial_scale, allow_none=False)
        v.choice("engine", self.engine, ("fast", "reference"))
        v.integer("max_batch_tokens", self.max_batch_tokens, 1)
        if self.progress is not None:
            v.boolean("progress", self.progress)
        if self.starting_vec is not None and not isinstance(self.starting_vec, torch.Tensor):
            raise TypeError(f"`starting_vec` must be a torch.Tensor, got {type(self.starting_vec).__name__}")
        if self.parameterization is not None:
            from .parameterization import Steering

            if not (isinstance(self.parameterization, type) and issubclass(self.parameterization, Steering)):
                raise TypeError(f"`parameterization` must be a steering_opt.Steering subclass, got "
                                f"{self.parameterization!r:.60}")

    def check(self, d: int) -> None:
        """The checks that need the model's hidden size ``d``."""
        if self.affine_rank is not None:
            validate.integer("affine_rank", self.affine_rank, 1, maximum=d, what=" (the hidden size)")
        if self.starting_vec is not None:
            validate.vector("starting_vec", self.starting_vec, d)
            if self.vector_clamp is not None and float(self.starting_vec.norm()) == 0:
                raise ValueError("`vector_clamp` needs a non-zero `starting_vec` (got a zero vector)")

    @property
    def step_cap(self) -> int:
        """The number of steps after which the loop stops at the latest."""
        return self.max_iters if self.max_iters is not None else DEFAULT_MAX_ITERS

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able settings (tensors and classes summarised), e.g. for a saved vector's metadata."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if isinstance(val, torch.Tensor):
                val = f"tensor{tuple(val.shape)}"
            elif isinstance(val, type):
                val = getattr(val, "kind", "") or val.__name__
            elif isinstance(val, float) and not math.isfinite(val):
                val = repr(val)  # JSON has no inf/nan
            out[f.name] = val
        return out

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, options: OptimizeOptions | None = None, overrides: Mapping[str, Any] | None = None,
              *, where: str = "") -> OptimizeOptions:
        """``options`` (or the defaults) with ``overrides`` applied; unknown names raise ``TypeError``
        naming them; ``where`` (e.g. ``"jobs[3]: "``) prefixes error messages."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"{where}unknown option(s) {unknown}; valid options: {', '.join(cls.field_names())}")
        try:
            if options is None:
                return cls(**overrides)
            if not isinstance(options, cls):
                raise TypeError(f"`options` must be an OptimizeOptions, got {type(options).__name__}")
            return dataclasses.replace(options, **overrides)
        except (TypeError, ValueError) as e:
            if not where:
                raise
            raise type(e)(f"{where}{e}") from None
