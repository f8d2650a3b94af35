"""Scale: many independent vectors in one pass, and data-parallel optimisation over processes.

Two levers, both *exact* (the same vectors as running the work one job / one process at a time, up to
float32 rounding of a differently shaped batch):

* :func:`optimize_many` runs many independent :class:`Job` s (each its own datapoints, layer and
  options, the keyword arguments of :func:`~steering_opt.optimize_vector`) together. Jobs that steer
  the same layers with the same objective settings (``coldness``, ``do_one_minus``,
  ``normalize_token_length``) share every forward/backward pass: each batch row is steered by its own
  job's vector (plus, per row, its clamp coefficient or affine factors), each job keeps its own Adam
  state, and each stops on its own (``max_iters``, ``target_loss``, convergence). A stopped job leaves
  the batch.
* Data parallelism for :func:`~steering_opt.optimize_vector_minibatch_hf` through
  ``torch.distributed`` (``distributed=None`` = automatic when a process group of several processes
  is initialised, or when a launcher such as ``accelerate launch`` / ``torchrun`` set its environment
  variables): each process computes the losses of a shard of the current minibatch's prompts, the
  steering-parameter gradients and the losses are summed over processes (all-reduce), and every
  process takes the same Adam step, so all of them end with the same vector
  (:class:`DataParallelEngine`).

Losses are in nats.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import arch
from .data import TokenizedCompletion as Seq
from .data import TrainingDatapoint, tokenize_datapoints
from .engine import Engine, FastEngine, Objective, SpecFn, SteerSpec
from .hooks import frozen_model
from .optimize import (
    DEFAULT_MAX_ITERS,
    _base_info,
    _check_datapoints,
    _check_layers,
    _check_lr,
    _check_positive,
    _context_length,
    _init_vector,
    _LoopResult,
    _Params,
    _project,
    _show_progress,
)

log = logging.getLogger(__name__)

__all__ = ["DataParallelEngine", "Job", "RowSteerSpec", "init_distributed", "optimize_many",
           "resolve_distributed"]


# --------------------------------------------------------------------------------- many jobs


@dataclasses.dataclass
class Job:
    """One independent optimisation for :func:`optimize_many`: what one
    :func:`~steering_opt.optimize_vector` call would do.

    ``datapoints`` and ``layer`` are optimize_vector's positional arguments; every other field is the
    optimize_vector keyword argument of the same name, with the same default and meaning (lr: Adam
    learning rate; max_iters: exact number of optimiser steps, ``None`` = until target/convergence
    capped at ``DEFAULT_MAX_ITERS``; target_loss in nats; max_norm caps ``‖v‖``; vector_clamp,
    affine_rank/max_affine_norm/starting_affine_norm choose clamp or affine steering; noise_scale adds
    Gaussian noise per evaluation; seed fixes the initial vector and the noise). ``name`` is an
    optional label copied to ``info['job']``.

    Not supported here (use optimize_vector): the output-constrained phase and ``engine="reference"``.
    """

    datapoints: Sequence[TrainingDatapoint]
    layer: int | Sequence[int]
    lr: float = 0.01
    max_iters: int | None = None
    eps: float = 1e-6
    coldness: float = 0.7
    normalize_token_length: bool = False
    only_hook_prompt: bool = False
    target_loss: float | None = None
    do_target_loss_sum: bool = True
    target_loss_target_iters: int = 1
    do_one_minus: bool = True
    max_norm: float | None = None
    starting_norm: float = 1.0
    starting_vec: torch.Tensor | None = None
    vector_clamp: float | None = None
    affine_rank: int | None = None
    max_affine_norm: float | None = 2.0
    starting_affine_norm: float = 1.0
    noise_scale: float | None = None
    do_tangent_space_noise: bool = True
    seed: int | None = None
    name: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the equivalent :func:`~steering_opt.optimize_vector` call
        (everything but ``datapoints``, ``layer`` and ``name``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("datapoints", "layer", "name"):
            out.pop(k)
        return out


@dataclasses.dataclass
class RowSteerSpec(SteerSpec):
    """A :class:`~steering_opt.engine.SteerSpec` whose clamp and affine settings are per row too.

    Attributes:
        row_clamp: ``(n_rows,)`` float clamp coefficient per row, NaN for additive rows; None = none.
        row_left, row_right: ``(n_rows, r, d)`` affine factors per row (zeros for rows without an
            affine map, zero-padded to the largest rank); None = no affine row.

    Row ``b`` is steered exactly as :func:`~steering_opt.hooks.steer` steers it with that row's
    settings: additive ``h + v``, clamp ``h - (h·v̂)v̂ + c v``, affine ``h + v + (h Rᵀ) L``.
    """

    row_clamp: torch.Tensor | None = None
    row_left: torch.Tensor | None = None
    row_right: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> RowSteerSpec:
        """The spec for rows ``index`` ``(B,)``: every per-row field is indexed."""

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index.to(t.device)]

        return dataclasses.replace(self, rows={k: v[index.to(v.device)] for k, v in self.rows.items()},
                                   row_clamp=take(self.row_clamp), row_left=take(self.row_left),
                                   row_right=take(self.row_right))

    def apply(self, h: torch.Tensor, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Steer ``h`` ``(B, T, d)`` entering block ``layer``, row ``b`` with row ``b``'s settings."""
        rows = self.rows.get(layer)
        if rows is None:
            return h
        v = rows.to(device=h.device, dtype=h.dtype)[:, None, :]  # (B, 1, d)
        delta = v.expand_as(h)
        if self.row_clamp is not None:
            c = self.row_clamp.to(device=h.device, dtype=h.dtype)
            is_c = ~torch.isnan(c)
            if bool(is_c.any()):
                norm = v.norm(dim=-1, keepdim=True)  # (B, 1, 1)
                if bool((norm[is_c] == 0).any()):
                    raise ValueError("clamp steering needs a non-zero vector (got a vector of norm 0)")
                sel = is_c[:, None, None]
                vhat = v / torch.where(sel, norm, torch.ones_like(norm))  # no 0/0 on additive rows
                clamped = -(h * vhat).sum(-1, keepdim=True) * vhat + torch.nan_to_num(c)[:, None, None] * v
                delta = torch.where(sel, clamped, delta)
        if self.row_left is not None and self.row_right is not None:
            left, right = self.row_left.to(h), self.row_right.to(h)
            delta = delta + torch.bmm(torch.bmm(h, right.transpose(1, 2)), left)
        if mask is not None:
            delta = delta * mask.to(device=h.device, dtype=h.dtype)[..., None]
        return h + delta


