"""Many independent optimisations in one batched pass: :func:`optimize_many`.

Each :class:`Job` is one :func:`~steering_opt.optimize.optimize` call (its own datapoints, layer and
options). Jobs that steer the same layers with the same objective settings (``coldness``,
``do_one_minus``, ``normalize_token_length``) share every forward/backward pass: each batch row is
steered by its own job's parameters (additive, clamp, affine or a user parameterisation), each job
keeps its own Adam state and stops on its own (``max_iters``, ``target_loss``, convergence); a stopped
job leaves the batch. The results equal separate runs up to float32 rounding of a differently shaped
batch. Data parallelism over processes is in :mod:`steering_opt.parallel`. Losses are in nats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from . import arch, validate
from .data import TokenizedCompletion, TrainingDatapoint, tokenize_datapoints
from .engine import FastEngine, Objective
from .hooks import frozen_model
from .loop import JobState, OptimizeResult, run_jobs
from .optimize import initial_steering, make_generator, provenance, regularizer
from .options import OptimizeOptions
from .progress import check_progress, overall

__all__ = ["Job", "optimize_many"]

#: Options a batched job cannot have (they need a run of their own: use ``optimize``).
UNSUPPORTED = ("do_output_constr", "output_constr_lr", "max_output_constr_iters", "output_constr_damping",
               "output_constr_patience", "output_constr_norm_initial_scale", "engine", "max_batch_tokens",
               "progress", "return_on_interrupt")
JOB_OPTIONS = tuple(n for n in OptimizeOptions.field_names() if n not in UNSUPPORTED)


class _JobMethods:
    """Methods of :class:`Job` (whose fields are generated from :class:`OptimizeOptions`)."""

    datapoints: Sequence[TrainingDatapoint]
    layer: int | Sequence[int]
    name: str | None

    def options(self, where: str = "") -> OptimizeOptions:
        """The job's checked :class:`OptimizeOptions` (``where`` prefixes error messages)."""
        return OptimizeOptions.build(None, {n: getattr(self, n) for n in JOB_OPTIONS}, where=where)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the equivalent ``optimize`` / ``optimize_vector`` call: every option
        whose value differs from its default."""
        out = {}
        for f in dataclasses.fields(OptimizeOptions):
            if f.name in JOB_OPTIONS:
                val = getattr(self, f.name)
                if not (val is f.default or (type(val) is type(f.default) and val == f.default)):
                    out[f.name] = val
        return out


if TYPE_CHECKING:
    class Job(_JobMethods):
        """See below: a dataclass whose fields are generated from :class:`OptimizeOptions`."""

        def __init__(self, datapoints: Sequence[TrainingDatapoint], layer: int | Sequence[int],
                     **options: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...
else:
    #: One independent optimisation for :func:`optimize_many`: what one ``optimize`` call would do.
    #: ``Job(datapoints, layer, lr=..., max_iters=..., vector_clamp=..., parameterization=..., name=...)``: every
    #: :class:`~steering_opt.options.OptimizeOptions` field except the output-constrained phase and the
    #: execution settings (``engine``, ``max_batch_tokens``, ``progress``: arguments of optimize_many), with
    #: the same default and meaning, checked when :func:`optimize_many` runs (errors name ``jobs[i]``).
    #: ``info['job']`` is ``name``, or the job's index in ``jobs`` when it has none.
    Job = dataclasses.make_dataclass(
        "Job",
        [("datapoints", "Sequence[TrainingDatapoint]"), ("layer", "int | Sequence[int]")]
        + [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
           for f in dataclasses.fields(OptimizeOptions) if f.name in JOB_OPTIONS]
        + [("name", "str | None", dataclasses.field(default=None))],
        bases=(_JobMethods,))
    Job.__module__ = __name__
    Job.__doc__ = """One independent optimisation for :func:`optimize_many` (see the module docstring): the
    datapoints, the layer(s) and every :class:`~steering_opt.options.OptimizeOptions` field except the
    output-constrained phase and the execution settings; ``info['job']`` is ``name`` (or the job's index)."""


def _checked(model: nn.Module, i: int, job: Any, d: int) -> tuple[OptimizeOptions, list[int], list[TrainingDatapoint]]:
    if not isinstance(job, Job):
        raise TypeError(f"`jobs[{i}]` must be a steering_opt.scale.Job, got {type(job).__name__}")
    where = f"jobs[{i}]: "
    opts = job.options(where)
    try:
        dps = validate.datapoints(job.datapoints)
        layers = validate.layers(model, job.layer, "layer")
        opts.check(d)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}{e}") from None
    return opts, layers, dps


