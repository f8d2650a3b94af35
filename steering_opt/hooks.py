"""Steering hooks: the one place where an activation is modified.

Every steering operation in the library (the optimiser's training-time hooks, the tutorial's
``make_steering_hook_hf``, ``SteeringVector.apply``) goes through :func:`steer`, so training and
inference steer identically.

Site: the residual stream *entering* decoder block ``L`` (a forward pre-hook on block ``L``), which
equals ``hidden_states[L]`` of ``output_hidden_states=True`` and TransformerLens'
``blocks.L.hook_resid_pre``.

Token positions: hooks read the ``position_ids`` keyword that HF decoder blocks receive, so a token
index means the same token whether the sequence is processed in one pass or one token at a time with
a KV cache (and, with left padding, positions count from the first real token).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import arch

TokenSpec = int | slice | Sequence[int] | None


def steer(
    h: torch.Tensor,
    vector: torch.Tensor,
    *,
    left: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
    matrix: torch.Tensor | None = None,
    clamp: float | None = None,
    mask: torch.Tensor | None = None,
    operator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return steered activations (out of place, differentiable in every argument).

    Args:
        h: activations, shape ``(batch, seq, d)``.
        vector: ``(d,)`` or one vector per row ``(batch, d)``.
        left, right: affine factors ``(r, d)``; the map is ``h -> h + h Mᵀ + v`` with ``M = leftᵀ right``,
            computed as ``(h rightᵀ) left`` (rank-r, never a dense ``d×d`` product).
        matrix: a dense ``(d, d)`` matrix ``M`` (tutorial compatibility): ``h -> h + h Mᵀ + v``.
        clamp: clamp coefficient ``c``: ``h -> h - (h·v̂) v̂ + c v`` (rank-1).
        mask: bool ``(batch, seq)``; positions where it is False are left untouched (a float mask
            weights the change per position).
        operator: ``operator(h, vector) -> delta`` (shape ``(batch, seq, d)`` or ``(d,)``) replacing the
            additive/clamp rule (e.g. :func:`steering_opt.contrastive.ablation_operator`); the affine
            terms, if any, are still added.

    Returns:
        Tensor of the same shape and dtype as ``h``.
    """
    v = vector.to(device=h.device, dtype=h.dtype)
    if v.dim() == 1:
        v = v.expand(h.shape[0], -1)
    v = v[:, None, :]  # (batch, 1, d)
    if operator is not None:
        out = operator(h, vector.to(device=h.device, dtype=h.dtype))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"operator must return a tensor, got {type(out).__name__}")
        try:
            delta = torch.broadcast_to(out.to(h), h.shape)
        except RuntimeError as e:
            raise ValueError(f"operator returned shape {tuple(out.shape)}; expected {tuple(h.shape)} or "
                             f"({h.shape[-1]},)") from e
    elif clamp is not None:
        norm = v.norm(dim=-1, keepdim=True)
        if bool((norm == 0).any()):
            raise ValueError("clamp steering needs a non-zero vector (got a vector of norm 0)")
        vhat = v / norm
        delta = -(h * vhat).sum(-1, keepdim=True) * vhat + clamp * v
    else:
        delta = v.expand_as(h)
    if left is not None and right is not None:
        delta = delta + (h @ right.to(h).T) @ left.to(h)
    if matrix is not None:
        delta = delta + h @ matrix.to(h).T
    if mask is not None:
        delta = delta * mask.to(device=h.device, dtype=h.dtype)[..., None]
    return h + delta