def _check_job(model: nn.Module, i: int, job: Any, d: int) -> list[int]:
    """Validate ``jobs[i]`` like optimize_vector validates its arguments; returns its layers."""
    if not isinstance(job, Job):
        raise TypeError(f"`jobs[{i}]` must be a steering_opt.scale.Job, got {type(job).__name__}")
    try:
        _check_datapoints(job.datapoints)
        layers = _check_layers(model, job.layer, "layer")
        _check_lr("lr", job.lr)
        _check_positive("coldness", job.coldness, allow_none=False)
        _check_positive("max_norm", job.max_norm)
        _check_positive("starting_norm", job.starting_norm, allow_none=False)
        _check_positive("starting_affine_norm", job.starting_affine_norm, allow_none=False)
        _check_positive("max_affine_norm", job.max_affine_norm)
        _check_positive("noise_scale", job.noise_scale, allow_zero=True)
        _check_positive("eps", job.eps, allow_none=False, allow_zero=True)
        mi = job.max_iters
        if mi is not None and (isinstance(mi, bool) or not isinstance(mi, int) or mi < 0):
            raise ValueError(f"`max_iters` must be a non-negative int or None, got {mi!r}")
        tti = job.target_loss_target_iters
        if isinstance(tti, bool) or not isinstance(tti, int) or tti < 1:
            raise ValueError(f"`target_loss_target_iters` must be an int >= 1, got {tti!r}")
        tl = job.target_loss
        if tl is not None and (isinstance(tl, bool) or not isinstance(tl, (int, float)) or math.isnan(tl)):
            raise ValueError(f"`target_loss` must be a number or None, got {tl!r}")
        vc = job.vector_clamp
        if vc is not None and (isinstance(vc, bool) or not isinstance(vc, (int, float)) or not math.isfinite(vc)):
            raise ValueError(f"`vector_clamp` must be a finite number, got {vc!r}")
        ar = job.affine_rank
        if ar is not None:
            if isinstance(ar, bool) or not isinstance(ar, int) or not 1 <= ar <= d:
                raise ValueError(f"`affine_rank` must be an int in [1, {d}] (the hidden size), got {ar!r}")
            if vc is not None:
                raise ValueError("`vector_clamp` and `affine_rank` cannot be combined")
        sv = job.starting_vec
        if sv is not None:
            if not isinstance(sv, torch.Tensor):
                raise TypeError(f"`starting_vec` must be a torch.Tensor, got {type(sv).__name__}")
            if tuple(sv.shape) != (d,):
                raise ValueError(f"`starting_vec` must have shape ({d},) (the model's hidden size), "
                                 f"got {tuple(sv.shape)}")
            if not bool(torch.isfinite(sv).all()):
                raise ValueError("`starting_vec` contains NaN or infinite values")
            if vc is not None and float(sv.norm()) == 0:
                raise ValueError("`vector_clamp` needs a non-zero `starting_vec` (got a zero vector)")
        if job.seed is not None and (isinstance(job.seed, bool) or not isinstance(job.seed, int)):
            raise TypeError(f"`seed` must be an int or None, got {job.seed!r}")
        for flag in ("normalize_token_length", "only_hook_prompt", "do_target_loss_sum", "do_one_minus",
                     "do_tangent_space_noise"):
            if not isinstance(getattr(job, flag), bool):
                raise TypeError(f"`{flag}` must be a bool, got {getattr(job, flag)!r}")
    except (TypeError, ValueError) as e:
        raise type(e)(f"jobs[{i}]: {e}") from None
    return layers


