"""Layer × strength (× norm cap / clamp) sweeps, and :func:`auto_steer`: from a datapoint to steering
that works, chosen by measurement on validation prompts.

::

    result = steering_opt.sweep(model, tok, [dp], layers=[4, 6, 8], multipliers=[0.5, 1, 1.5],
                                scorer="refusal")                 # optimises one vector per layer
    result.best                      # the chosen row (layer, variant, multiplier, metrics)
    result.best_steering()           # that SteeringVector, scaled by the chosen multiplier
    result.plot_heatmap()            # criterion over layer × multiplier
    result.plot_strength()           # success (or any metric) vs multiplier, one line per layer

    vector, report = steering_opt.auto_steer(model, tok, [dp])   # picks everything itself

**Criterion** (``criterion=``):

* ``"margin"`` (the default without a scorer): ``margin_gain − kl_weight · kl`` where ``margin_gain`` is
  how much the steering raises the log-probability (nats) of the promoted completions over the
  suppressed ones on the validation prompts, averaged over prompts and divided by the mean token count
  of the completions (nats per token), and ``kl`` is the mean ``KL(unsteered ‖ steered)`` (nats) on
  neutral prompts; with a ``kl_budget`` (auto_steer), rows whose ``kl`` exceeds it rank below every row
  within it (among themselves: the lower KL first). Needs no generation, so it is cheap.
* ``"fluent_success"`` (the default with a scorer): the fraction of validation prompts whose steered
  generation is a success *and* fluent (distinct-2 ≥ 0.75 and ≥ 95% real words); ties go to the lower KL.
* ``"success"``: the success rate alone (ties: lower KL).
* a callable ``f(row) -> float`` (higher is better) on a table row.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from . import arch, validate
from .contrastive import contrastive_vector
from .data import TrainingDatapoint
from .evaluate import DEFAULT_NEUTRAL_PROMPTS, Evaluator
from .kl import calibrate_strength
from .optimize import optimize
from .options import OptimizeOptions
from .passes import Prompt, check_prompts, looks_like_chat, residual_norms
from .plots import plot_success_vs_strength, plot_sweep_heatmap
from .progress import check_progress, overall
from .scorers import get_scorer
from .vector import SteeringVector

__all__ = [
    "AUTO_STEER_OPTIMIZE_KWARGS",
    "DEFAULT_KL_BUDGET",
    "DEFAULT_KL_WEIGHT",
    "DEFAULT_OPTIMIZE_KWARGS",
    "DEFAULT_REPETITION_CHECK",
    "DEFAULT_SCREEN_STEPS",
    "GENERIC_CHAT_PROMPTS",
    "GENERIC_PROMPTS",
    "SweepResult",
    "auto_steer",
    "residual_norms",
    "split_train_validation",
    "sweep",
]

log = logging.getLogger(__name__)

#: Built-in validation prompts for plain-text datapoints (generic sentence starts).
GENERIC_PROMPTS: tuple[str, ...] = (
    "I want to tell you about", "Here is what happened yesterday:", "The most interesting thing I learned this week is",
    "When I woke up this morning,", "My plans for the weekend are", "There is a small shop near my house that",
    "The first time I travelled alone,", "One of my favourite memories is", "People often ask me why I",
    "This is a story about a young girl who", "The town where I grew up", "If I had a free afternoon, I would",
)

#: Built-in validation prompts for chat datapoints (generic, harmless user requests).
GENERIC_CHAT_PROMPTS: tuple[str, ...] = (
    "Tell me about the moon.", "What are some good hobbies to try?", "Write a haiku about autumn.",
    "How do I bake bread?", "Explain photosynthesis simply.", "Suggest a name for my cat.",
    "How can I improve my sleep?", "What is the capital of France?", "Give me ideas for a picnic.",
    "How does a bicycle work?", "Write a limerick about a frog.", "What should I cook for dinner tonight?",
)

#: Optimiser settings used by sweeps unless overridden (``optimize_kwargs=``): the documented recipe.
DEFAULT_OPTIMIZE_KWARGS: dict[str, Any] = {"lr": 0.1, "max_iters": 30}

#: auto_steer's: 8 L-BFGS iterations per candidate (first step 0.3·√d long), which reach the recipe's loss in
#: about a third of its time (``benchmarks/bench_time_to_vector.py``).
AUTO_STEER_OPTIMIZE_KWARGS: dict[str, Any] = {"optimizer": "lbfgs", "lr": 0.3, "max_iters": 8}

#: Weight of the neutral-prompt KL (nats) against the per-token margin gain (nats) in ``"margin"`` (sweep).
DEFAULT_KL_WEIGHT = 1.0

#: auto_steer's signal: the margin gain among configurations whose neutral-prompt KL is at most this (nats), no
#: penalty within it; chosen on validation prompts among 14 signals (``benchmarks/bench_signal.py``, 8 tasks).
DEFAULT_KL_BUDGET = 3.0

#: auto_steer's last stage without a scorer: the choice generates 32 tokens on this many validation prompts and
#: steps down to x0.75, then x0.5 of its strength while more than a quarter of them repeat themselves.
DEFAULT_REPETITION_CHECK = 6

#: Optimiser steps of auto_steer's screening stage (every candidate layer and norm cap gets this many).
DEFAULT_SCREEN_STEPS = 8


def split_train_validation(items: Sequence[Any], val_fraction: float = 0.5, *, seed: int = 0
                           ) -> tuple[list[Any], list[Any]]:
    """Shuffle ``items`` (seeded) and split them into ``(train, validation)``; both non-empty when
    there are at least two items (``round(val_fraction · n)`` clipped to ``[1, n − 1]`` go to validation)."""
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
    items = list(items)
    if len(items) < 2:
        raise ValueError(f"need at least 2 items to split into train and validation, got {len(items)}")
    order = list(range(len(items)))
    random.Random(validate.seed("seed", seed, allow_none=False)).shuffle(order)
    n_val = min(max(round(val_fraction * len(items)), 1), len(items) - 1)
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def _default_layers(model: nn.Module) -> list[int]:
    """Candidate layers at 15%, 25%, 35% and 45% of the depth (see benchmarks/RESULTS.md for the measurement)."""
    n = arch.num_layers(model)
    return sorted({min(n - 1, max(0, round(f * n))) for f in (0.15, 0.25, 0.35, 0.45)})


# ----------------------------------------------------------------------------------------- result


@dataclasses.dataclass
class SweepResult:
    """A sweep's table and choice.

    Attributes:
        table: one row per (layer, variant, multiplier): ``layer``, ``variant`` (``"additive"``,
            ``"max_norm=…"``, ``"clamp=…"``, ``"contrastive"``), ``multiplier``, ``norm`` (of the
            unscaled vector), ``train_loss`` (nats, optimised vectors), ``build_s`` (seconds to make the
            vector), the validation metrics of :class:`steering_opt.evaluate.EvalResult.summary`, and
            ``criterion`` (the value being maximised).
        best: the chosen row (highest criterion; ties: lower KL, then smaller multiplier).
        criterion: its name.
        vectors: ``{(layer, variant): SteeringVector}`` (unscaled).
        validation_prompts / chat: what was measured.
        notes: anything worth knowing (e.g. the time budget cut the sweep short).
        time_s: wall time of the whole sweep (s).
    """

    table: list[dict[str, Any]]
    best: dict[str, Any] | None
    criterion: str
    vectors: dict[tuple[int, str], SteeringVector]
    validation_prompts: list[Any]
    chat: bool
    notes: list[str] = dataclasses.field(default_factory=list)
    time_s: float = 0.0
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)

    def best_steering(self) -> SteeringVector:
        """The chosen vector scaled by the chosen multiplier (apply it with ``multiplier=1``)."""
        if self.best is None:
            raise ValueError("the sweep measured no configuration")
        vec = self.vectors[(self.best["layer"], self.best["variant"])]
        out = vec * float(self.best["multiplier"])
        out.metadata.update(sweep_choice={k: self.best[k] for k in ("layer", "variant", "multiplier")},
                            criterion=self.criterion, criterion_value=self.best.get("criterion"))
        return out

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame(self.table)

    def to_markdown(self, columns: Sequence[str] | None = None, *, digits: int = 3) -> str:
        """The table as a markdown table (``columns`` default: configuration + main metrics)."""
        cols = list(columns) if columns else [c for c in (
            "layer", "variant", "multiplier", "norm", "success_rate", "fluent_success_rate", "margin_gain",
            "kl", "perplexity", "criterion") if any(c in r for r in self.table)]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.table:
            cells = []
            for c in cols:
                v = r.get(c)
                cells.append(f"{v:.{digits}g}" if isinstance(v, float) else "" if v is None else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot_heatmap(self, metric: str | None = None, **kwargs: Any) -> Any:
        """See :func:`steering_opt.plots.plot_sweep_heatmap`."""
        return plot_sweep_heatmap(self, metric, **kwargs)

    def plot_strength(self, metric: str | None = None, **kwargs: Any) -> Any:
        """See :func:`steering_opt.plots.plot_success_vs_strength`."""
        return plot_success_vs_strength(self, metric, **kwargs)

    def __repr__(self) -> str:
        b = self.best
        choice = "none" if b is None else (f"layer {b['layer']}, {b['variant']}, x{b['multiplier']:g} "
                                           f"({self.criterion}={b.get('criterion', float('nan')):.3g})")
        return f"SweepResult({len(self.table)} rows, best: {choice}, {self.time_s:.0f} s)"


def _criterion_fn(criterion: str | Callable[[dict], float], kl_weight: float,
                  kl_budget: float | None = None) -> Callable[[dict], float]:
    if callable(criterion):
        return criterion

    def kl_of(row: dict) -> float:
        return float(row.get("kl") or 0.0)

    if criterion == "margin":  # over the budget: -inf (ranked by _rank_key's tie-breaks: the lower KL first)
        return lambda r: -math.inf if kl_budget is not None and kl_of(r) > kl_budget else \
            float(r.get("margin_gain_per_token") or 0.0) - kl_weight * kl_of(r)
    if criterion == "fluent_success":
        return lambda r: float(r.get("fluent_success_rate") or 0.0)
    if criterion == "success":
        return lambda r: float(r.get("success_rate") or 0.0)
    raise ValueError(f"`criterion` must be 'margin', 'fluent_success', 'success', 'auto' or a callable, "
                     f"got {criterion!r}")


def _measure(ev: Evaluator, vec: SteeringVector, layer: int, name: str, mults: Sequence[float], extra: dict[str, Any],
             per_token: float, crit_fn: Callable[[dict], float]) -> list[dict[str, Any]]:
    """One table row per multiplier: ``vec`` (the variant ``name`` at ``layer``) measured by ``ev``."""
    rows = []
    for m in mults:
        res = ev.evaluate(vec, m, label=f"{name}@{layer}")
        row: dict[str, Any] = {"layer": layer, "variant": name, "multiplier": float(m),
                               "norm": float(vec.layer_activations[layer].norm()), **extra, **res.summary}
        if row.get("margin_gain") is not None:
            row["margin_gain_per_token"] = row["margin_gain"] / per_token
        row["criterion"] = crit_fn(row)
        rows.append(row)
    return rows


def _rank_key(row: dict) -> tuple:
    crit = row.get("criterion")
    crit = -math.inf if crit is None or (isinstance(crit, float) and math.isnan(crit)) else crit
    return (crit, -float(row.get("kl") or 0.0), -abs(float(row["multiplier"])))


# ------------------------------------------------------------------------------------------ sweep


def _variants(max_norms: Sequence[float | None], clamps: Sequence[float]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for mn in max_norms:
        out.append(("additive", {}) if mn is None else (f"max_norm={mn:g}", {"max_norm": float(mn)}))
    for c in clamps:
        out.append((f"clamp={c:g}", {"vector_clamp": float(c)}))
    return out


def _cap(vec: SteeringVector, opts: dict[str, Any]) -> SteeringVector:
    """Apply a variant's norm cap / clamp to an already-built (e.g. contrastive) vector."""
    acts = dict(vec.layer_activations)
    if "max_norm" in opts:
        acts = {k: v * min(1.0, opts["max_norm"] / max(float(v.norm()), 1e-12)) for k, v in acts.items()}
    return dataclasses.replace(vec, layer_activations=acts, clamp=opts.get("vector_clamp", vec.clamp),
                               metadata=dict(vec.metadata))


