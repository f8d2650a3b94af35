"""llm-steering-opt (the reference library and its tutorial) API, as thin adapters over the core.

Names, parameters and call forms are the reference's; the steering itself is
:func:`steering_opt.hooks.steer`, hooks are registered with :func:`steering_opt.hooks.attach` and token
positions selected by :class:`steering_opt.hooks.TokenSelection`, exactly as for
:meth:`SteeringVector.apply <steering_opt.vector.SteeringVector.apply>`.

Differences from the reference, kept on purpose: arguments are validated when the hook is made (not in
the middle of a forward); hooks steer out of place; ``make_abl_mat`` refuses a zero vector (the reference
returned NaNs); ``token`` is read against the ``position_ids`` the block receives, so a token index (also
a negative one, counted from the end of the prompt of the first, prefill, pass) means the same token
during KV-cached generation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import arch, validate
from ..data import TrainingDatapoint
from ..hooks import TokenIndices, TokenSelection, attach, current_positions, layer_hook_specs, steer
from ..optimize import optimize
from ..options import OptimizeOptions

__all__ = [
    # hooks (this section)
    "hf_hooks_contextmanager",
    "make_abl_mat",
    "make_steering_hook_hf",
]

# =================================================================================================
# Hooks: make_steering_hook_hf, make_abl_mat, hf_hooks_contextmanager
# =================================================================================================

HookFn = Callable[..., Any]


def make_steering_hook_hf(
    vector: torch.Tensor,
    matrix: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    token: TokenIndices = None,
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
        token: which positions to steer: ``None`` (all), an int, a slice or a list of ints (see
            :class:`~steering_opt.hooks.TokenSelection`). Negative ints count from the end of the prompt
            seen in the first (prefill) pass, and stay attached to that token during cached generation.
        clamp: alternative to ``make_abl_mat``: clamp the projection on ``v̂`` to ``clamp·‖v‖``.

    Returns:
        ``hook(module, args, kwargs=None)``: register it with ``register_forward_pre_hook(...,
        with_kwargs=True)`` (it then returns ``(args, kwargs)``), or, as in the reference, with a plain
        ``register_forward_pre_hook`` / call it as ``hook(module, args)`` (it then returns the new
        ``args``). :func:`hf_hooks_contextmanager` registers it for you.
    """
    _check_hook_args(vector, matrix, clamp)
    selection = TokenSelection(token_indices=token, name="token")
    left = right = dense = None
    if isinstance(matrix, tuple):
        left, right = matrix
    else:
        dense = matrix
    state: dict[str, torch.Tensor] = {}

    def hook_fn(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Any:
        kw = {} if kwargs is None else kwargs
        h = arch.get_hidden_states(args, kw)
        mask = None
        if not selection.selects_all:
            pos = current_positions(h, kw.get("position_ids"), None)[0]
            if h.shape[1] > 1 or "seq_lens" not in state:
                # a new sequence (prefill): remember its length so negative indices stay fixed
                state["seq_lens"] = pos[:, -1] + 1
            seq_lens = state["seq_lens"].to(pos.device)
            if seq_lens.shape[0] != pos.shape[0]:
                seq_lens = seq_lens[:1].expand(pos.shape[0])
            mask = selection.mask(pos, torch.zeros_like(seq_lens), seq_lens)
        new_h = steer(h, vector, left=left, right=right, matrix=dense, clamp=clamp, mask=mask)
        new_args, new_kwargs = arch.replace_hidden_states(args, kw, new_h)
        return new_args if kwargs is None else (new_args, new_kwargs)

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
        if matrix is not None:
            raise ValueError("`clamp` and `matrix` cannot be combined (clamp steering is the matrix make_abl_mat(v))")
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
    style, returning the new hidden states) are also accepted. Every layer is located (and every hook's
    vector width checked) before the first hook is registered.
    """
    with attach(layer_hook_specs(model, hook_infos, site=site, layer_config=layer_config, name="hook_infos")):
        yield


# ----------------------------------------------------------------------------- optimisation
# The reference library's optimiser functions: its names, keyword names and tuple return shapes, over
# :func:`steering_opt.optimize.optimize` (which returns a typed OptimizeResult).


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
    """Optimise one steering vector (optionally a clamp vector or a rank-r affine map) at ``layer``
    (llm-steering-opt's ``optimize_vector``). Every option is an
    :class:`~steering_opt.options.OptimizeOptions` field of the same name (see there for meanings).

    Returns:
        ``(vector, info)``, or ``(vector, matrix, info)`` with ``affine_rank``; with
        ``return_info=False`` the vector (and matrix). ``vector`` ``(d,)`` float32 on the steered
        block's device; ``info``: ``iters``, ``loss`` (nats: summed, or ``loss[i][j][k]`` per
        completion with ``do_target_loss_sum=False``), ``norm``, ``loss_history``, ``status``, and the
        output-constrained phase's ``output_constr_iters``, ``constraints_satisfied``,
        ``norm_before_output_constr``. See :attr:`steering_opt.loop.OptimizeResult.info`.
    """
    options = {k: v for k, v in locals().items() if k in OptimizeOptions.field_names()}
    result = optimize(model, tokenizer, datapoints, layer,
                      custom_output_constr_loss_func=custom_output_constr_loss_func,
                      custom_output_constr_pre_loss_func=custom_output_constr_pre_loss_func, **options)
    if not return_info:
        return (result.vector, result.matrix) if affine_rank is not None else result.vector
    return result.astuple()


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
    """Jointly optimise one vector per layer in ``layers`` (llm-steering-opt's ``optimize_vectors``).

    Objective (nats): the completion losses plus ``regularization_weight · Σ_l R(v_l)`` (``R`` = L1 or
    max-abs), ``sparsity_weight · Σ_l ‖v_l‖₂`` and ``entropy_weight · H(softmax(‖v_1‖, …, ‖v_L‖))``.

    Returns:
        ``({layer: vector (d,)}, info)`` with ``info['norms'][layer]``, ``iters``, ``loss`` (the
        completion loss without regularisers), ``loss_history``, ``status``.
    """
    options = {k: v for k, v in locals().items() if k in OptimizeOptions.field_names()}
    return optimize(model, tokenizer, datapoints, layers, per_layer=True, **options).astuple()


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
    max_affine_norm: float | None = 2.0,
    vector_clamp: float | None = None,
    do_one_minus: bool = True,
    normalize_token_length: bool = False,
    seed: int | None = None,
    engine: str = "fast",
    progress: bool | None = None,
    distributed: Any = None,
) -> tuple[Any, ...]:
    """Optimise one vector over many prompts sharing the same completions, in minibatches
    (llm-steering-opt's ``optimize_vector_minibatch_hf``).

    Step ``i`` uses the ``i``-th minibatch of ``minibatch_size`` prompts (cycling in order), so every
    prompt is used once per epoch; ``target_loss`` applies to the current minibatch's summed loss and
    ``info['loss']`` is that loss at the last evaluation. Padding is handled internally, so the
    tokenizer's padding side does not matter. ``distributed``: data parallelism over processes
    (``None`` = automatic under ``accelerate launch`` / ``torchrun``); see :mod:`steering_opt.parallel`.

    Returns ``(vector, info)`` (or ``(vector, matrix, info)`` with ``affine_rank``).
    """
    validate.model(model)
    validate.tokenizer(tokenizer)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r:.60}")
    validate.integer("minibatch_size", minibatch_size, 1)
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
    options = {k: v for k, v in locals().items() if k in OptimizeOptions.field_names()}
    result = optimize(model, tokenizer, dps, layer, minibatch_size=minibatch_size, distributed=distributed,
                      **options)
    info = {"iters": result.iters, "loss": result.loss_history[-1] if result.loss_history else math.nan,
            "loss_history": result.loss_history, "status": result.status, "norm": result.norm,
            "loss_units": "nats"}
    if "processes" in result.extra:
        info["processes"] = result.extra["processes"]
    if affine_rank is not None:
        return result.vector, result.matrix, info
    return result.vector, info