class _JobState:
    """One job's parameters, optimiser and stopping state (mirrors ``optimize._run_loop``)."""

    def __init__(self, index: int, job: Job, layers: list[int], seqs: list[Seq], d: int, device: torch.device):
        self.index, self.job, self.layers, self.seqs = index, job, layers, seqs
        self.n_dp = len(job.datapoints)
        seed = job.seed if job.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        self.gen = torch.Generator().manual_seed(seed)
        # the same draws, in the same order, as optimize_vector
        self.vec = _init_vector(d, job.starting_norm, job.starting_vec, self.gen, device)
        left = right = None
        if job.affine_rank is not None:
            left = torch.randn(job.affine_rank, d, generator=self.gen)
            right = torch.randn(job.affine_rank, d, generator=self.gen)
            left = (left * (job.starting_affine_norm / left.norm(dim=1, keepdim=True))).to(device).requires_grad_(True)
            right = (right * (job.starting_affine_norm / right.norm(dim=1, keepdim=True))
                     ).to(device).requires_grad_(True)
        self.params = _Params(vectors={x: self.vec for x in layers}, left=left, right=right, clamp=job.vector_clamp)
        self.cap = job.max_iters if job.max_iters is not None else DEFAULT_MAX_ITERS
        self.targets = torch.tensor([s.target if s.target is not None else math.inf for s in seqs])
        self.owner = torch.tensor([s.datapoint for s in seqs])
        self.tangent: torch.Tensor | None = None  # (n_dp, d) unsteered-loss gradients for tangent noise
        self.start = 0  # offset of this job's sequences in the group's engine
        self.history: list[float] = []
        self.hits, self.steps, self.prev = 0, 0, None
        self.status = "max_iters"
        self.losses = torch.full((len(seqs),), math.nan)  # no finite evaluation yet: never report a made-up loss
        self.done = False
        self.final_eval = False
        self.opt: torch.optim.Optimizer | None = None
        self.last_good: list[torch.Tensor] = []

    def begin(self) -> None:
        _project(self.params, self.job.max_norm, self.job.max_affine_norm)
        self.opt = torch.optim.Adam(self.params.tensors(), lr=self.job.lr)
        self.last_good = self.params.snapshot()

    def noise(self, d: int) -> torch.Tensor:
        """Per-sequence noise rows ``(n_seqs, d)`` for one evaluation (as ``_tangent_noise_fn``)."""
        n = torch.randn(self.n_dp, d, generator=self.gen) * self.job.noise_scale
        g = self.tangent
        if g is not None:
            g2 = (g * g).sum(-1, keepdim=True)
            coef = torch.where(g2 > 0, (n * g).sum(-1, keepdim=True) / g2.clamp_min(1e-30), torch.zeros_like(g2))
            n = n - coef * g
        return n[self.owner]

    def after_eval(self, sub: torch.Tensor) -> None:
        """Stop checks and the optimiser step after an evaluation with losses ``sub`` ``(n_seqs,)``."""
        job = self.job
        total = float(sub.sum())
        if not math.isfinite(total) or not self.params.finite():
            self.params.restore(self.last_good)
            self.status, self.done = "nonfinite", True
            log.warning("job %d: non-finite loss or parameters at step %d; restored the last finite parameters",
                        self.index, self.steps)
            return
        self.losses = sub
        self.last_good = self.params.snapshot()
        self.history.append(total)
        if job.target_loss is not None or bool((self.targets < math.inf).any()):
            if job.do_target_loss_sum:
                hit = job.target_loss is not None and total <= job.target_loss
            else:
                hit = bool((sub <= self.targets).all())
            self.hits = self.hits + 1 if hit else 0
            if self.hits >= job.target_loss_target_iters:
                self.status, self.done = "target_reached", True
                return
        if self.final_eval:
            self.status, self.done = "max_iters", True
            return
        if job.max_iters is None and job.target_loss is None and self.prev is not None \
                and abs(self.prev - total) < job.eps:
            self.status, self.done = "converged", True
            return
        self.prev = total
        assert self.opt is not None
        self.opt.step()
        _project(self.params, job.max_norm, job.max_affine_norm)
        self.steps += 1

    def result(self) -> tuple:
        res = _LoopResult(steps=self.steps, losses=self.losses, history=self.history, status=self.status)
        info = _base_info(self.seqs, self.n_dp, res, self.job.do_target_loss_sum)
        info["norm"] = float(self.vec.detach().norm())
        if self.job.name is not None:
            info["job"] = self.job.name
        out_vec = self.vec.detach()
        if self.job.affine_rank is not None:
            info["affine_factors"] = (self.params.left.detach(), self.params.right.detach())
            return out_vec, self.params.matrix(), info
        return out_vec, info


