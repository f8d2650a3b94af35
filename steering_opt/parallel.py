"""Data parallelism: ``torch.distributed`` set-up and an engine wrapper that shards every evaluation.

Launch a script with ``accelerate launch --num_processes N script.py`` or ``torchrun --nproc_per_node N
script.py`` and pass ``distributed=None`` (auto) or ``True`` to the minibatch optimiser: every process
computes a share of each minibatch, gradients and losses are summed over the processes, and all of
them return the vector of a single-process run (up to float32 rounding).
"""

from __future__ import annotations

import datetime
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import validate
from .engine import LossEngine, SpecFn

log = logging.getLogger(__name__)

__all__ = ["DataParallelEngine", "init_distributed", "resolve_distributed"]


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
    validate.positive("timeout", seconds, allow_none=False)
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

    def __init__(self, engine: LossEngine, params: Sequence[torch.Tensor], group: Any = None, *,
                 fingerprint: str = ""):
        dist = _dist()
        self.inner = engine
        self.seqs = engine.seqs
        self.layers = engine.layers
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

    def forget(self, subset: Sequence[int] | None) -> None:
        self.inner.forget(subset)

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