def optimize_many(
    model: nn.Module,
    tokenizer: Any = None,
    jobs: Sequence[Job] | None = None,
    /,
    *,
    max_batch_tokens: int = 16384,
    progress: bool | None = None,
    **keywords: Any,
) -> list[OptimizeResult]:
    """Run many independent steering optimisations, batching the ones that can share a pass.

    ``optimize_many(model, tokenizer, jobs)``; the earlier form ``optimize_many(model, jobs, tokenizer=tokenizer)``
    (and keywords ``tokenizer=`` / ``jobs=``) also work.

    Speed: the batch does the same arithmetic as the separate runs (batching saves per-pass overhead:
    kernel launches, Python, small-matrix inefficiency, lower-layer caching per call). On a GPU, where
    one small job leaves the device mostly idle, that is most of the time; on a CPU whose cores are
    already saturated by one job the gain is small (see ``benchmarks/bench_scale.py``).

    Args:
        model: a HF causal LM (left exactly as found: weights, hooks, ``requires_grad``, train/eval).
        tokenizer: the model's tokenizer (required).
        jobs: the jobs; see :class:`Job`. All are checked before any model work.
        max_batch_tokens: token budget (rows × padded length) of one forward/backward chunk.
        progress: one bar over the loss evaluations (steps + 1) of all jobs, with an ETA: ``None`` (default)
            when a person is watching (Jupyter, or stderr a terminal; ``STEERING_OPT_PROGRESS=0/1`` overrides),
            ``True`` / ``False`` always / never. See :mod:`steering_opt.progress`.

    Returns:
        One :class:`~steering_opt.loop.OptimizeResult` per job, in job order. Each unpacks like
        ``optimize_vector``'s tuple: ``vector, info = result`` (``vector, matrix, info`` for affine
        jobs); ``info['job']`` is the job's ``name``, or its index in ``jobs`` when it has none.

    Raises:
        TypeError / ValueError: a malformed job (the message names ``jobs[i]`` and the field).
    """
    unknown = sorted(set(keywords) - {"tokenizer", "jobs"})
    if unknown:
        raise TypeError(f"optimize_many() got an unexpected keyword argument {unknown[0]!r}")
    if "jobs" in keywords and jobs is not None:
        raise TypeError("optimize_many() got `jobs` twice (by position and by keyword)")
    given: Any = keywords.get("jobs", jobs)
    if given is None and isinstance(tokenizer, (Job, list, tuple)):  # optimize_many(model, jobs, tokenizer=tok)
        given, tokenizer = tokenizer, None
        if "tokenizer" not in keywords:
            raise ValueError("`tokenizer` is required: optimize_many(model, tokenizer, jobs)")
    if "tokenizer" in keywords:
        if tokenizer is not None:
            raise TypeError("optimize_many() got `tokenizer` twice (by position and by keyword)")
        tokenizer = keywords["tokenizer"]
    validate.model(model)
    if isinstance(given, Job) or not isinstance(given, (list, tuple)) or len(given) == 0:
        raise ValueError(f"`jobs` must be a non-empty list of steering_opt.scale.Job, got {given!r:.80}")
    jobs = list(given)
    validate.tokenizer(tokenizer)
    check_progress(progress)
    validate.integer("max_batch_tokens", max_batch_tokens, 1)
    d = arch.hidden_size(model)
    checked = [_checked(model, i, job, d) for i, job in enumerate(jobs)]
    max_length = arch.context_length(model)
    job_seqs = []
    for i, (opts, _, dps) in enumerate(checked):
        try:
            job_seqs.append(tokenize_datapoints(
                tokenizer, dps, only_hook_prompt=opts.only_hook_prompt,
                target_loss=None if opts.do_target_loss_sum else opts.target_loss, max_length=max_length))
        except ValueError as e:
            raise ValueError(f"jobs[{i}]: {e}") from None

    groups: dict[tuple, list[int]] = {}
    for i, (opts, layers, _) in enumerate(checked):
        key = (tuple(sorted(layers)), float(opts.coldness), opts.do_one_minus, opts.normalize_token_length)
        groups.setdefault(key, []).append(i)

    results: list[OptimizeResult | None] = [None] * len(jobs)
    evals = sum(max(checked[i][0].step_cap for i in members) + 1 for members in groups.values())  # steps + 1
    with frozen_model(model), overall(evals, "optimize_many", progress=progress, unit="eval") as bar:
        states: list[JobState] = []
        kl_terms: dict[int, Any] = {}  # job -> its KL fluency term (kl_weight > 0)
        for i, (opts, layers, dps) in enumerate(checked):  # in job order: seed=None draws from torch's RNG
            gen = make_generator(opts.seed)
            steering = initial_steering(model, sorted(layers), opts, gen)
            reg_fn = regularizer(opts)
            if opts.kl_weight:  # --- KL fluency term (steering_opt.kl): one term per job, run beside the batch
                from .kl import KLTerm, with_kl

                kl_terms[i] = KLTerm.build(model, tokenizer, sorted(layers), opts)
                reg_fn = with_kl(reg_fn, kl_terms[i])
            states.append(JobState(steering, job_seqs[i], len(dps), opts, gen, reg_fn=reg_fn,
                                   name=jobs[i].name))
        for key, members in groups.items():
            group = [states[i] for i in members]
            seqs: list[TokenizedCompletion] = []
            dp_offset = 0
            for st in group:  # renumber datapoints so that no two jobs share a packed row
                st.start = len(seqs)
                seqs += [dataclasses.replace(s, datapoint=s.datapoint + dp_offset) for s in st.seqs]
                dp_offset += st.n_dp
            objective = Objective(coldness=key[1], do_one_minus=key[2], normalize_token_length=key[3])
            eng = FastEngine(model, seqs, list(key[0]), objective, max_batch_tokens=max_batch_tokens)
            planned = bar.n + max(st.options.step_cap for st in group) + 1
            run_jobs(eng, group, desc=f"optimize_many L{list(key[0])}")  # reports to the overall bar
            bar.update(max(0, planned - bar.n))  # jobs that stopped early
            for i in members:
                result = states[i].result(None if jobs[i].name is not None else {"job": i})
                result.provenance = provenance(model, checked[i][2])
                if i in kl_terms:  # KL fluency term: info['kl'], info['kl_history']
                    result.extra.update(kl_terms[i].report(result.steering))
                results[i] = result
                states[i].opt = None  # free the optimiser state early
    return [r for r in results if r is not None]