def optimize_many(
    model: nn.Module,
    jobs: Sequence[Job],
    *,
    tokenizer: Any = None,
    max_batch_tokens: int = 16384,
    progress: bool | None = None,
) -> list[tuple]:
    """Run many independent steering optimisations, batching the ones that can share a pass.

    Each :class:`Job` is one :func:`~steering_opt.optimize_vector` call; the results are those calls'
    results (vectors to ~1e-5, the same number of steps, the same stop decisions), computed together:
    jobs with the same steered layers and objective settings (``coldness``, ``do_one_minus``,
    ``normalize_token_length``) form a group whose completions run in one batched forward/backward per
    step (chunked by ``max_batch_tokens``), each row steered by its own job's vector, clamp coefficient
    or affine factors. Every job has its own Adam state and stops on its own; a stopped job leaves the
    batch. Groups run one after the other. All arguments are validated before any model work.

    Speed: the batch does the same arithmetic as the separate runs (batching saves per-pass overhead:
    kernel launches, Python, small-matrix inefficiency, lower-layer caching per call). On a GPU, where
    one small job leaves the device mostly idle, that is most of the time; on a CPU whose core is
    already saturated by one job the gain is small (see ``benchmarks/bench_scale.py``).

    Args:
        model: a HF causal LM (left exactly as found: weights, hooks, ``requires_grad``, train/eval).
        jobs: the jobs; see :class:`Job`.
        tokenizer: the model's tokenizer (required).
        max_batch_tokens: token budget (rows × padded length) of one forward/backward chunk.
        progress: tqdm bar per group (default: on in Jupyter, off elsewhere).

    Returns:
        One result per job, in job order, shaped like optimize_vector's: ``(vector (d,), info)``, or
        ``(vector, matrix (d, d), info)`` for affine jobs. ``info`` as optimize_vector's (``iters``,
        ``loss`` in nats, ``completion_losses``, ``loss_history``, ``status``, ``norm``, ...), plus
        ``job`` (the job's name) when it has one.

    Raises:
        TypeError / ValueError: a malformed job (the message names ``jobs[i]`` and the field).
    """
    if isinstance(jobs, Job) or not isinstance(jobs, (list, tuple)) or len(jobs) == 0:
        raise ValueError(f"`jobs` must be a non-empty list of steering_opt.scale.Job, got {jobs!r:.80}")
    if tokenizer is None:
        raise ValueError("`tokenizer` is required: pass the model's HuggingFace tokenizer (tokenizer=...)")
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"`max_batch_tokens` must be an int >= 1, got {max_batch_tokens!r}")
    d = arch.hidden_size(model)
    job_layers = [_check_job(model, i, job, d) for i, job in enumerate(jobs)]
    max_length = _context_length(model)
    job_seqs = []
    for i, job in enumerate(jobs):
        try:
            job_seqs.append(tokenize_datapoints(
                tokenizer, list(job.datapoints), only_hook_prompt=job.only_hook_prompt,
                target_loss=None if job.do_target_loss_sum else job.target_loss, max_length=max_length))
        except ValueError as e:
            raise ValueError(f"jobs[{i}]: {e}") from None

    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        key = (tuple(sorted(job_layers[i])), float(job.coldness), job.do_one_minus, job.normalize_token_length)
        groups.setdefault(key, []).append(i)

    results: list[tuple | None] = [None] * len(jobs)
    with frozen_model(model):
        states: list[_JobState] = []
        for i, job in enumerate(jobs):  # in job order: seed=None draws each job's seed from torch's RNG
            device = arch.execution_device(arch.get_site_module(model, min(job_layers[i])))
            states.append(_JobState(i, job, job_layers[i], job_seqs[i], d, device))
        for key, members in groups.items():
            objective = Objective(coldness=key[1], do_one_minus=key[2], normalize_token_length=key[3])
            _run_group(model, [states[i] for i in members], list(key[0]), objective, d,
                       max_batch_tokens=max_batch_tokens, progress=progress)
            for i in members:
                results[i] = states[i].result()
                states[i].params = None  # type: ignore[assignment]  # free the optimiser state early
                states[i].opt = None
    return results  # type: ignore[return-value]


