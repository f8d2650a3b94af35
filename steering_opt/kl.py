"""Keeping steered text fluent: a KL objective term and strength calibration.

Both measure how much steering changes the model's next-token distributions on *neutral* prompts
(everyday text with no topic, tone or language cue), as ``KL(p_unsteered ‖ p_steered)`` in nats,
averaged over every token position of those prompts (temperature 1: the model's own distributions,
not the training loss's ``coldness``).

* :class:`KLTerm` — the optimisation term ``kl_weight · mean KL`` (``OptimizeOptions.kl_weight``,
  ``kl_prompts``). The unsteered distributions are computed once; each step runs the neutral prompts
  through the same engine as the training data (the fast engine caches the blocks below the steered
  layer and batches the prompts), steered by the current parameters exactly as in training, and
  accumulates the gradient. The reported loss (``info['loss']``, ``target_loss``) stays the completion
  loss; the KL is reported as ``info['kl']`` (of the returned parameters) and ``info['kl_history']``.
* :func:`calibrate_strength` — the multiplier of a finished vector at which the mean KL equals a budget
  (bisection; no optimisation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import validate
from .data import DST, TokenizedCompletion
from .engine import Engine, Objective, SteerSpec, make_engine
from .evaluate import DEFAULT_NEUTRAL_PROMPTS, check_prompts, steering_context
from .hooks import frozen_model
from .options import OptimizeOptions
from .parameterization import Steering
from .passes import encode_prompts, mean_kl, next_token_logprobs

__all__ = ["DEFAULT_KL_PROMPTS", "DivergenceObjective", "KLTerm", "calibrate_strength", "with_kl"]

#: The neutral prompts of the KL term and of calibration when none are given (the evaluation's neutral prompts).
DEFAULT_KL_PROMPTS: tuple[str, ...] = DEFAULT_NEUTRAL_PROMPTS

RegFn = Callable[[dict[int, Steering]], torch.Tensor]


@dataclasses.dataclass(frozen=True, eq=False)
class DivergenceObjective(Objective):
    """Per-position ``KL(reference ‖ softmax(logits))`` (nats) as an engine objective.

    The engines sum :meth:`token_scores` per completion and negate it for promoted (DST) completions, so
    a sequence's "loss" is the summed KL over its predicted positions. ``state["reference"]`` holds the
    unsteered log-distributions ``(n_rows, V)`` (float32, on the model's device); while it is absent,
    :meth:`token_scores` records them instead (run once with no steering) and returns zeros.
    """

    coldness: float = 1.0
    do_one_minus: bool = False
    state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def token_scores(self, logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) * self.coldness, dim=-1)
        ref = self.state.get("reference")
        if ref is None:
            table = self.state.setdefault("recorded", torch.zeros(0))
            need = int(rows.max()) + 1 if rows.numel() else 0
            if table.shape[0] < need:
                grown = torch.zeros(need, lp.shape[-1], device=lp.device, dtype=lp.dtype)
                grown[: table.shape[0]] = table.to(lp.device) if table.numel() else 0
                table = self.state["recorded"] = grown
            table[rows.to(lp.device)] = lp.detach()
            return torch.zeros_like(lp[:, 0])
        r = ref[rows.to(ref.device)].to(lp.device)
        return -(r.exp() * (r - lp)).sum(-1)  # -KL: the engines negate promoted completions' scores


def _neutral_seqs(tokenizer: Any, prompts: Sequence[Any]) -> list[TokenizedCompletion]:
    """Each prompt as one sequence whose "completion" covers every position: ``[x_0 | x_1 … x_{T-1}, x_{T-1}]``
    (the repeated last token makes the distribution after the whole prompt a predicted position too;
    its own value is never used)."""
    out = []
    for i, ids in enumerate(encode_prompts(tokenizer, prompts, chat=False)):
        out.append(TokenizedCompletion(datapoint=i, kind=DST, index=0, ids=ids + ids[-1:], prompt_len=1,
                                       steer_positions=None, sign=1.0, target=None))
    return out


class KLTerm:
    """``weight · mean KL(p_unsteered ‖ p_steered)`` over every position of ``prompts``, as a penalty of the
    steering parameters (see the module docstring).

    Args:
        model, tokenizer: the model being steered and its tokenizer.
        layers: the steered blocks (as in training).
        prompts: the neutral prompts (plain text).
        weight: ``λ`` (the penalty is ``λ · mean KL``; 0 only measures).
        engine: ``"fast"`` or ``"reference"`` (as ``OptimizeOptions.engine``).
        max_batch_tokens: the fast engine's token budget.

    Calling it (``term(steering)``, ``steering`` = ``{layer: Steering}``) evaluates the KL, accumulates
    ``d(λ·KL)/d(params)`` into the parameters' ``.grad`` when they require grad and grad is enabled, records
    the KL in :attr:`history` and returns ``λ·KL`` as a detached 0-d tensor (the optimisation loop adds it to
    the objective it reports as non-finite; the gradient is already in place).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, layers: Sequence[int], prompts: Sequence[Any],
                 weight: float, *, engine: str = "fast", max_batch_tokens: int = 16384):
        self.weight = float(weight)
        self.seqs = _neutral_seqs(tokenizer, prompts)
        self.objective = DivergenceObjective()
        self.engine: Engine = make_engine(engine, model, self.seqs, layers, self.objective,
                                          max_batch_tokens=max_batch_tokens)
        self.n_positions = sum(s.completion_len for s in self.seqs)
        self.history: list[float] = []
        with torch.no_grad():  # the unsteered distributions, once, through the same engine
            self.engine.run(lambda idx: SteerSpec(rows={}), backward=False)
        self.objective.state["reference"] = self.objective.state.pop("recorded")

    @classmethod
    def build(cls, model: nn.Module, tokenizer: Any, layers: Sequence[int], options: OptimizeOptions) -> KLTerm | None:
        """The term of ``options`` (None when ``kl_weight`` is 0)."""
        if not options.kl_weight:
            return None
        prompts = options.kl_prompts if options.kl_prompts is not None else DEFAULT_KL_PROMPTS
        return cls(model, tokenizer, layers, prompts, options.kl_weight, engine=options.engine,
                   max_batch_tokens=options.max_batch_tokens)

    def _spec_fn(self, steering: dict[int, Steering]) -> Callable[[list[int]], SteerSpec]:
        layers = self.engine.layers

        def fn(idx: list[int]) -> SteerSpec:
            rows = {layer: steering[layer].vector[None].expand(len(idx), -1) for layer in layers}
            return SteerSpec(rows=rows, params={layer: [steering[layer]] for layer in layers})

        return fn

    def __call__(self, steering: dict[int, Steering]) -> torch.Tensor:
        tensors = [t for p in steering.values() for t in p.parameters()]
        backward = torch.is_grad_enabled() and self.weight > 0 and any(t.requires_grad for t in tensors)
        w = torch.full((len(self.seqs),), self.weight / self.n_positions)
        per_seq = self.engine.run(self._spec_fn(steering), weights=w, backward=backward)
        kl = float(per_seq.sum()) / self.n_positions
        self.history.append(kl)
        return torch.tensor(self.weight * kl)

    @torch.no_grad()
    def measure(self, steering: dict[int, Steering]) -> float:
        """The mean KL (nats) under ``steering``, without gradient and without recording it."""
        per_seq = self.engine.run(self._spec_fn(steering), backward=False)
        return float(per_seq.sum()) / self.n_positions

    def report(self, steering: dict[int, Steering]) -> dict[str, Any]:
        """``{"kl": mean KL of steering, "kl_history": KL at every evaluation, "kl_weight": λ}`` for ``info``."""
        return {"kl": self.measure(steering), "kl_history": list(self.history), "kl_weight": self.weight}