def sweep(
    model: nn.Module, tokenizer: Any, train: Sequence[Any], *, layers: Sequence[int] | None = None,
    multipliers: Sequence[float] = (0.5, 1.0, 1.5, 2.0), max_norms: Sequence[float | None] = (None,),
    clamps: Sequence[float] = (), method: str | Callable[..., SteeringVector] = "optimize",
    validation_prompts: Sequence[Prompt] | None = None, val_fraction: float = 0.5, chat: bool | str = "auto",
    scorer: Any = None, criterion: str | Callable[[dict], float] = "auto", kl_weight: float = DEFAULT_KL_WEIGHT,
    promote: Sequence[str] | None = None, suppress: Sequence[str] | None = None,
    neutral_prompts: Sequence[Prompt] | None = DEFAULT_NEUTRAL_PROMPTS, generate: bool | str = "auto",
    max_new_tokens: int = 32, batch_size: int = 16, optimize_kwargs: dict[str, Any] | None = None,
    contrastive_kwargs: dict[str, Any] | None = None, time_budget_s: float | None = None, seed: int = 0,
    progress: bool | None = None,
) -> SweepResult:
    """Build one steering vector per (layer, variant) and measure it at every multiplier on validation
    prompts; return the table, the best row by ``criterion`` and the vectors.

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        train: ``TrainingDatapoint`` list (``method="optimize"``) or contrastive pairs
            (``method="contrastive"``: passed to ``steering_opt.contrastive.contrastive_vector``).
        layers: block indices (default: 15%, 25%, 35%, 45% of the depth).
        multipliers: strengths to try (the vector is scaled by each).
        max_norms: norm caps (``None`` = no cap); each is one variant. Optimised vectors are optimised
            under the cap; contrastive ones are rescaled to it if longer.
        clamps: clamp coefficients; each is one more variant (clamp steering ``h − (h·v̂)v̂ + c·v``).
        method: ``"optimize"``, ``"contrastive"`` or ``f(model, tokenizer, train, layer, **opts) ->
            SteeringVector`` (``opts``: ``max_norm`` / ``vector_clamp`` of the variant).
        validation_prompts: held-out prompts. Default: with ≥ 2 ``TrainingDatapoint``, a seeded split of
            ``train`` (``val_fraction`` of it, whose prompts become the validation prompts); otherwise
            the built-in :data:`GENERIC_PROMPTS` / :data:`GENERIC_CHAT_PROMPTS`.
        chat: whether plain-string validation prompts are chat user messages; ``"auto"``: yes when
            ``train`` holds ``TrainingDatapoint`` whose prompts are chat-template text (any ``method``).
        scorer: success scorer or spec (see :mod:`steering_opt.scorers`).
        criterion / kl_weight: see the module docstring (``"auto"``: ``"fluent_success"`` with a
            scorer, else ``"margin"``).
        promote / suppress: completions for the margin (default: the datapoints' dst / src completions
            when ``train`` holds ``TrainingDatapoint``, with any ``method``).
        neutral_prompts: prompts for the KL measurement.
        generate: generate validation texts (``"auto"``: only with a scorer).
        max_new_tokens, batch_size: generation settings.
        optimize_kwargs: extra :func:`~steering_opt.optimize.optimize` options (default
            :data:`DEFAULT_OPTIMIZE_KWARGS`).
        contrastive_kwargs: extra :func:`~steering_opt.contrastive.contrastive_vector` arguments.
        time_budget_s: soft limit (s): no new (layer, variant) is started once the elapsed time plus
            the measured cost of one more would exceed it; at least one is always measured.
        seed: seeds the split and the optimiser.
        progress: one bar over the (layer, variant) configurations, with an ETA (the optimiser's and the
            evaluator's own bars are folded into it): ``None`` (default) when a person is watching (Jupyter, or
            stderr a terminal; ``STEERING_OPT_PROGRESS=0/1`` overrides), ``True`` / ``False`` always / never.

    Returns:
        A :class:`SweepResult`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("`tokenizer` is required")
    if isinstance(train, (str, TrainingDatapoint)) or not isinstance(train, Sequence) or len(train) == 0:
        raise ValueError("`train` must be a non-empty list (of TrainingDatapoint, or of contrastive pairs)")
    if method == "optimize":
        for i, dp in enumerate(train):
            if not isinstance(dp, TrainingDatapoint):
                raise TypeError(f"`train[{i}]` must be a TrainingDatapoint for method='optimize', "
                                f"got {type(dp).__name__}")
    elif method != "contrastive" and not callable(method):
        raise ValueError(f"`method` must be 'optimize', 'contrastive' or a callable, got {method!r}")
    layer_list = _default_layers(model) if layers is None else [
        arch.resolve_layer(model, x, name="layers") for x in validate.number_list("layers", layers)]
    if len(set(layer_list)) != len(layer_list):
        raise ValueError(f"`layers` contains duplicates: {layers!r}")
    mults = validate.number_list("multipliers", multipliers)
    norms = validate.number_list("max_norms", max_norms, allow_none=True, positive=True)
    clamp_list = validate.number_list("clamps", clamps) if clamps else []
    validate.positive("time_budget_s", time_budget_s)
    validate.positive("kl_weight", kl_weight, allow_none=False, allow_zero=True)
    check_progress(progress)
    validate.seed("seed", seed, allow_none=False)
    scorer_fn = get_scorer(scorer) if scorer is not None else None
    if criterion == "auto":
        criterion = "fluent_success" if scorer_fn is not None else "margin"
    if criterion in ("fluent_success", "success") and scorer_fn is None:
        raise ValueError(f"criterion {criterion!r} needs a `scorer`")
    crit_fn = _criterion_fn(criterion, float(kl_weight))
    do_generate = (scorer_fn is not None) if generate == "auto" else bool(generate)
    opt_kwargs = {**DEFAULT_OPTIMIZE_KWARGS, **(optimize_kwargs or {})}
    opt_kwargs.setdefault("seed", seed)

    train_items = list(train)
    datapoints = all(isinstance(x, TrainingDatapoint) for x in train_items)
    if datapoints:  # any method: the datapoints say what is chat and what to promote / suppress
        if chat == "auto":
            chat = all(looks_like_chat(tokenizer, dp.prompt) for dp in train_items)
        if promote is None:
            promote = list(dict.fromkeys(c for dp in train_items for c in dp.dst_completions))
        if suppress is None:
            suppress = list(dict.fromkeys(c for dp in train_items for c in dp.src_completions))
    elif chat == "auto":
        chat = False
    val_chat = bool(chat)
    if validation_prompts is not None:
        val_prompts = check_prompts(validation_prompts, "validation_prompts")
    elif datapoints and len(train_items) >= 2:
        train_items, held = split_train_validation(train_items, val_fraction, seed=seed)
        val_prompts = [dp.prompt for dp in held]
        val_chat = False  # datapoint prompts are already formatted
    else:
        val_prompts = list(GENERIC_CHAT_PROMPTS if chat else GENERIC_PROMPTS)
    if not (promote or suppress) and criterion == "margin":
        raise ValueError("criterion 'margin' needs `promote` and/or `suppress` completions")

    ev = Evaluator(model, tokenizer, val_prompts, scorer=scorer_fn, promote=promote or None,
                   suppress=suppress or None, neutral_prompts=neutral_prompts, chat=val_chat,
                   generate=do_generate, max_new_tokens=max_new_tokens, batch_size=batch_size)
    comp_tokens = [len(x) for x in ev.promote_ids + ev.suppress_ids]
    mean_comp_tokens = sum(comp_tokens) / len(comp_tokens) if comp_tokens else 1.0

    start = time.perf_counter()
    ev.baseline(layer_list)
    table: list[dict[str, Any]] = []
    vectors: dict[tuple[int, str], SteeringVector] = {}
    notes: list[str] = []
    configs = [(layer, name, opts) for layer in layer_list for name, opts in _variants(norms, clamp_list)]
    cost: float | None = None
    with overall(len(configs), "sweep", progress=progress, unit="config") as bar:
        for k, (layer, name, opts) in enumerate(configs):
            elapsed = time.perf_counter() - start
            if time_budget_s is not None and k > 0 and cost is not None and elapsed + cost > time_budget_s:
                notes.append(f"time budget ({time_budget_s:g} s) reached: measured {k} of {len(configs)} "
                             f"(layer, variant) configurations")
                break
            bar.set_postfix(f"layer {layer}, {name}")
            t0 = time.perf_counter()
            info: dict[str, Any] = {}
            if method == "optimize":
                result = optimize(model, tokenizer, train_items, layer, **{**opt_kwargs, **opts})
                v, info = result.vector, result.info
                vec = SteeringVector.from_optimization(v, info, layer, clamp=opts.get("vector_clamp"),
                                                       metadata={"variant": name})
            elif isinstance(method, str):  # "contrastive" (checked above)
                vec = _cap(contrastive_vector(model, tokenizer, list(train_items), layers=[layer],
                                              **dict(contrastive_kwargs or {})), opts)
            else:
                vec = method(model, tokenizer, train_items, layer, **opts)
                if not isinstance(vec, SteeringVector):
                    raise TypeError(f"`method` must return a SteeringVector, got {type(vec).__name__}")
            build_s = time.perf_counter() - t0
            vectors[(layer, name)] = vec
            loss = info.get("loss") if isinstance(info.get("loss"), float) else None
            table += _measure(ev, vec, layer, name, mults, {"train_loss": loss, "build_s": build_s}, mean_comp_tokens,
                              crit_fn)
            cost = time.perf_counter() - t0 if cost is None else max(cost, time.perf_counter() - t0)
            bar.update(1)
    best = max(table, key=_rank_key) if table else None
    base = ev.baseline()
    baseline: dict[str, float | None] = {"success_rate": None, "fluent_success_rate": None}
    if do_generate and scorer_fn is not None:
        q = base["quality"]
        baseline = {"success_rate": sum(bool(s) for s in q["success"]) / len(q["success"]),
                    "fluent_success_rate": sum(bool(s) for s in q["fluent_success"]) / len(q["fluent_success"])}
    return SweepResult(table=table, best=best, criterion=criterion if isinstance(criterion, str) else "custom",
                       vectors=vectors, validation_prompts=val_prompts, chat=val_chat, notes=notes,
                       time_s=time.perf_counter() - start, baseline=baseline)


# ------------------------------------------------------------------------------------- auto_steer


def auto_steer(
    model: nn.Module, tokenizer: Any, datapoints: Sequence[TrainingDatapoint], *,
    validation_prompts: Sequence[Prompt] | None = None, scorer: Any = None, time_budget_s: float | None = None,
    layers: Sequence[int] | None = None, multipliers: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    norm_fractions: Sequence[float | None] = (None,), kl_weight: float = 0.0,
    kl_budget: float | None = DEFAULT_KL_BUDGET, calibrate_kl: float | None = None,
    repetition_check: int | None = DEFAULT_REPETITION_CHECK,
    neutral_prompts: Sequence[Prompt] | None = DEFAULT_NEUTRAL_PROMPTS, optimize_kwargs: dict[str, Any] | None = None,
    screen_steps: int = DEFAULT_SCREEN_STEPS, finalists: int | None = None, strength_finalists: int | None = 1,
    seed: int = 0, progress: bool | None = None,
) -> tuple[SteeringVector, SweepResult]:
    """From datapoint(s) to a steering vector that works, chosen by measurement on validation prompts.

    Signal (no ``scorer``): the promoted completions' log-prob gain over the suppressed ones on the validation
    prompts (nats per token) minus ``kl_weight`` × the KL (nats) on neutral prompts (unsteered distributions
    computed once), among the configurations whose KL is at most ``kl_budget`` (those above rank last, the lower
    KL first). Stages: (1) each (layer, norm cap) gets ``screen_steps`` optimiser steps (default: all of
    ``optimize_kwargs['max_iters']``, 8 L-BFGS iterations) and is measured at strength 1; (2) with more steps than
    that, the ``finalists`` best by the signal continue to the full step count and are measured at every
    multiplier, else the ``strength_finalists`` best are measured at the other multipliers; (3) with a ``scorer``,
    the 6 best rows by the signal are judged by generating (fluent success rate; ties: the signal); (4) with
    ``calibrate_kl`` and no scorer, a choice whose KL is over it is measured again at the strength where the KL is
    ``calibrate_kl`` (:func:`~steering_opt.kl.calibrate_strength`), and that row is the choice; (5) without a
    scorer, the repetition check (``repetition_check``).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        datapoints: one or more ``TrainingDatapoint`` (prompt, src/dst completions).
        validation_prompts: held-out prompts (default: the built-in generic prompts, chat or plain
            like the datapoints' prompts).
        scorer: optional success scorer or spec (``"refusal"``, ``"language:es"``, ...).
        time_budget_s: soft wall-time budget (s): no configuration is started (screened, finished or judged)
            once the elapsed time plus the mean cost of one would exceed it. ``None``: the full grid.
        layers, multipliers: candidate layers (default: 15%, 25%, 35%, 45% of the depth) and strengths.
        norm_fractions: norm caps as fractions of the median residual-stream norm at each layer (``None``: no cap).
        kl_weight, kl_budget, neutral_prompts: the KL penalty (default 0) and ceiling (nats, default
            :data:`DEFAULT_KL_BUDGET`; None: none), and the prompts it is measured on. Earlier versions ranked by
            ``kl_weight=1.0, kl_budget=None``.
        calibrate_kl: the KL (nats) the chosen strength is lowered to when its KL is larger (None, the default:
            keep the chosen strength; at 2 nats it did not improve held-out fluent success on the benchmark's tasks,
            see ``docs/benchmarks.md``). Needs ``neutral_prompts``; not used with a ``scorer`` (the judged strength
            is kept).
        repetition_check: the signal cannot see repetition, so without a scorer the choice generates 32 tokens on
            this many validation prompts (default :data:`DEFAULT_REPETITION_CHECK`; None or 0: no check); while more
            than a quarter of the continuations repeat themselves (distinct-2 < 0.75, the evaluation's fluency rule,
            whatever the language), it is measured again at x0.75, then x0.5 of its strength; the first that passes
            is the choice (none: the least repetitive). Rows carry ``non_repetitive_rate``.
        optimize_kwargs: :func:`~steering_opt.optimize.optimize` options over :data:`AUTO_STEER_OPTIMIZE_KWARGS`
            (8 L-BFGS iterations; the recipe as before: ``{"optimizer": "adam", "lr": 0.1, "max_iters": 30}``).
        screen_steps, finalists: screening steps; configurations finished (None: all). With at most
            ``screen_steps`` steps in all (the default) there is no finishing stage.
        strength_finalists: without a finishing stage, every configuration is measured at strength 1 and these
            many best by the signal at the other strengths (None: all at every strength), in order of size; a
            strength larger than one already over ``kl_budget`` is not measured (the KL grows with it), nor, ranking
            by the margin within the budget alone (``kl_weight=0``, no ``scorer``), one weaker than x1 when x1 is
            within the budget with a positive margin gain (the margin grows with the strength: at x0.5 it was a
            quarter to two thirds of x1's in all 32 layer grids of the quality benchmark's eight tasks).
        seed: the optimiser's seed.
        progress: one bar over the configurations (screened, finished, judged), with an ETA: ``None`` (default)
            when a person is watching (see :mod:`steering_opt.progress`), ``True`` / ``False``.

    Returns:
        ``(steering, report)``: the chosen :class:`SteeringVector` scaled by its strength (``steering.apply(model)``)
        and the :class:`SweepResult` (``table``: a row per configuration and multiplier, with ``steps`` and
        ``stage``; ``best``, ``notes``, ``report.plot_heatmap()``).
    """
    datapoints = validate.datapoints(datapoints)
    validate.positive("time_budget_s", time_budget_s)
    fracs = validate.number_list("norm_fractions", norm_fractions, allow_none=True, positive=True)
    mults = validate.number_list("multipliers", multipliers)
    validate.integer("screen_steps", screen_steps, 1)
    validate.integer("finalists", finalists, 1, allow_none=True)
    validate.integer("strength_finalists", strength_finalists, 1, allow_none=True)
    validate.positive("kl_weight", kl_weight, allow_none=False, allow_zero=True)
    check_progress(progress)
    validate.seed("seed", seed, allow_none=False)
    scorer_fn = get_scorer(scorer) if scorer is not None else None
    opt_kwargs = {**AUTO_STEER_OPTIMIZE_KWARGS, "seed": seed, **(optimize_kwargs or {})}
    OptimizeOptions.build(None, opt_kwargs)  # a bad option fails here, before any model work
    full = opt_kwargs.get("max_iters")
    screen = screen_steps if full is None else min(screen_steps, full)
    start = time.perf_counter()
    layer_list = _default_layers(model) if layers is None else [
        arch.resolve_layer(model, x, name="layers") for x in validate.number_list("layers", layers)]
    chat = all(looks_like_chat(tokenizer, dp.prompt) for dp in datapoints)
    val: list[Prompt] = check_prompts(validation_prompts, "validation_prompts") \
        if validation_prompts is not None else list(GENERIC_CHAT_PROMPTS if chat else GENERIC_PROMPTS)
    promote = list(dict.fromkeys(c for dp in datapoints for c in dp.dst_completions))
    suppress = list(dict.fromkeys(c for dp in datapoints for c in dp.src_completions))
    ev = Evaluator(model, tokenizer, val, promote=promote or None, suppress=suppress or None,
                   neutral_prompts=neutral_prompts, chat=chat, generate=False)
    comp_tokens = [len(x) for x in ev.promote_ids + ev.suppress_ids]
    per_token = sum(comp_tokens) / len(comp_tokens)
    validate.positive("kl_budget", kl_budget)
    validate.positive("calibrate_kl", calibrate_kl)
    validate.integer("repetition_check", repetition_check, 0, allow_none=True)
    crit_fn = _criterion_fn("margin", float(kl_weight), kl_budget)
    norms_at: dict[int, float] = {}
    if any(f is not None for f in fracs):
        norms_at = residual_norms(model, tokenizer, val[:4], layer_list, chat=chat)
    configs = [(layer, f, None if f is None else f * norms_at[layer]) for layer in layer_list for f in fracs]
    n_final = 0 if full is not None and full <= screen else len(configs) if finalists is None else finalists
    table: list[dict[str, Any]] = []
    vectors: dict[tuple[int, str], SteeringVector] = {}
    notes: list[str] = []
    n_stage2 = 6 if scorer_fn is not None else 0
    screen_budget = None if time_budget_s is None else time_budget_s * (0.6 if scorer_fn is not None else 1.0)
    with overall(len(configs) + n_final + n_stage2, "auto_steer", progress=progress, unit="config") as bar:
        ev.baseline(layer_list)  # also stores the residual stream entering each candidate layer
        runs: dict[tuple[int, str], tuple[Any, float | None]] = {}

        # screening measures at one strength (1, or the middle one) when a finishing or strengths stage follows
        one = [1.0 if 1.0 in mults else sorted(mults)[len(mults) // 2]]
        n_strength = 0 if n_final or strength_finalists is None or strength_finalists >= len(configs) \
            else strength_finalists
        at = mults if n_final == 0 and not n_strength else one

        def build(layer: int, frac: float | None, cap: float | None, stage: str, **kw: Any) -> None:
            name = "additive" if cap is None else f"max_norm={cap:g}"
            bar.set_postfix(f"{stage}: layer {layer}, {name}")
            t0 = time.perf_counter()
            res = optimize(model, tokenizer, list(datapoints), layer, **{**opt_kwargs, **kw,
                                                                          **({} if cap is None else {"max_norm": cap})})
            vec = SteeringVector.from_optimization(res.vector, res.info, layer, metadata={"variant": name})
            vectors[(layer, name)] = vec
            steps = res.iters + (runs[(layer, name)][0].iters if stage == "finish" else 0)
            table[:] = [r for r in table if (r["layer"], r["variant"]) != (layer, name)]
            extra = {"norm_fraction": frac, "train_loss": res.loss, "build_s": time.perf_counter() - t0,
                     "steps": steps, "stage": stage}
            table.extend(_measure(ev, vec, layer, name, mults if stage == "finish" else at, extra, per_token, crit_fn))
            runs[(layer, name)] = (res, cap)
            bar.update(1)

        done = _budgeted(configs, start, screen_budget, notes, "screened",
                         lambda c: build(c[0], c[1], c[2], stage="screen", max_iters=screen))
        ranked = sorted(runs, key=lambda k: max(_rank_key(r) for r in table if (r["layer"], r["variant"]) == k),
                        reverse=True)
        todo = [k for k in ranked[:n_final] if runs[k][0].status == "max_iters"]
        bar.set_total(done + len(todo) + n_stage2)
        _budgeted(todo, start, screen_budget, notes, "finished",
                  lambda k: build(k[0], next(r["norm_fraction"] for r in table if (r["layer"], r["variant"]) == k),
                                  runs[k][1], stage="finish", starting_vec=runs[k][0].vector,
                                  max_iters=None if full is None else full - screen, seed=(seed + 1) % 2**63))
        if n_strength:  # the best configurations at strength 1, measured at the other strengths
            for k in ranked[:n_strength]:
                bar.set_postfix(f"strengths: layer {k[0]}, {k[1]}")
                first = next(r for r in table if (r["layer"], r["variant"]) == k)
                extra = {key: first[key] for key in ("norm_fraction", "train_loss", "build_s", "steps", "stage")}
                m1, over_1 = first["multiplier"], kl_budget is not None and (first["kl"] or 0) > kl_budget
                over, weaker = [abs(m1)] if over_1 else [], f"x{m1:g} is within kl_budget; weaker: a smaller margin"
                # ranked by the margin alone within the budget, a weaker strength cannot win (see the docstring)
                weaker_loses = kl_budget is not None and not over_1 and not kl_weight and scorer_fn is None \
                    and (first.get("margin_gain") or 0) > 0
                for m in sorted((m for m in mults if m not in one), key=abs):
                    why = f"x{min(over):g} is over kl_budget" if over and abs(m) > min(over) else \
                        weaker if weaker_loses and 0 < m / m1 < 1 else ""
                    if why:  # the KL grows with the strength; below x1 so does the margin
                        notes.append(f"layer {k[0]}, {k[1]}: x{m:g} not measured ({why})")
                        continue
                    table.extend(_measure(ev, vectors[k], k[0], k[1], [m], extra, per_token, crit_fn))
                    if kl_budget is not None and (table[-1]["kl"] or 0) > kl_budget:
                        over.append(abs(m))
        criterion = "margin"
        best = max(table, key=_rank_key)
        if scorer_fn is not None:
            criterion, best = "fluent_success", _judge(model, tokenizer, val, chat, scorer_fn, table, vectors, bar,
                                                       start, time_budget_s, notes)
        elif calibrate_kl is not None and neutral_prompts is not None and best["multiplier"] > 0 \
                and (best["kl"] or 0) > calibrate_kl:
            bar.set_postfix(f"calibrating: layer {best['layer']}, {best['variant']}")
            key, was = (best["layer"], best["variant"]), f"x{best['multiplier']:g} (KL {best['kl']:.2f})"
            try:
                m = calibrate_strength(model, tokenizer, vectors[key], calibrate_kl, neutral_prompts, chat=chat)
            except ValueError as e:  # e.g. the KL is not monotonic in the strength: keep the choice
                notes.append(f"calibrate_kl: the strength of {was} is kept ({e})")
            else:
                extra = {k: best[k] for k in ("norm_fraction", "train_loss", "build_s", "steps")}
                table.extend(_measure(ev, vectors[key], key[0], key[1], [m], {**extra, "stage": "calibrate"},
                                      per_token, crit_fn))
                best = table[-1]
                notes.append(f"calibrate_kl: {was} lowered to x{m:.3g} (KL {best['kl']:.2f})")
        if scorer_fn is None and repetition_check:
            best = _repetition_check(Evaluator(model, tokenizer, val[:repetition_check], neutral_prompts=None,
                                               chat=chat, max_new_tokens=32, fluency_lang=None), best, table,
                                     vectors, notes, bar, lambda key, m, extra: _measure(
                                         ev, vectors[key], key[0], key[1], [m], extra, per_token, crit_fn)[0])
    report = SweepResult(table=table, best=best, criterion=criterion, vectors=vectors, validation_prompts=val,
                         chat=chat, notes=notes, time_s=time.perf_counter() - start)
    steering = report.best_steering()
    steering.metadata["method"] = "auto_steer"
    return steering, report


def _repetition_check(gen: Evaluator, best: dict[str, Any], table: list[dict], vectors: dict[tuple[int, str], Any],
                      notes: list[str], bar: Any, measure: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """auto_steer's repetition check (see its ``repetition_check``): ``best`` generated by ``gen`` at x1, x0.75,
    x0.5 of its strength until at most a quarter of the continuations repeat themselves; returns the chosen row."""
    key, m0, tried = (best["layer"], best["variant"]), best["multiplier"], []
    for f in (1.0, 0.75, 0.5):
        bar.set_postfix(f"repetition check: layer {key[0]}, {key[1]} x{m0 * f:g}")
        row = best if f == 1.0 else measure(key, m0 * f, {**{k: best[k] for k in (
            "norm_fraction", "train_loss", "build_s", "steps")}, "stage": "repetition check"})
        row["non_repetitive_rate"] = gen.evaluate(vectors[key], m0 * f).summary["fluent_rate"]
        if f != 1.0:
            table.append(row)
        tried.append(row)
        if row["non_repetitive_rate"] >= 0.75:
            break
    chosen = next((r for r in tried if r["non_repetitive_rate"] >= 0.75),
                  max(tried, key=lambda r: r["non_repetitive_rate"]))
    if chosen is not best:
        notes.append(f"repetition check: x{m0:g} repeats itself on {1 - best['non_repetitive_rate']:.0%} of "
                     f"{len(gen.prompts)} validation prompts; x{chosen['multiplier']:g} on "
                     f"{1 - chosen['non_repetitive_rate']:.0%}")
    return chosen


def _budgeted(items: Sequence[Any], start: float, budget: float | None, notes: list[str], what: str,
              fn: Callable[[Any], None]) -> int:
    """Call ``fn`` on each item while the budget allows one more (at the mean cost so far; the first always
    runs); returns how many ran."""
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        if budget is not None and i > 0:
            now = time.perf_counter()
            if now - start + (now - t0) / i > budget:
                notes.append(f"time budget: {what} {i} of {len(items)} configurations")
                return i
        fn(item)
    return len(items)


def _judge(model: nn.Module, tokenizer: Any, val: list[Prompt], chat: bool, scorer_fn: Any, table: list[dict],
           vectors: dict[tuple[int, str], SteeringVector], bar: Any, start: float, time_budget_s: float | None,
           notes: list[str]) -> dict[str, Any]:
    """auto_steer's last stage: generate on the validation prompts for the 6 best rows by the signal; the best
    row by fluent success rate (ties: the signal)."""
    ev = Evaluator(model, tokenizer, val, scorer=scorer_fn, neutral_prompts=None, chat=chat, generate=True,
                   max_new_tokens=32)
    ev.baseline()
    ranked = sorted(table, key=_rank_key, reverse=True)[:6]
    bar.set_total(bar.n + len(ranked))

    def judge(row: dict[str, Any]) -> None:
        r = ev.evaluate(vectors[(row["layer"], row["variant"])], row["multiplier"])
        for key in ("success_rate", "fluent_success_rate", "distinct2", "perplexity"):
            row[key] = r.summary[key]
        row["signal"] = row["criterion"]
        bar.update(1)

    _budgeted(ranked, start, time_budget_s, notes, "judged by generation", judge)
    for row in table:
        row.setdefault("signal", row["criterion"])
        row["criterion"] = row.get("fluent_success_rate")
    return max((r for r in table if r.get("fluent_success_rate") is not None),
               key=lambda r: (r["fluent_success_rate"], r["signal"]))


__import__("steering_opt.util").util.make_module_callable(__name__)  # calling the module calls sweep()