def _run_group(model: nn.Module, states: list[_JobState], layers: list[int], objective: Objective, d: int, *,
               max_batch_tokens: int, progress: bool | None) -> None:
    """Optimise the jobs of one group together: one engine over all their sequences."""
    seqs: list[Seq] = []
    dp_offset = 0
    for st in states:  # renumber datapoints so that no two jobs share a packed row
        st.start = len(seqs)
        seqs += [dataclasses.replace(s, datapoint=s.datapoint + dp_offset) for s in st.seqs]
        dp_offset += st.n_dp
    eng = FastEngine(model, seqs, layers, objective, max_batch_tokens=max_batch_tokens)
    device = states[0].vec.device
    signs = torch.tensor([s.sign for s in seqs])
    # order the sequences by packed (prompt + completions) length so that chunks pad little
    dp_len: dict[int, int] = {}
    for s in seqs:
        dp_len[s.datapoint] = dp_len.get(s.datapoint, s.prompt_len) + s.completion_len
    any_clamp = any(st.job.vector_clamp is not None for st in states)
    r_max = max((st.job.affine_rank or 0) for st in states)
    noisy = [st for st in states if st.job.noise_scale]

    tangent = [st for st in noisy if st.job.do_tangent_space_noise]
    if tangent:  # unsteered-loss gradient per sequence, all tangent-noise jobs in one pass
        zero = torch.zeros(len(seqs), d, device=device, requires_grad=True)
        sub = [st.start + j for st in tangent for j in range(len(st.seqs))]
        eng.run(lambda idx: SteerSpec(rows={layer: zero[idx] for layer in layers}), backward=True, subset=sub)
        eng._chunks.pop(tuple(sub), None)
        per_seq = zero.grad.detach().float().cpu() if zero.grad is not None else torch.zeros(len(seqs), d)
        for st in tangent:
            rows = per_seq[st.start: st.start + len(st.seqs)]
            st.tangent = torch.zeros(st.n_dp, d).index_add(0, st.owner, rows)

    for st in states:
        st.begin()
    active = list(states)
    key: tuple[int, ...] | None = None
    bar = tqdm(total=max(st.cap for st in states), desc=f"optimize_many L{layers}",
               disable=not _show_progress(progress), leave=False)
    try:
        while active:
            pos = torch.full((len(seqs),), -1, dtype=torch.long)  # sequence -> index into `active`
            for a, st in enumerate(active):
                st.final_eval = st.steps >= st.cap
                assert st.opt is not None
                st.opt.zero_grad(set_to_none=True)
                pos[st.start: st.start + len(st.seqs)] = a
            noise = None
            if any(st in noisy for st in active):
                noise = torch.zeros(len(seqs), d)
                for st in active:
                    if st in noisy:
                        noise[st.start: st.start + len(st.seqs)] = st.noise(d)
                noise = noise.to(device)
            idx = sorted((i for st in active for i in range(st.start, st.start + len(st.seqs))),
                         key=lambda i: (-dp_len[seqs[i].datapoint], i))
            if key is not None and key != tuple(idx):
                eng._chunks.pop(key, None)  # the active set changed: drop the old batches' caches
            key = tuple(idx)
            spec_fn = _group_spec_fn(active, pos, signs, layers, noise, any_clamp, r_max, d)
            backward = any(not st.final_eval for st in active)
            losses = eng.run(spec_fn, backward=backward, subset=idx)
            by_seq = torch.empty(len(seqs))
            by_seq[torch.tensor(idx)] = losses
            for st in active:
                st.after_eval(by_seq[st.start: st.start + len(st.seqs)].clone())
            active = [st for st in active if not st.done]
            bar.update(1)
    finally:
        bar.close()
        eng._chunks.clear()