def token_mask(token: TokenSpec, positions: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bool mask ``(batch, seq)`` of the positions selected by ``token``; ``None`` means all positions.

    Args:
        token: ``None`` (all), an int (negative counts from the end of the sequence), a slice, or a
            sequence of ints.
        positions: absolute token positions ``(batch, seq)`` (HF ``position_ids``).
        seq_lens: length of each row's full sequence ``(batch,)``, needed for negative indices.
    """
    if token is None:
        return None
    if isinstance(token, slice):
        if token.step not in (None, 1):
            raise ValueError(f"token slice step must be 1, got {token.step}")
        start, stop = token.start, token.stop
        if (start is not None and start < 0) or (stop is not None and stop < 0):
            if seq_lens is None:
                raise ValueError("negative token slice bounds need the sequence length")
            lens = seq_lens[:, None]
            start_t = (lens + start if start is not None and start < 0 else torch.full_like(lens, start or 0))
            stop_t = (lens + stop if stop is not None and stop < 0 else
                      torch.full_like(lens, stop if stop is not None else 2**62))
        else:
            start_t = torch.full_like(positions[:, :1], start or 0)
            stop_t = torch.full_like(positions[:, :1], stop if stop is not None else 2**62)
        return (positions >= start_t) & (positions < stop_t)
    idx = [token] if isinstance(token, int) else list(token)
    mask = torch.zeros_like(positions, dtype=torch.bool)
    for i in idx:
        if i < 0:
            if seq_lens is None:
                raise ValueError("negative token indices need the sequence length")
            mask |= positions == (seq_lens[:, None] + i)
        else:
            mask |= positions == i
    return mask


def _positions(args: tuple, kwargs: dict, h: torch.Tensor) -> torch.Tensor:
    pos = kwargs.get("position_ids")
    if pos is None:
        return torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
    return pos.to(h.device).expand(h.shape[0], -1)


HookFn = Callable[..., Any]


def make_steering_hook_hf(
    vector: torch.Tensor,
    matrix: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    token: TokenSpec = None,
    *,
    clamp: float | None = None,
) -> HookFn:
    """Make a forward pre-hook that steers the residual stream entering a decoder block.

    ``h -> h + h Mᵀ + v`` on the selected token positions (tutorial semantics).

    Args:
        vector: steering vector ``(d,)``.
        matrix: ``None`` (additive steering), a dense ``(d, d)`` matrix ``M`` (e.g. from
            :func:`make_abl_mat` for clamp steering, or the matrix returned by affine optimisation),
            or a ``(left, right)`` pair of ``(r, d)`` factors with ``M = leftᵀ right``.
        token: which positions to steer: ``None`` (all), an int, a slice or a list of ints. Negative
            ints count from the end of the prompt seen in the first (prefill) pass, and stay attached
            to that token during cached generation.
        clamp: alternative to ``make_abl_mat``: clamp the projection on ``v̂`` to ``clamp·‖v‖``.

    Returns:
        A function ``hook(module, args, kwargs)`` to register with ``register_forward_pre_hook(...,
        with_kwargs=True)``; :func:`hf_hooks_contextmanager` does that for you.
    """
    _check_hook_args(vector, matrix, clamp)
    left = right = dense = None
    if isinstance(matrix, tuple):
        left, right = matrix
    else:
        dense = matrix
    state: dict[str, torch.Tensor] = {}

    def hook_fn(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        h = arch.get_hidden_states(args, kwargs)
        mask = None
        if token is not None:
            pos = _positions(args, kwargs, h)
            if h.shape[1] > 1 or "seq_lens" not in state:
                # a new sequence (prefill): remember its length so negative indices stay fixed
                state["seq_lens"] = pos[:, -1] + 1
            seq_lens = state["seq_lens"]
            if seq_lens.shape[0] != pos.shape[0]:
                seq_lens = seq_lens[:1].expand(pos.shape[0])
            mask = token_mask(token, pos, seq_lens)
        new_h = steer(h, vector, left=left, right=right, matrix=dense, clamp=clamp, mask=mask)
        return arch.replace_hidden_states(args, kwargs, new_h)

    hook_fn.steering_vector = vector  # type: ignore[attr-defined]
    return hook_fn


def _check_finite(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor) or t.is_meta or not t.is_floating_point():
        what = f"a {t.dtype} tensor on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"`{name}` must be a floating-point torch.Tensor with data, got {what}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values")


def _check_hook_args(vector: Any, matrix: Any, clamp: Any) -> None:
    """Validate make_steering_hook_hf's arguments when the hook is made, not in the middle of a forward."""
    _check_finite("vector", vector)
    if vector.dim() != 1:
        raise ValueError(f"`vector` must have shape (d,), got {tuple(vector.shape)}")
    d = vector.shape[0]
    if isinstance(matrix, tuple):
        if len(matrix) != 2:
            raise ValueError(f"`matrix` as factors must be a (left, right) pair, got {len(matrix)} items")
        for name, t in zip(("matrix[0] (left)", "matrix[1] (right)"), matrix):
            _check_finite(name, t)
            if t.dim() != 2 or t.shape[1] != d:
                raise ValueError(f"`{name}` must have shape (r, {d}), got {tuple(t.shape)}")
        if matrix[0].shape != matrix[1].shape:
            raise ValueError(f"`matrix` factors must have the same shape (r, {d}), got {tuple(matrix[0].shape)} and "
                             f"{tuple(matrix[1].shape)}")
    elif matrix is not None:
        _check_finite("matrix", matrix)
        if tuple(matrix.shape) != (d, d):
            raise ValueError(f"`matrix` must have shape ({d}, {d}) (or be a (left, right) pair of (r, {d}) factors), "
                             f"got {tuple(matrix.shape)}")
    if clamp is not None:
        if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not math.isfinite(clamp):
            raise ValueError(f"`clamp` must be a finite number or None, got {clamp!r}")
        if not bool(vector.detach().abs().sum() > 0):
            raise ValueError("`clamp` steering needs a non-zero `vector` (its direction v/|v| is undefined for "
                             "a zero vector)")


def make_abl_mat(vector: torch.Tensor) -> torch.Tensor:
    """Dense ``(d, d)`` matrix ``-v̂ v̂ᵀ``: with :func:`make_steering_hook_hf` it gives clamp steering.

    ``make_steering_hook_hf(c * v, make_abl_mat(v))`` maps ``h -> h - (h·v̂) v̂ + c v``.
    Raises ``ValueError`` for a zero vector (the reference implementation returned NaNs).
    """
    v = vector.detach()
    n2 = (v.float() ** 2).sum()
    if not torch.isfinite(n2) or n2 == 0:
        raise ValueError("make_abl_mat: `vector` must be finite and non-zero")
    return (-torch.outer(v.float(), v.float()) / n2).to(v.dtype)


@contextlib.contextmanager
def hf_hooks_contextmanager(
    model: nn.Module,
    hook_infos: Sequence[tuple[int, HookFn]],
    *,
    site: str = "decoder_block",
    layer_config: arch.LayerConfig = None,
) -> Iterator[None]:
    """Run ``model`` with forward pre-hooks ``[(layer, hook_fn), ...]``; always removes them.

    Hooks with signature ``hook(module, args, kwargs)`` (as made by :func:`make_steering_hook_hf`)
    are registered with ``with_kwargs=True``; plain ``hook(module, args)`` hooks (reference-library
    style, returning the new hidden states) are also accepted.
    """
    if isinstance(hook_infos, (str, bytes)) or not isinstance(hook_infos, Iterable):
        raise TypeError(f"`hook_infos` must be a list of (layer, hook) pairs, got {type(hook_infos).__name__}")
    hook_infos = list(hook_infos)
    for i, item in enumerate(hook_infos):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"`hook_infos[{i}]` must be a (layer, hook) pair, got {item!r:.60}")
        if not callable(item[1]):
            raise TypeError(f"`hook_infos[{i}]`: the hook must be callable, got {type(item[1]).__name__}")
    # locate every module (and check vector widths) before registering anything: a bad entry registers nothing
    modules = [arch.get_site_module(model, layer, site, layer_config) for layer, _ in hook_infos]
    for i, (_, fn) in enumerate(hook_infos):
        vec = getattr(fn, "steering_vector", None)
        if isinstance(vec, torch.Tensor) and vec.shape[-1] != arch.hidden_size(model):
            raise ValueError(f"`hook_infos[{i}]`: the hook's vector has size {vec.shape[-1]}, but the model's hidden "
                             f"size is {arch.hidden_size(model)}")
    handles = []
    try:
        for module, (_, fn) in zip(modules, hook_infos):
            handles.append(_register_pre_hook(module, fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _register_pre_hook(module: nn.Module, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
    import inspect

    try:
        n_params = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_params = 3
    if n_params >= 3:
        return module.register_forward_pre_hook(fn, with_kwargs=True)

    def adapter(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        out = fn(mod, args)
        if out is None:
            return None
        new_h = out[0] if isinstance(out, tuple) else out
        return arch.replace_hidden_states(args, kwargs, new_h)

    return module.register_forward_pre_hook(adapter, with_kwargs=True)


@contextlib.contextmanager
def frozen_model(model: nn.Module) -> Iterator[nn.Module]:
    """Freeze and eval the model for the duration; restore requires_grad flags, train mode and
    ``config.use_cache`` exactly afterwards, also on exceptions and ``KeyboardInterrupt``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None) if config is not None else None
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
