"""llm-steering-opt's ``make_melbo_loss_funcs``: the MELBO objective with that library's function signatures.

The two functions it returns are called as llm-steering-opt's ``optimize_vector`` calls its
``custom_output_constr_pre_loss_func`` / ``custom_output_constr_loss_func``:
``pre(model, datapoints, layer, vector, matrix_left, matrix_right, only_hook_prompt=...)`` and
``loss(model, datapoints, layer, vector, matrix_left, matrix_right, only_hook_prompt=..., **pre(...))``.
The activations come from :func:`steering_opt.melbo.target_activations` (the core's MELBO objective,
:func:`steering_opt.melbo.make_melbo_objective`, uses the same function).

Differences from the reference, on purpose: HuggingFace models work too (pass ``tokenizer=`` to the factory;
the reference supports TransformerLens only); the loss function runs (the reference's reads an undefined
``vector_clamp`` and raises ``NameError``): it steers with ``v`` (+ the affine map), not a clamp;
``is_negative`` datapoints are steered with ``-v``; prompt and completion are tokenised separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..data import SRC, TrainingDatapoint
from ..hooks import frozen_model
from ..melbo import target_activations
from ..parameterization import Additive, Affine, Steering
from ..sampling import is_hooked_transformer

__all__ = ["make_melbo_loss_funcs"]

#: per datapoint ``[src activations, dst activations]``, each a list of ``(n_positions, d)`` tensors
TargetActivs = list[list[list[torch.Tensor]]]


def _layers(layer: int | Sequence[int]) -> list[int]:
    return [int(x) for x in layer] if isinstance(layer, Sequence) else [int(layer)]


def make_melbo_loss_funcs(
    target_layer: int, *, tokenizer: Any = None
) -> tuple[Callable[..., dict[str, TargetActivs]], Callable[..., float]]:
    """Make MELBO (www.lesswrong.com/posts/ioPnHKFyy4Cw2Gr2x) loss functions for the output-constrained
    phase of ``optimize_vector`` (llm-steering-opt's ``make_melbo_loss_funcs``, same signatures).

    Args:
        target_layer: the block whose input (``blocks.{target_layer}.hook_resid_pre``) is compared between the
            steered and the unsteered model.
        tokenizer: the tokenizer, for HuggingFace models (TransformerLens models use ``model.to_tokens``).

    Returns:
        ``(melbo_pre_loss_func, melbo_loss_func)``:

        * ``melbo_pre_loss_func(model, datapoints, layer, vector, matrix_left, matrix_right,
            only_hook_prompt=None)`` returns ``{"target_layer_activs": [[src, dst] per datapoint]}``: the
            unsteered activations ``(n_positions, d)`` of each completion from the last prompt token on.
        * ``melbo_loss_func(model, datapoints, layer, vector, matrix_left, matrix_right,
            target_layer_activs=None, only_hook_prompt=None, only_calculate_loss=False)`` returns the loss
            ``Σ_completions −mean_t ‖h_steered − h_unsteered‖`` as a float, and (unless
            ``only_calculate_loss``) has already backpropagated it into ``vector`` / the matrix factors, one
            datapoint at a time, as the reference does (the model's weights are frozen meanwhile: no
            gradient reaches them). Steering: ``v`` (plus ``x (leftᵀ right)ᵀ`` when the
            factors are given) at ``layer`` (an int or a list), on each datapoint's ``token`` positions (the
            prompt only with ``only_hook_prompt``). Without ``target_layer_activs`` it computes them first.
    """

    def resolve(model: nn.Module) -> tuple[nn.Module, Any]:
        from .transformer_lens import HookedTransformerLM, as_causal_lm  # HookedTransformer models only

        if isinstance(model, HookedTransformerLM) or is_hooked_transformer(model):
            return as_causal_lm(model)
        if tokenizer is None:
            raise ValueError("make_melbo_loss_funcs: a HuggingFace model needs its tokenizer: "
                             "make_melbo_loss_funcs(target_layer, tokenizer=tokenizer)")
        return model, tokenizer

    def grouped(dps: Sequence[TrainingDatapoint], acts: list) -> TargetActivs:
        out: TargetActivs = [[[], []] for _ in dps]
        for seq, a in acts:
            out[seq.datapoint][0 if seq.kind == SRC else 1].append(a)
        return out

    def melbo_pre_loss_func(model: nn.Module, datapoints: Sequence[TrainingDatapoint], layer: int | Sequence[int],
                            vector: torch.Tensor | None = None, matrix_left: torch.Tensor | None = None,
                            matrix_right: torch.Tensor | None = None, only_hook_prompt: bool | None = None
                            ) -> dict[str, TargetActivs]:
        m, tok = resolve(model)
        with torch.no_grad(), frozen_model(m):
            acts = target_activations(m, tok, datapoints, _layers(layer), None, target_layer,
                                      only_hook_prompt=bool(only_hook_prompt))
        return {"target_layer_activs": grouped(datapoints, [(s, a.detach()) for s, a in acts])}

    def melbo_loss_func(model: nn.Module, datapoints: Sequence[TrainingDatapoint], layer: int | Sequence[int],
                        vector: torch.Tensor, matrix_left: torch.Tensor | None = None,
                        matrix_right: torch.Tensor | None = None, target_layer_activs: TargetActivs | None = None,
                        only_hook_prompt: bool | None = None, only_calculate_loss: bool = False) -> float:
        m, tok = resolve(model)
        layers = _layers(layer)
        if target_layer_activs is None:
            target_layer_activs = melbo_pre_loss_func(model, datapoints, layer,
                                                      only_hook_prompt=only_hook_prompt)["target_layer_activs"]
        if len(target_layer_activs) != len(datapoints):
            raise ValueError(f"`target_layer_activs` has {len(target_layer_activs)} entries for {len(datapoints)} "
                             "datapoints (pass what melbo_pre_loss_func returned for the same datapoints)")
        steering: Steering = (Affine(vector, matrix_left, matrix_right)
                              if matrix_left is not None and matrix_right is not None else Additive(vector))
        total = 0.0
        for i, dp in enumerate(datapoints):  # one datapoint at a time: its graph is freed by its backward
            with torch.set_grad_enabled(not only_calculate_loss), frozen_model(m):
                acts = target_activations(m, tok, [dp], layers, {lay: steering for lay in layers}, target_layer,
                                          only_hook_prompt=bool(only_hook_prompt))
                loss = torch.zeros(())
                for seq, a in acts:
                    orig = target_layer_activs[i][0 if seq.kind == SRC else 1][seq.index]
                    loss = loss + -(a.float() - orig.to(a).float()).norm(dim=-1).mean().cpu()
            if not only_calculate_loss and loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
        return total

    return melbo_pre_loss_func, melbo_loss_func