def _group_spec_fn(active: list[_JobState], pos: torch.Tensor, signs: torch.Tensor, layers: list[int],
                   noise: torch.Tensor | None, any_clamp: bool, r_max: int, d: int) -> SpecFn:
    """Per-sequence steering of the active jobs: row of sequence ``s`` = its job's ``sign · v`` (+ noise),
    with its job's clamp coefficient (NaN: none) and affine factors (zeros: none)."""
    vecs = torch.stack([st.vec for st in active])  # (J, d), differentiable into every job's vector
    device = vecs.device
    clamp = None
    if any_clamp:
        clamp = torch.tensor([st.job.vector_clamp if st.job.vector_clamp is not None else math.nan
                              for st in active], dtype=torch.float32)
    left = right = None
    if r_max:
        def padded(st: _JobState, t: torch.Tensor | None) -> torch.Tensor:
            if t is None:
                return torch.zeros(r_max, d, device=device)
            if t.shape[0] == r_max:
                return t
            return torch.cat([t, torch.zeros(r_max - t.shape[0], d, device=device)])

        left = torch.stack([padded(st, st.params.left) for st in active])  # (J, r_max, d)
        right = torch.stack([padded(st, st.params.right) for st in active])

    def fn(idx: list[int]) -> RowSteerSpec:
        job = pos[idx].to(device)
        r = signs[idx][:, None].to(vecs) * vecs[job]
        if noise is not None:
            r = r + noise[idx].to(r)
        return RowSteerSpec(rows={layer: r for layer in layers},
                            row_clamp=None if clamp is None else clamp[pos[idx]],
                            row_left=None if left is None else left[job],
                            row_right=None if right is None else right[job])

    return fn


# ------------------------------------------------------------------------------ data parallel

