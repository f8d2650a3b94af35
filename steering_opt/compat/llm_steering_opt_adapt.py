"""Translation between llm-steering-opt's optimiser calls and :func:`steering_opt.optimize.optimize`.

The functions with the reference's names (:mod:`steering_opt.compat.llm_steering_opt`, and the older
names of :mod:`steering_opt.compat.llm_steering_opt_legacy`) only collect their arguments; this module
checks the reference-only ones, adapts custom output-constraint functions written to the reference's
signature, and shapes the result as the reference's tuple.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import validate
from ..loop import OptimizeResult
from ..optimize import optimize
from ..options import OptimizeOptions
from ..parameterization import Affine, Steering
from ..sampling import is_hooked_transformer

__all__ = ["check_reference_flags", "custom_funcs", "option_kwargs", "reference_tuple", "unwrap"]


def check_reference_flags(fn: str, model: nn.Module, use_transformer_lens: Any,
                          **flags: Any) -> Callable[..., OptimizeResult]:
    """Check ``use_transformer_lens`` against the model and the reference-only flags ``flags`` (bools), before
    any model work; return the optimiser to call as ``opt(model, tokenizer, datapoints, layer, **kw)``:
    :func:`~steering_opt.optimize.optimize`, or for a TransformerLens ``HookedTransformer``
    (``use_transformer_lens=True``) :func:`~steering_opt.compat.transformer_lens.optimize_hooked_transformer`
    (steering at ``blocks.{layer}.hook_resid_pre``)."""
    validate.boolean("use_transformer_lens", use_transformer_lens)
    for name, value in flags.items():
        validate.boolean(name, value)
    tl = is_hooked_transformer(model)
    if use_transformer_lens and not tl:
        raise TypeError(f"{fn}: `use_transformer_lens=True` needs a TransformerLens HookedTransformer, got "
                        f"{type(model).__name__}; pass use_transformer_lens=False and tokenizer= for a HuggingFace "
                        "model")
    if tl and not use_transformer_lens:
        raise TypeError(f"{fn}: `model` is a TransformerLens HookedTransformer: pass use_transformer_lens=True")
    if not tl:
        return optimize
    from .transformer_lens import optimize_hooked_transformer

    def opt(model: nn.Module, tokenizer: Any, datapoints: Any, layer: Any, **kw: Any) -> OptimizeResult:
        return optimize_hooked_transformer(model, datapoints, layer, tokenizer=tokenizer, **kw)

    return opt


def option_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` (e.g. a function's ``locals()``) that are :class:`OptimizeOptions` fields, with
    the reference's stopping rule: no plateau stop (``plateau_patience=None``) unless ``values`` sets one."""
    names = set(OptimizeOptions.field_names())
    return {"plateau_patience": None, **{k: v for k, v in values.items() if k in names}}


def unwrap(model: nn.Module) -> nn.Module:
    """The HookedTransformer behind the core's TransformerLens wrapper (any other model unchanged)."""
    inner = getattr(model, "tl", None)
    return inner if inner is not None and is_hooked_transformer(inner) else model


def _uses_reference_signature(fn: Callable[..., Any]) -> bool:
    """Core-style functions take ``(model, tokenizer, datapoints, layers, steering, ...)``; anything else is
    called as the reference calls it."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    return not (len(params) >= 2 and params[1].name == "tokenizer")


def custom_funcs(loss_func: Callable[..., Any] | None, pre_loss_func: Callable[..., Any] | None, *,
                 datapoints: Sequence[Any], layer: Any, only_hook_prompt: bool
                 ) -> tuple[Callable[..., torch.Tensor] | None, Callable[..., dict] | None]:
    """The output-constrained phase's custom objective in the core's form.

    Functions written to the reference's signature are called with the reference's arguments:
    ``pre_loss_func(model, datapoints, layer, vector, matrix_left, matrix_right, only_hook_prompt=...)``
    (returning a dict) and ``loss_func(model, datapoints, layer, vector, matrix_left, matrix_right,
    only_hook_prompt=..., **pre)``, where ``datapoints`` and ``layer`` are the caller's arguments, ``vector``
    the vector being optimised (a leaf tensor requiring grad) and ``matrix_left`` / ``matrix_right`` the
    ``(r, d)`` affine factors (None without ``affine_rank``). ``loss_func`` returns a differentiable scalar
    tensor, or a number after running its own ``backward()`` (as the reference's MELBO functions do).
    Functions whose second parameter is named ``tokenizer`` use the core's signature and pass through.
    """
    for name, f in (("custom_output_constr_loss_func", loss_func),
                    ("custom_output_constr_pre_loss_func", pre_loss_func)):
        if f is not None and not callable(f):
            raise TypeError(f"`{name}` must be a function or None, got {type(f).__name__}")

    def reference_args(steering: dict[int, Steering], layers: list[int]) -> tuple[Any, ...]:
        p = steering[layers[0]]
        left = p.left if isinstance(p, Affine) else None
        right = p.right if isinstance(p, Affine) else None
        return p.vector, left, right

    loss_out: Callable[..., torch.Tensor] | None = loss_func
    if loss_func is not None and _uses_reference_signature(loss_func):
        user_loss = loss_func

        def loss_out(model: nn.Module, tokenizer: Any, dps: Any, layers: list[int], steering: dict[int, Steering],
                     **pre: Any) -> torch.Tensor:
            out = user_loss(unwrap(model), datapoints, layer, *reference_args(steering, layers),
                            only_hook_prompt=only_hook_prompt, **pre)
            if isinstance(out, torch.Tensor):
                return out.reshape(())
            return torch.tensor(float(out))  # it ran its own backward: the value is only reported

    pre_out: Callable[..., dict] | None = pre_loss_func
    if pre_loss_func is not None and _uses_reference_signature(pre_loss_func):
        user_pre = pre_loss_func

        def pre_out(model: nn.Module, tokenizer: Any, dps: Any, layers: list[int],
                    steering: dict[int, Steering]) -> dict:
            return user_pre(unwrap(model), datapoints, layer, *reference_args(steering, layers),
                            only_hook_prompt=only_hook_prompt) or {}

    return loss_out, pre_out


def reference_tuple(result: OptimizeResult, *, return_info: bool, do_target_loss_sum: bool = True,
                    return_loss_history: bool = False, per_layer: bool = False) -> tuple[Any, ...]:
    """The reference's return value: ``(vector,)`` (``{layer: vector}`` for one vector per layer), then the
    dense ``(d, d)`` affine matrix with ``affine_rank``, then ``info`` when ``return_info``.

    ``info['loss']``: the summed loss, or with ``do_target_loss_sum=False`` the per-completion losses
    ``[datapoint][0 src / 1 dst][completion]`` — or, with ``return_loss_history=True``, the list of
    losses at every evaluation (as the reference returns then)."""
    validate.boolean("return_info", return_info)
    validate.boolean("return_loss_history", return_loss_history)
    out: tuple[Any, ...] = (result.vectors,) if per_layer else (result.vector,)
    if not per_layer and isinstance(result.steering[result.layers[0]], Affine):
        out += (result.matrix,)
    if return_info:
        info = result.info
        if not do_target_loss_sum and return_loss_history:
            info["loss"] = list(result.loss_history)
        out += (info,)
    return out
