"""TransformerLens support: a ``HookedTransformer`` seen through the HuggingFace causal-LM interface the core uses.

llm-steering-opt's ``use_transformer_lens=True`` paths steer ``blocks.{layer}.hook_resid_pre``: the residual
stream entering block ``layer``. :class:`HookedTransformerLM` exposes the same model with ``config``,
``input_ids=`` forwards returning ``.logits`` and its blocks as the decoder blocks, so the core's
``decoder_block`` site (a forward pre-hook on block ``layer``) is exactly that hook point, and the core
optimiser, hooks and MELBO objective run on it unchanged. :class:`TransformerLensTokenizer` tokenises
like ``model.to_tokens`` (BOS on prompts by the model's default, none on completions).

Requires the optional ``transformer_lens`` package (``pip install steering-opt[tl]``; TransformerLens < 4,
which still has ``HookedTransformer``); this module never imports it itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from ..data import TrainingDatapoint
from ..loop import OptimizeResult
from ..optimize import optimize
from ..options import OptimizeOptions
from ..sampling import is_hooked_transformer

__all__ = ["HookedTransformerLM", "TransformerLensTokenizer", "as_causal_lm", "optimize_hooked_transformer", "unwrap"]


class TransformerLensTokenizer:
    """A HuggingFace-tokenizer-shaped view of a HookedTransformer's ``to_tokens``: ``tok(text,
    add_special_tokens=True)["input_ids"]`` is ``model.to_tokens(text)[0]`` (BOS by the model's default) and
    with ``add_special_tokens=False`` ``model.to_tokens(text, prepend_bos=False)[0]``."""

    def __init__(self, model: Any):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("the HookedTransformer has no tokenizer: build it with tokenizer=... or call "
                             "model.set_tokenizer(tokenizer)")
        self.model = model

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> dict[str, list[int]]:
        ids = self.model.to_tokens(text, prepend_bos=None if add_special_tokens else False)
        return {"input_ids": ids[0].tolist()}

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return self.model.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        return self.model.tokenizer.batch_decode(ids, **kwargs)


class HookedTransformerLM(nn.Module):
    """A TransformerLens ``HookedTransformer`` (``.tl``) behind the HuggingFace causal-LM interface.

    ``forward(input_ids, attention_mask=None, position_ids=None, use_cache=False)`` returns an object with
    ``.logits`` ``(batch, seq, d_vocab)``; ``config`` has ``hidden_size`` (``cfg.d_model``),
    ``num_hidden_layers`` and ``max_position_embeddings`` (``cfg.n_ctx``); the decoder blocks are ``tl.blocks``,
    so a pre-hook on block ``L`` acts on ``blocks.L.hook_resid_pre``. No weights are copied.
    """

    def __init__(self, model: nn.Module):
        if not is_hooked_transformer(model):
            raise TypeError(f"`model` must be a TransformerLens HookedTransformer, got {type(model).__name__}")
        super().__init__()
        self.tl = model
        cfg: Any = model.cfg  # a HookedTransformerConfig
        self.config = SimpleNamespace(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                                      max_position_embeddings=cfg.n_ctx, model_type="transformer_lens")

    def get_input_embeddings(self) -> nn.Module:
        return self.tl.embed  # type: ignore[return-value]  # a TransformerLens Embed module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool = False, **kwargs: Any) -> CausalLMOutput:
        """Logits of ``input_ids`` ``(batch, seq)``. Positions are always ``0..seq-1`` (TransformerLens adds its
        own positional information), so ``position_ids`` must be ``None`` or exactly that."""
        if position_ids is not None:
            expected = torch.arange(input_ids.shape[1], device=position_ids.device).expand_as(position_ids)
            if not torch.equal(position_ids, expected):
                raise ValueError("HookedTransformerLM: `position_ids` other than 0..seq-1 are not supported "
                                 "(TransformerLens computes positions itself)")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"HookedTransformerLM: `attention_mask` must be a (batch, seq) padding mask, got shape "
                             f"{tuple(attention_mask.shape)}")
        logits = self.tl(input_ids, return_type="logits", attention_mask=attention_mask, **kwargs)
        return CausalLMOutput(logits=logits)


def as_causal_lm(model: nn.Module, tokenizer: Any = None) -> tuple[HookedTransformerLM, Any]:
    """``(HookedTransformerLM(model), tokenizer)`` for the core functions (``optimize``, ``target_activations``,
    hooks): ``tokenizer`` defaults to a :class:`TransformerLensTokenizer` (``model.to_tokens``). An already
    wrapped model is returned as it is."""
    lm = model if isinstance(model, HookedTransformerLM) else HookedTransformerLM(model)
    return lm, tokenizer if tokenizer is not None else TransformerLensTokenizer(lm.tl)


def unwrap(model: nn.Module) -> nn.Module:
    """The HookedTransformer behind a :class:`HookedTransformerLM` (any other model unchanged)."""
    return model.tl if isinstance(model, HookedTransformerLM) else model


def optimize_hooked_transformer(
    model: nn.Module,
    datapoints: Sequence[TrainingDatapoint] | TrainingDatapoint,
    layer: int | Sequence[int],
    options: OptimizeOptions | None = None,
    *,
    tokenizer: Any = None,
    **kwargs: Any,
) -> OptimizeResult:
    """:func:`steering_opt.optimize.optimize` on a TransformerLens ``HookedTransformer``: steering at
    ``blocks.{layer}.hook_resid_pre`` (what llm-steering-opt's ``optimize_vector(..., use_transformer_lens=True)``
    optimises).

    The route for ``use_transformer_lens=True``: pass the HookedTransformer as ``model`` and everything else
    as for ``optimize`` (``options`` / keyword overrides, ``per_layer``, ``custom_output_constr_*_func``...).
    ``tokenizer`` defaults to ``model.to_tokens`` (:class:`TransformerLensTokenizer`). The loss is computed by
    the ``"reference"`` engine (one forward per completion; the fast engine needs HuggingFace internals), so
    ``engine`` is set to ``"reference"`` whatever is passed. Custom output-constraint functions receive the
    :class:`HookedTransformerLM` as ``model`` (:func:`unwrap` gives the HookedTransformer back).

    Returns:
        The :class:`~steering_opt.loop.OptimizeResult` (vectors of size ``cfg.d_model``). The model is left
        exactly as it was.
    """
    lm, tok = as_causal_lm(model, tokenizer)
    kwargs["engine"] = "reference"  # overrides `options.engine` too
    return optimize(lm, tok, datapoints, layer, options, **kwargs)