def with_kl(base: RegFn | None, term: KLTerm | None) -> RegFn | None:
    """The penalty ``base(steering) + term(steering)`` (either may be None)."""
    if term is None:
        return base

    def reg(steering: dict[int, Steering]) -> torch.Tensor:
        out = term(steering)
        if base is None:
            return out
        other = base(steering)
        return other + out.to(other.device)

    return reg


# ------------------------------------------------------------------------------------------ calibration


def calibrate_strength(model: nn.Module, tokenizer: Any, steering_vector: Any, kl_budget: float,
                       prompts: Sequence[Any] | None = None, *, chat: bool = False, max_multiplier: float = 64.0,
                       rtol: float = 0.02, max_evals: int = 30, batch_size: int = 16) -> float:
    """The multiplier at which ``steering_vector`` changes the next-token distributions on neutral prompts by
    ``kl_budget`` nats: mean ``KL(p_unsteered ‖ p_steered)`` over every position of ``prompts``.

    Bisection on the multiplier in ``(0, max_multiplier]``: the upper bracket is found by doubling from 1,
    then the interval is halved until the KL is within ``rtol · kl_budget`` of the budget (or ``max_evals``
    evaluations). The KL is 0 at multiplier 0 and should grow with it; a measured decrease larger than
    ``rtol · kl_budget`` between two evaluated multipliers raises ``ValueError`` (the search would be
    meaningless), as does a budget the vector cannot reach by ``max_multiplier``.

    Args:
        model, tokenizer: the model and its tokenizer (left unchanged).
        steering_vector: a :class:`~steering_opt.vector.SteeringVector` (or anything ``evaluate`` accepts:
            a vector's ``apply`` multiplier scales it).
        kl_budget: the target mean KL (nats per position), > 0; e.g. 0.1–0.5.
        prompts: neutral prompts (default :data:`DEFAULT_KL_PROMPTS`).
        chat: format the prompts as user messages with the chat template.
        max_multiplier: the largest multiplier tried.
        rtol: relative tolerance on the KL.
        max_evals: cap on the steered passes.

    Returns:
        The multiplier (float > 0). Apply it as ``steering_vector.apply(model, multiplier=m)``.
    """
    validate.model(model)
    validate.tokenizer(tokenizer)
    validate.real("kl_budget", kl_budget, unit=" (nats)")
    if kl_budget <= 0:
        raise ValueError(f"`kl_budget` must be > 0 (nats), got {kl_budget!r}")
    validate.positive("max_multiplier", max_multiplier, allow_none=False)
    validate.positive("rtol", rtol, allow_none=False)
    validate.integer("max_evals", max_evals, 2)
    plist = check_prompts(list(prompts) if prompts is not None else list(DEFAULT_KL_PROMPTS), "prompts")
    ids = encode_prompts(tokenizer, plist, chat)
    with frozen_model(model):
        base = next_token_logprobs(model, tokenizer, ids, positions="all", batch_size=batch_size)
        seen: list[tuple[float, float]] = []

        def kl_at(m: float) -> float:
            with steering_context(model, steering_vector, m):
                val = mean_kl(base, next_token_logprobs(model, tokenizer, ids, positions="all",
                                                        batch_size=batch_size))
            if not math.isfinite(val):
                raise ValueError(f"the KL at multiplier {m:g} is not finite ({val}); cannot calibrate to "
                                 f"`kl_budget`={kl_budget:g}")
            seen.append((m, val))
            ordered = sorted(seen)
            for (m0, k0), (m1, k1) in zip(ordered, ordered[1:]):
                if k1 < k0 - rtol * kl_budget:
                    raise ValueError(f"the KL is not increasing with the multiplier (KL {k0:.4g} nats at x{m0:g}, "
                                     f"{k1:.4g} at x{m1:g}): no single multiplier meets `kl_budget`={kl_budget:g}")
            return val

        lo, hi = 0.0, 1.0
        k_hi = kl_at(hi)
        while k_hi < kl_budget and hi < max_multiplier and len(seen) < max_evals:
            lo, hi = hi, min(2 * hi, max_multiplier)
            k_hi = kl_at(hi)
        if k_hi < kl_budget - rtol * kl_budget:
            raise ValueError(f"`kl_budget`={kl_budget:g} nats is not reached: the KL is {k_hi:.4g} at the largest "
                             f"multiplier tried (x{hi:g}; `max_multiplier`={max_multiplier:g})")
        if abs(k_hi - kl_budget) <= rtol * kl_budget:
            return hi
        while len(seen) < max_evals:
            mid = 0.5 * (lo + hi)
            k = kl_at(mid)
            if abs(k - kl_budget) <= rtol * kl_budget:
                return mid
            lo, hi = (mid, hi) if k < kl_budget else (lo, mid)
        return 0.5 * (lo + hi)
