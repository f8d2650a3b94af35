"""llm-steering-opt (the reference library and its tutorial) API, as thin adapters over the core.

Names, parameters (by keyword and by position) and call forms are the reference's; the steering itself is
:func:`steering_opt.hooks.steer`, hooks are registered with :func:`steering_opt.hooks.attach` and token
positions selected by :class:`steering_opt.hooks.TokenSelection`, exactly as for
:meth:`SteeringVector.apply <steering_opt.vector.SteeringVector.apply>`.

Differences from the reference, kept on purpose (the full table is in
``docs/differences-llm-steering-opt-hooks.md``): arguments are validated when the hook is made (not in the
middle of a forward); hooks steer out of place and let gradients reach earlier layers; ``make_abl_mat``
refuses a zero vector (the reference returned NaNs); ``token`` is read against the ``position_ids`` the
block receives, so a token index (also a negative one, counted from the end of the prompt of the first,
prefill, pass) means the same token during KV-cached generation.
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
from . import llm_steering_opt_adapt as adapt

__all__ = [
    # hooks (this section)
    "hf_hooks_contextmanager",
    "make_abl_mat",
    "make_activs_hook_hf",
    "make_steering_hook_hf",
    "make_steering_hook_tflens",
    # optimisation (the optimiser section below)
    "optimize_vector",
    "optimize_vector_minibatch_hf",
    "optimize_vectors",
]

# =================================================================================================
# Hooks: make_steering_hook_hf, make_steering_hook_tflens, make_activs_hook_hf, make_abl_mat,
# hf_hooks_contextmanager
# =================================================================================================

HookFn = Callable[..., Any]
#: ``matrix`` of the steering hooks: a dense ``(d, d)`` matrix or a ``(left, right)`` pair of ``(r, d)`` factors.
MatrixArg = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


def _one_vector(given: Any, alias: Any, name: str, alias_name: str) -> Any:
    """The vector passed under the reference's parameter name ``name`` or its alias ``alias_name``."""
    if given is not None and alias is not None:
        raise TypeError(f"pass the vector once: as `{name}` (positionally) or as `{alias_name}`, not both")
    if given is None and alias is None:
        raise TypeError(f"missing the steering vector: pass it as the first argument (`{name}`)")
    return given if given is not None else alias


def make_steering_hook_hf(
    vector_: torch.Tensor | None = None,
    matrix: MatrixArg = None,
    token: TokenIndices = None,
    *,
    clamp: float | None = None,
    vector: torch.Tensor | None = None,
) -> HookFn:
    """Make a forward pre-hook that steers the residual stream entering a decoder block.

    ``h -> h + h Mᵀ + v`` on the selected token positions (llm-steering-opt semantics; out of place).
    Differentiable in ``vector_`` and ``matrix``: a training loop may backpropagate through a steered
    forward (e.g. ``make_steering_hook_hf(c * v, make_abl_mat(v))``).

    Args:
        vector_: steering vector ``(d,)`` (the reference's name; ``vector=`` is accepted too).
        matrix: ``None`` (additive steering), a dense ``(d, d)`` matrix ``M`` (e.g. from
            :func:`make_abl_mat` for clamp steering, or the matrix returned by affine optimisation),
            or a ``(left, right)`` pair of ``(r, d)`` factors with ``M = leftᵀ right``.
        token: which positions to steer: ``None`` (all), an int, a slice or a list of ints (see
            :class:`~steering_opt.hooks.TokenSelection`). Negative ints count from the end of the prompt
            seen in the first (prefill) pass, and stay attached to that token during cached generation.
        clamp: alternative to ``make_abl_mat``: clamp the projection on ``v̂`` to ``clamp·‖v‖``.
        vector: the same as ``vector_``.

    Returns:
        ``hook(module, args, kwargs=None)``. Register it with :func:`hf_hooks_contextmanager`, with a plain
        ``block.register_forward_pre_hook(hook)`` as the reference's users do (it is then called as
        ``hook(module, args)`` and returns the steered hidden states, or the new ``args`` when the block
        received more than one positional argument), or with ``register_forward_pre_hook(hook,
        with_kwargs=True)`` (it then returns ``(args, kwargs)``).
    """
    vec = _one_vector(vector_, vector, "vector_", "vector")
    _check_hook_args(vec, matrix, clamp)
    selection = TokenSelection(token_indices=token, name="token")
    left, right, dense = _split_matrix(matrix)
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
        new_h = steer(h, vec, left=left, right=right, matrix=dense, clamp=clamp, mask=mask)
        new_args, new_kwargs = arch.replace_hidden_states(args, kw, new_h)
        if kwargs is not None:
            return new_args, new_kwargs
        return new_h if len(args) == 1 else new_args

    hook_fn.steering_vector = vec  # type: ignore[attr-defined]
    return hook_fn