_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def init_distributed(backend: str | None = None, *, timeout: float | datetime.timedelta = 600.0) -> bool:
    """Initialise ``torch.distributed`` from a launcher's environment, unless it already is.

    ``accelerate launch --num_processes N script.py`` and ``torchrun --nproc_per_node N script.py``
    set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; this reads them (``env://``).

    Args:
        backend: ``"gloo"`` (CPU), ``"nccl"`` (GPUs) or None: nccl when CUDA is available, else gloo.
            With nccl, select each process's GPU (``torch.cuda.set_device``) before (accelerate does).
        timeout: seconds (or a timedelta) a collective may wait for the other processes before it
            fails; a process that died then makes the others fail instead of hanging.

    Returns:
        True if this call initialised the process group, False if it already was initialised.

    Raises:
        ValueError: a launcher variable is missing, or ``timeout`` is not positive.
    """
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if dist.is_initialized():
        return False
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
    _check_positive("timeout", seconds, allow_none=False)
    missing = [k for k in _LAUNCH_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"init_distributed: environment variables {missing} are not set; start the script "
                         "with `accelerate launch --num_processes N script.py` or `torchrun --nproc_per_node N "
                         "script.py`, or call torch.distributed.init_process_group yourself")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=float(seconds)))
    log.info("initialised torch.distributed: backend %s, rank %d of %d", backend, dist.get_rank(),
             dist.get_world_size())
    return True


def resolve_distributed(distributed: Any) -> Any:
    """Turn the ``distributed`` argument into a process group, or None for a single-process run.

    * ``None`` (auto): the default group if ``torch.distributed`` is initialised with more than one
      process; if it is not initialised but a launcher's variables say ``WORLD_SIZE > 1``, initialise
      it (:func:`init_distributed`) and use it; otherwise None.
    * ``True``: the default group (initialised from the launcher's variables if needed); an error
      if there is none. A 1-process group is allowed.
    * ``False``: None (every process optimises on its own).
    * a ``torch.distributed.ProcessGroup``: that group.

    Raises:
        TypeError: any other value. ValueError: ``True`` without a process group or launcher.
    """
    if distributed is False:
        return None
    if distributed is not None and distributed is not True:
        dist = _dist()
        if dist.is_available() and isinstance(distributed, dist.ProcessGroup):
            return distributed
        raise TypeError("`distributed` must be None (auto), True, False or a torch.distributed.ProcessGroup, "
                        f"got {distributed!r}")
    dist = _dist()
    if not dist.is_available():
        if distributed:
            raise ValueError("`distributed=True` but torch.distributed is not available in this PyTorch build")
        return None
    launched = all(k in os.environ for k in _LAUNCH_ENV) and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not dist.is_initialized():
        if launched or (distributed and all(k in os.environ for k in _LAUNCH_ENV)):
            init_distributed()
        elif distributed:
            raise ValueError("`distributed=True` but torch.distributed is not initialised and no launcher "
                             f"variables ({', '.join(_LAUNCH_ENV)}) are set: start the script with "
                             "`accelerate launch --num_processes N script.py` (or torchrun), or call "
                             "torch.distributed.init_process_group first")
        else:
            return None
    if distributed is None and dist.get_world_size() == 1:
        return None
    return dist.group.WORLD


