"""The older llm-steering-opt names used by the paper's experiments (one-shot-steering-repro):
``optimize_completion`` and ``optimize_minibatch_completion_hf``, as deprecated aliases.

Each warns once per process (``DeprecationWarning``) and calls the current function
(:func:`~steering_opt.compat.llm_steering_opt.optimize_vector` /
:func:`~steering_opt.compat.llm_steering_opt.optimize_vector_minibatch_hf`) with the older names
translated: ``temperature`` is ``coldness``, ``do_target_loss_avg`` is ``do_target_loss_sum`` (the older
name for the same switch), ``return_loss`` is ``return_info``, and ``do_abl_hook=True`` with
``abl_hook_coeff=c`` is clamp steering (``vector_clamp=c``). The parameters keep the older order and
defaults (``use_transformer_lens=True``, ``return_loss=False`` and ``debug=True`` for
``optimize_completion``; ``max_affine_norm=None``, ``debug=True``, ``return_loss=True`` for the minibatch
function). ``target_loss_max_loss`` is accepted and, as in the paper's code, has no effect.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .. import validate
from ..data import TrainingDatapoint
from .llm_steering_opt import optimize_vector, optimize_vector_minibatch_hf

__all__ = ["optimize_completion", "optimize_minibatch_completion_hf", "warned"]

#: Names that have already warned in this process (clear it to warn again).
warned: set[str] = set()


def _deprecated(old: str, new: str) -> None:
    if old not in warned:
        warned.add(old)
        warnings.warn(f"`{old}` is the older llm-steering-opt name of `{new}` and is deprecated; call `{new}` "
                      f"(see its documentation for the renamed arguments)", DeprecationWarning, stacklevel=3)


def optimize_completion(
    model: nn.Module,
    datapoints: Sequence[TrainingDatapoint],
    layer: int | Sequence[int],
    eps: float = 1e-6,
    lr: float = 0.01,
    max_iters: int | None = None,
    temperature: float = 0.7,
    normalize_token_length: bool = False,
    only_hook_prompt: bool = False,
    use_transformer_lens: bool = True,
    tokenizer: Any = None,
    target_loss: float | None = None,
    return_loss: bool = False,
    do_target_loss_avg: bool = True,
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
    do_output_constr: bool = False,
    custom_output_constr_loss_func: Callable[..., Any] | None = None,
    custom_output_constr_pre_loss_func: Callable[..., dict] | None = None,
    output_constr_norm_initial_scale: float = 1.0,
    output_constr_lr: float | None = None,
    debug: bool = True,
    noise_scale: float | None = None,
    do_tangent_space_noise: bool = True,
    do_noise_abl_relu: bool = False,
    noise_iters: int = 1,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """Deprecated: the older name of ``optimize_vector`` (same meaning; see the module docstring for the
    renamed arguments). Returns ``(vector,)`` (``(vector, matrix)`` with ``affine_rank``), plus ``info``
    when ``return_loss=True``. Further keywords (``seed``, ``engine``, ...) go to ``optimize_vector``."""
    _deprecated("optimize_completion", "optimize_vector")
    validate.boolean("do_target_loss_avg", do_target_loss_avg)
    return optimize_vector(
        model, datapoints, layer, eps=eps, lr=lr, max_iters=max_iters, coldness=temperature,
        normalize_token_length=normalize_token_length, only_hook_prompt=only_hook_prompt,
        use_transformer_lens=use_transformer_lens, tokenizer=tokenizer, target_loss=target_loss,
        return_info=return_loss, do_target_loss_sum=do_target_loss_avg, return_loss_history=return_loss_history,
        return_vec_history=return_vec_history, target_loss_target_iters=target_loss_target_iters,
        satisfice=satisfice, do_one_minus=do_one_minus, max_norm=max_norm, starting_norm=starting_norm,
        starting_vec=starting_vec, vector_clamp=vector_clamp, affine_rank=affine_rank,
        max_affine_norm=max_affine_norm, starting_affine_norm=starting_affine_norm, noise_scale=noise_scale,
        do_tangent_space_noise=do_tangent_space_noise, do_noise_abl_relu=do_noise_abl_relu, noise_iters=noise_iters,
        do_output_constr=do_output_constr, custom_output_constr_loss_func=custom_output_constr_loss_func,
        custom_output_constr_pre_loss_func=custom_output_constr_pre_loss_func,
        output_constr_norm_initial_scale=output_constr_norm_initial_scale, output_constr_lr=output_constr_lr,
        debug=debug, **kwargs)


def optimize_minibatch_completion_hf(
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
    temperature: float = 0.7,
    target_loss: float | None = None,
    target_loss_target_iters: int = 1,
    satisfice: bool = False,
    target_loss_max_loss: bool = True,
    starting_norm: float = 1.0,
    max_norm: float | None = None,
    affine_rank: int | None = None,
    max_affine_norm: float | None = None,
    debug: bool = True,
    return_loss: bool = True,
    do_abl_hook: bool = False,
    abl_hook_coeff: float = 2.0,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """Deprecated: the older name of ``optimize_vector_minibatch_hf`` (``do_abl_hook=True`` is clamp
    steering with coefficient ``abl_hook_coeff``). Returns ``(vector, info)`` (``info`` only with
    ``return_loss=True``; the matrix after the vector with ``affine_rank``)."""
    _deprecated("optimize_minibatch_completion_hf", "optimize_vector_minibatch_hf")
    validate.boolean("target_loss_max_loss", target_loss_max_loss)
    validate.boolean("do_abl_hook", do_abl_hook)
    return optimize_vector_minibatch_hf(
        model, tokenizer, prompts, layer, src_completions, dst_completions, minibatch_size, eps=eps, lr=lr,
        max_iters=max_iters, coldness=temperature, target_loss=target_loss,
        target_loss_target_iters=target_loss_target_iters, satisfice=satisfice, starting_norm=starting_norm,
        max_norm=max_norm, affine_rank=affine_rank, max_affine_norm=max_affine_norm, debug=debug,
        return_info=return_loss, vector_clamp=abl_hook_coeff if do_abl_hook else None, **kwargs)