def make_steering_hook_tflens(vector: torch.Tensor, matrix: MatrixArg = None, token: TokenIndices = None) -> HookFn:
    """Make a TransformerLens hook ``hook_fn(x, hook)`` that steers ``x`` ``(batch, pos, d)``:
    ``x -> x + x Mᵀ + v`` on the selected positions (out of place; differentiable in ``vector``/``matrix``).

    Attach it at ``blocks.{layer}.hook_resid_pre`` (the residual stream entering block ``layer``, the same
    site as :func:`make_steering_hook_hf`), e.g. ``with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre",
    hook)]): model(prompt)``.

    Args:
        vector: steering vector ``(d_model,)``.
        matrix: ``None``, a dense ``(d, d)`` matrix or a ``(left, right)`` pair of ``(r, d)`` factors.
        token: ``None`` (all positions), an int, a slice or a list of ints, indexing the positions of the
            tensor the hook receives (negative ones count from its end), as in the reference.
    """
    _check_hook_args(vector, matrix, None)
    selection = TokenSelection(token_indices=token, name="token")
    left, right, dense = _split_matrix(matrix)

    def hook_fn(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
        mask = None
        if not selection.selects_all:
            b, s = x.shape[0], x.shape[1]
            pos = torch.arange(s, device=x.device).expand(b, s)
            ends = torch.full((b,), s, device=x.device)
            mask = selection.mask(pos, torch.zeros_like(ends), ends)
        return steer(x, vector, left=left, right=right, matrix=dense, mask=mask)

    hook_fn.steering_vector = vector  # type: ignore[attr-defined]
    return hook_fn


def make_activs_hook_hf(outlist: list) -> HookFn:
    """Make a forward pre-hook that appends the hidden states entering the block ``(batch, seq, d)`` to
    ``outlist`` (not detached, not copied: as in the reference) and leaves them unchanged.

    Use it like :func:`make_steering_hook_hf`: ``hf_hooks_contextmanager(model, [(layer,
    make_activs_hook_hf(acts))])`` or ``block.register_forward_pre_hook(hook)``.
    """
    if not callable(getattr(outlist, "append", None)):
        raise TypeError(f"`outlist` must be a list (to append the activations to), got {type(outlist).__name__}")

    def hook_fn(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Any:
        h = arch.get_hidden_states(args, {} if kwargs is None else kwargs)
        outlist.append(h)
        if kwargs is None and len(args) == 1:
            return h  # the reference's return value (the block's input, unchanged)
        return None

    return hook_fn


def _split_matrix(matrix: MatrixArg) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(left, right, dense)`` from a hook's ``matrix`` argument."""
    if isinstance(matrix, tuple):
        return matrix[0], matrix[1], None
    return None, None, matrix


def _check_finite(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor) or t.is_meta or not t.is_floating_point():
        what = f"a {t.dtype} tensor on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"`{name}` must be a floating-point torch.Tensor with data, got {what}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values")


def _check_hook_args(vector: Any, matrix: Any, clamp: Any) -> None:
    """Validate a steering hook's arguments when the hook is made, not in the middle of a forward."""
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


def make_abl_mat(v: torch.Tensor | None = None, *, vector: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``(d, d)`` matrix ``-v vᵀ / ‖v‖²``: with :func:`make_steering_hook_hf` it gives clamp steering.

    ``make_steering_hook_hf(c * v, make_abl_mat(v))`` maps ``h -> h - (h·v̂) v̂ + c v``.

    As in the reference, the result is differentiable in ``v`` through ``v vᵀ`` while ``‖v‖²`` enters as a
    constant (the reference divides by ``v.norm().item()**2``), so a training loop that backpropagates
    through the clamp hook gets the reference's gradient. Computed in float32, returned in ``v``'s dtype.

    Args:
        v: the direction ``(d,)`` (the reference's name; ``vector=`` is accepted too).

    Raises:
        ValueError: for a zero or non-finite vector (the reference returned NaNs).
    """
    vec = _one_vector(v, vector, "v", "vector")
    _check_finite("vector", vec)
    if vec.dim() != 1:
        raise ValueError(f"make_abl_mat: `vector` must have shape (d,), got {tuple(vec.shape)}")
    n2 = (vec.detach().float() ** 2).sum()
    if not torch.isfinite(n2) or n2 == 0:
        raise ValueError("make_abl_mat: `vector` must be finite and non-zero")
    vf = vec.float()
    return (-torch.outer(vf, vf) / n2).to(vec.dtype)


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


# =================================================================================================
# The reference library's optimiser functions: optimize_vector, optimize_vectors,
# optimize_vector_minibatch_hf. Its names, parameters (by keyword and in its positional order) and tuple
# return shapes, over :func:`steering_opt.optimize.optimize`; the translation is in
# :mod:`steering_opt.compat.llm_steering_opt_adapt`. Differences: docs/differences-llm-steering-opt.md.
# =================================================================================================


def optimize_vector(
    model: nn.Module,
    datapoints: Sequence[TrainingDatapoint],
    layer: int | Sequence[int],
    eps: float = 1e-6,
    lr: float = 0.01,
    max_iters: int | None = None,
    coldness: float = 0.7,
    normalize_token_length: bool = False,
    only_hook_prompt: bool = False,
    use_transformer_lens: bool = False,
    tokenizer: Any = None,
    target_loss: float | None = None,
    return_info: bool = True,
    do_target_loss_sum: bool = True,
    return_loss_history: bool = False,
    return_vec_history: bool = False,
    target_loss_target_iters: int = 1,
    satisfice: bool = False,
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
    do_noise_abl_relu: bool = False,
    noise_iters: int = 1,
    do_antipgd: bool = False,
    do_output_constr: bool = False,
    custom_output_constr_loss_func: Callable[..., Any] | None = None,
    custom_output_constr_pre_loss_func: Callable[..., dict] | None = None,
    output_constr_norm_initial_scale: float = 1.0,
    output_constr_lr: float | None = None,
    max_output_constr_iters: int | None = None,
    debug: bool = False,
    *,
    output_constr_damping: float = 1.0,
    output_constr_patience: int = 20,
    seed: int | None = None,
    engine: str = "fast",
    max_batch_tokens: int = 16384,
    progress: bool | None = None,
) -> tuple[Any, ...]:
    """Optimise one steering vector (optionally a clamp vector or a rank-r affine map) at ``layer``
    (llm-steering-opt's ``optimize_vector``: its parameters, in its order, with its meanings).

    Every option is the :class:`~steering_opt.options.OptimizeOptions` field of the same name. The
    reference-only arguments: ``use_transformer_lens`` (True for a TransformerLens ``HookedTransformer``:
    steering at ``blocks.{layer}.hook_resid_pre``, see :mod:`steering_opt.compat.transformer_lens`; False
    for a HuggingFace model with its ``tokenizer``), ``return_info``, ``return_loss_history`` (with
    ``do_target_loss_sum=False``, ``info['loss']`` is then the loss at every evaluation), and the custom
    output-constraint functions, which may be written to the reference's signature (see
    :func:`~steering_opt.compat.llm_steering_opt_adapt.custom_funcs`). ``debug=True`` logs every
    evaluation at DEBUG level (``logging``, logger ``steering_opt.loop``). Keyword-only additions:
    ``seed`` (``seed=s`` draws the start and the noise exactly as the reference does after
    ``torch.manual_seed(s)``; without it a seed is drawn from torch's global generator), ``engine``,
    ``max_batch_tokens``, ``progress``, ``output_constr_damping`` / ``output_constr_patience``.

    Returns:
        ``(vector, info)``; ``(vector, matrix, info)`` with ``affine_rank`` (``matrix`` the dense
        ``(d, d)`` map); without ``info`` when ``return_info=False`` (``vector, = optimize_vector(...)``).
        ``vector`` ``(d,)`` float32 on the steered block's device; ``info``: ``iters``, ``loss`` (nats:
        summed, or ``loss[i][j][k]`` per completion with ``do_target_loss_sum=False``), ``norm``,
        ``vec_history`` (with ``return_vec_history``: ``[vector, (left, right)]`` numpy arrays after every
        step), ``loss_history``, ``status``, and the output-constrained phase's ``output_constr_iters``,
        ``constraints_satisfied``, ``norm_before_output_constr``. See
        :attr:`steering_opt.loop.OptimizeResult.info`.
    """
    opt = adapt.check_reference_flags("optimize_vector", model, use_transformer_lens, return_info=return_info,
                                      return_loss_history=return_loss_history)
    loss_f, pre_f = adapt.custom_funcs(custom_output_constr_loss_func, custom_output_constr_pre_loss_func,
                                       datapoints=datapoints, layer=layer, only_hook_prompt=only_hook_prompt)
    result = opt(model, tokenizer, datapoints, layer, custom_output_constr_loss_func=loss_f,
                 custom_output_constr_pre_loss_func=pre_f, **adapt.option_kwargs(locals()))
    return adapt.reference_tuple(result, return_info=return_info, do_target_loss_sum=do_target_loss_sum,
                                 return_loss_history=return_loss_history)


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
    use_transformer_lens: bool = False,
    target_loss: float | None = None,
    return_info: bool = True,
    do_target_loss_sum: bool = True,
    return_loss_history: bool = False,
    return_vec_history: bool = False,
    target_loss_target_iters: int = 1,
    satisfice: bool = False,
    do_one_minus: bool = True,
    max_norm: float | None = None,
    starting_norm: float = 1.0,
    noise_scale: float | None = None,
    do_tangent_space_noise: bool = True,
    do_noise_abl_relu: bool = False,
    noise_iters: int = 1,
    do_antipgd: bool = False,
    regularization_weight: float = 0.0,
    regularization_type: str = "l1",
    sparsity_weight: float = 0.0,
    entropy_weight: float = 0.0,
    debug: bool = False,
    seed: int | None = None,
    engine: str = "fast",
    max_batch_tokens: int = 16384,
    progress: bool | None = None,
) -> tuple[Any, ...]:
    """Jointly optimise one vector per layer in ``layers`` (the llm-steering-opt tutorial's
    ``optimize_vectors``; its published code has no such function, so after ``layers`` every argument is
    keyword-only, with ``optimize_vector``'s names and meanings).

    Objective (nats): the completion losses plus ``regularization_weight · Σ_l R(v_l)`` (``R`` = L1 or
    max-abs), ``sparsity_weight · Σ_l ‖v_l‖₂`` and ``entropy_weight · H(softmax(‖v_1‖, …, ‖v_L‖))``.

    Returns:
        ``({layer: vector (d,)}, info)`` (``({layer: vector},)`` with ``return_info=False``), with
        ``info['norms'][layer]``, ``iters``, ``loss`` (the completion loss without regularisers),
        ``loss_history``, ``status``.
    """
    opt = adapt.check_reference_flags("optimize_vectors", model, use_transformer_lens, return_info=return_info,
                                      return_loss_history=return_loss_history)
    result = opt(model, tokenizer, datapoints, layers, per_layer=True,
                      **adapt.option_kwargs(locals()))
    return adapt.reference_tuple(result, return_info=return_info, do_target_loss_sum=do_target_loss_sum,
                                 return_loss_history=return_loss_history, per_layer=True)


def optimize_vector_minibatch_hf(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layer: int | Sequence[int],
    src_completions: Sequence[str] | None = None,
    dst_completions: Sequence[str] | None = None,
    minibatch_size: int = 5,
    eps: float = 1e-6,
    lr: float = 0.01,
    max_iters: int | None = None,
    coldness: float = 0.7,
    target_loss: float | None = None,
    target_loss_target_iters: int = 1,
    satisfice: bool = False,
    starting_norm: float = 1.0,
    max_norm: float | None = None,
    affine_rank: int | None = None,
    max_affine_norm: float | None = 2.0,
    debug: bool = False,
    return_info: bool = True,
    vector_clamp: float | None = None,
    *,
    do_one_minus: bool = True,
    normalize_token_length: bool = False,
    seed: int | None = None,
    engine: str = "fast",
    progress: bool | None = None,
    distributed: Any = None,
) -> tuple[Any, ...]:
    """Optimise one vector over many prompts sharing the same completions, in minibatches
    (llm-steering-opt's ``optimize_vector_minibatch_hf``: its parameters, in its order).

    Step ``i`` uses the ``i``-th block of ``minibatch_size`` prompts (cycling in order; the last block of
    an epoch may be shorter), so every prompt is used once per epoch. As in the reference, the loss is the
    mean over the minibatch's (prompt, completion) pairs: ``info['loss']`` (the current minibatch's, at
    the last evaluation), ``loss_history`` and ``target_loss`` are on that scale; the gradient is the
    sum's. ``satisfice`` minimises ``(loss - target_loss)²`` per (prompt, completion). Padding is handled
    internally (the tokenizer's padding side does not matter). Keyword-only additions: ``do_one_minus``,
    ``normalize_token_length``, ``seed``, ``engine``, ``progress`` and ``distributed`` (data parallelism
    over processes; ``None`` = automatic under ``accelerate launch`` / ``torchrun``; see
    :mod:`steering_opt.parallel`).

    Returns ``(vector, info)``, ``(vector, matrix, info)`` with ``affine_rank``; without ``info`` when
    ``return_info=False``. ``info``: ``iters``, ``loss``, ``norm``, ``loss_history``, ``status``.
    """
    validate.model(model)
    validate.tokenizer(tokenizer)
    validate.boolean("return_info", return_info)
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
    result = optimize(model, tokenizer, dps, layer, minibatch_size=minibatch_size, distributed=distributed,
                      loss_reduction="mean", **adapt.option_kwargs(locals()))
    info = {"iters": result.iters, "loss": result.loss_history[-1] if result.loss_history else math.nan,
            "loss_history": result.loss_history, "status": result.status, "norm": result.norm,
            "loss_units": "nats (mean per prompt and completion)"}
    if "processes" in result.extra:
        info["processes"] = result.extra["processes"]
    out: tuple[Any, ...] = (result.vector,)
    if affine_rank is not None:
        out += (result.matrix,)
    return out + (info,) if return_info else out