class DataParallelEngine:
    """Data parallelism around an engine: this process computes the losses of its shard of the
    sequences, and gradients and losses are summed over the processes of ``group``.

    At every ``run`` the requested sequences are split by datapoint (a prompt and its completions stay
    together) into one shard per process, balanced by token count (the same split on every process);
    this process runs its shard on the wrapped engine, then the ``.grad`` of every tensor in ``params``
    (``backward=True``) and the per-sequence losses are all-reduced (sum). The return value and the
    gradients are therefore those of the whole request, on every process, so identical optimiser steps
    keep the processes' parameters identical. At construction the parameters are broadcast from the
    group's first process and every process checks that it holds the same data and settings
    (``fingerprint``); a mismatch raises ``ValueError`` on every process instead of a hang.

    Gradients of tensors not in ``params`` (e.g. a probe built inside ``spec_fn``) are not reduced.
    A collective that fails (a process died, or the process group's timeout passed) raises
    ``RuntimeError`` saying so.
    """

    def __init__(self, engine: Engine, params: Sequence[torch.Tensor], group: Any = None, *,
                 fingerprint: str = ""):
        dist = _dist()
        self.inner = engine
        self.seqs = engine.seqs
        self.params = list(params)
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self._src = dist.get_global_rank(self.group, 0) if self.group is not dist.group.WORLD else 0
        self._comm = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend(self.group) == "nccl" else torch.device("cpu"))
        self._shards: dict[tuple[int, ...], list[int]] = {}
        self._check_same(fingerprint)
        with torch.no_grad():
            for t in self.params:
                buf = t.detach().to(self._comm).contiguous()
                self._collective("broadcast the initial parameters", dist.broadcast, buf, src=self._src)
                t.copy_(buf.to(t.device))

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _collective(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as e:  # gloo/nccl raise RuntimeError subclasses with terse messages
            raise RuntimeError(
                f"steering_opt data-parallel: could not {what} on rank {self.rank} of {self.world}: another "
                f"process probably failed or was stopped, or did not reach this point within the process "
                f"group's timeout ({type(e).__name__}: {e})") from e

    def _check_same(self, fingerprint: str) -> None:
        crc = zlib.crc32(repr([(s.ids, s.prompt_len, s.kind, s.datapoint, s.sign, s.steer_positions)
                               for s in self.seqs]).encode())
        crc = zlib.crc32(repr((fingerprint, [tuple(t.shape) for t in self.params])).encode(), crc)
        mine = torch.tensor([crc, len(self.seqs)], dtype=torch.int64, device=self._comm)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        self._collective("compare the data and settings of the processes", _dist().all_gather, gathered, mine)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise ValueError("steering_opt data-parallel: the processes were given different prompts, "
                             "completions or settings (every process must call the optimiser with the "
                             "same arguments; each computes a share of every minibatch)")

    def shard(self, idx: Sequence[int]) -> list[int]:
        """Positions in ``idx`` that this process computes (whole datapoints, balanced by tokens)."""
        key = tuple(idx)
        if key not in self._shards:
            tokens: dict[int, int] = {}
            for i in idx:
                s = self.seqs[i]
                tokens[s.datapoint] = tokens.get(s.datapoint, s.prompt_len) + s.completion_len
            load = [0] * self.world
            owner: dict[int, int] = {}
            for dp in sorted(tokens, key=lambda k: (-tokens[k], k)):  # largest first, to the least loaded
                r = min(range(self.world), key=lambda q: (load[q], q))
                owner[dp] = r
                load[r] += tokens[dp]
            self._shards[key] = [j for j, i in enumerate(idx) if owner[self.seqs[i].datapoint] == self.rank]
        return self._shards[key]

    def run(self, spec_fn: SpecFn, *, weights: torch.Tensor | None = None, backward: bool = True,
            subset: Sequence[int] | None = None) -> torch.Tensor:
        """Like :meth:`Engine.run` over all processes: the losses ``(len(subset),)`` (nats) of the
        whole request and, with ``backward``, the summed gradients in ``params``' ``.grad``."""
        dist = _dist()
        idx = list(range(len(self.seqs))) if subset is None else list(subset)
        mine = self.shard(idx)
        full = torch.zeros(len(idx), dtype=torch.float32)
        if mine:
            w = None if weights is None else weights[torch.tensor(mine)]
            local = self.inner.run(spec_fn, weights=w, backward=backward, subset=[idx[j] for j in mine])
            full[torch.tensor(mine)] = local.float().cpu()
        if backward and self.params:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.detach().reshape(-1).to(self._comm, torch.float32) for g in grads])
            self._collective("all-reduce the gradients", dist.all_reduce, flat)
            o = 0
            for p in self.params:
                n = p.numel()
                p.grad = flat[o: o + n].view_as(p).to(device=p.device, dtype=p.dtype)
                o += n
        buf = full.to(self._comm)
        self._collective("all-reduce the losses", dist.all_reduce, buf)
        return buf.cpu()
