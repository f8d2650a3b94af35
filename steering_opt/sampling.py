"""Completion log-probabilities and a beam search for the most likely completions (llm-steering-opt's
``get_completion_logprob(_hf)`` and ``sample_most_likely_completions_hf``, with its parameter order).

Both run whatever hooks are active on the model (e.g. inside ``SteeringVector.apply`` or
``hf_hooks_contextmanager``), so they measure the steered model when called under steering. Both accept
HuggingFace causal LMs (with their tokenizer) and TransformerLens ``HookedTransformer`` models (their own
``to_tokens``); the latter are recognised by their ``to_tokens`` / ``cfg`` / ``blocks`` attributes.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import arch, validate
from .data import check_chars_fit, encode
from .engine import log1mexp
from .hooks import frozen_model


def is_hooked_transformer(model: Any) -> bool:
    """Whether ``model`` looks like a TransformerLens ``HookedTransformer`` (``to_tokens``, ``cfg``, ``blocks``)."""
    return all(hasattr(model, a) for a in ("to_tokens", "cfg", "blocks"))


def _check_transformer_lens(model: nn.Module, use_transformer_lens: bool | None) -> bool:
    """Resolve ``use_transformer_lens`` (None: detect) against the model actually passed."""
    tl = is_hooked_transformer(model)
    if use_transformer_lens is None:
        return tl
    if not isinstance(use_transformer_lens, bool):
        raise TypeError(f"`use_transformer_lens` must be True, False or None (detect), got {use_transformer_lens!r}")
    if use_transformer_lens and not tl:
        raise TypeError(f"`use_transformer_lens=True` needs a TransformerLens HookedTransformer, got "
                        f"{type(model).__name__}; pass use_transformer_lens=False (and tokenizer=) for a "
                        "HuggingFace model")
    if not use_transformer_lens and tl:
        raise TypeError("`use_transformer_lens=False` but `model` is a TransformerLens HookedTransformer; pass "
                        "use_transformer_lens=True (or leave it None)")
    return use_transformer_lens


def _tokens(model: nn.Module, tokenizer: Any, text: str, *, special: bool, tl: bool) -> list[int]:
    if tl:  # TransformerLens: its own tokenizer; BOS for prompts as model.to_tokens(prompt) adds it
        prepend_bos = None if special else False  # None: the model's default (cfg.default_prepend_bos)
        return model.to_tokens(text, prepend_bos=prepend_bos)[0].tolist()  # type: ignore[operator]
    if tokenizer is None:
        raise ValueError("`tokenizer` is required for HuggingFace models (pass tokenizer=...)")
    return encode(tokenizer, text, special=special)


def _logits(model: nn.Module, ids: torch.Tensor, tl: bool, model_kwargs: dict[str, Any]) -> torch.Tensor:
    if tl:
        return model(ids, **model_kwargs)
    out = model(input_ids=ids, **{"use_cache": False, **model_kwargs})
    return out.logits if hasattr(out, "logits") else out


def _check_fits(model: nn.Module, tl: bool, n_tokens: int, what: str) -> None:
    if tl:
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
        if isinstance(n_ctx, int) and n_tokens > n_ctx:
            raise ValueError(f"{what} is {n_tokens} tokens, longer than the model's context ({n_ctx} tokens)")
    elif hasattr(model, "config"):
        arch.check_context_length(model, n_tokens, what)


def _coldness(coldness: float | None, temperature: float | None) -> float:
    """``coldness`` (default 1), or ``temperature``: the older name of the same multiplier."""
    if temperature is not None:
        if coldness is not None and coldness != temperature:
            raise ValueError(f"`temperature` is the older name of `coldness`: pass one of them, got coldness="
                             f"{coldness!r} and temperature={temperature!r}")
        coldness = temperature
    coldness = 1.0 if coldness is None else coldness
    validate.positive("coldness", coldness, allow_none=False)
    return coldness


def get_completion_logprob(
    model: nn.Module,
    prompt: str,
    completion: str,
    tokenizer: Any = None,
    coldness: float | None = None,
    return_all_probs: bool = False,
    do_one_minus: bool = False,
    do_log: bool = True,
    eps: float = 0.0,
    use_transformer_lens: bool | None = None,
    *,
    temperature: float | None = None,
    **kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, list[float]]:
    """Log-probability (nats) of ``completion`` after ``prompt``: ``Σ_t log p_t`` (llm-steering-opt's
    ``get_completion_logprob``, same parameters in the same order).

    ``p_t = softmax(coldness · logits)[y_t]`` at the position predicting completion token ``y_t``. Prompt
    and completion are tokenised separately (as in training), so the split is exact.

    Differentiable: the result carries gradients to whatever the forward depends on that requires grad
    (e.g. a steering vector in an active hook), so a custom loop can backpropagate through it. The model's
    own weights are frozen (and the model in eval mode) for the call and restored afterwards, so no
    gradient is accumulated into them.

    Args:
        model: a HuggingFace causal LM, or a TransformerLens ``HookedTransformer``.
        prompt, completion: non-empty strings.
        tokenizer: the model's tokenizer (required for HuggingFace models; TransformerLens models use theirs).
        coldness: inverse temperature (default 1). ``temperature=`` is the older name of the same number.
        return_all_probs: also return the per-token values (a list of floats).
        do_one_minus: use ``1 - p_t`` instead of ``p_t`` (``Σ_t log(1 - p_t)``: minus the suppression loss).
        do_log: ``True``: sum of logs (nats); ``False``: the product of the (per-token) probabilities.
        eps: added inside the log, ``log(p_t + eps)`` (only with ``do_log``), as in the reference.
        use_transformer_lens: ``None`` (detect from the model), ``True`` (must be a HookedTransformer) or
            ``False`` (a HuggingFace model).
        **kwargs: passed to the model's forward.

    Returns:
        A 0-d float32 tensor, or ``(tensor, per-token values)`` with ``return_all_probs``.
    """
    coldness = _coldness(coldness, temperature)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    tl = _check_transformer_lens(model, use_transformer_lens)
    validate.text("prompt", prompt)
    validate.text("completion", completion)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"`eps` must be a finite number >= 0, got {eps!r}")
    if not tl and hasattr(model, "config"):  # refuse a text that cannot fit before tokenising it
        check_chars_fit(tokenizer, len(prompt) + len(completion), arch.context_length(model),
                        "`prompt` + `completion`")
    p_ids = _tokens(model, tokenizer, prompt, special=True, tl=tl)
    c_ids = _tokens(model, tokenizer, completion, special=False, tl=tl)
    if not p_ids:
        raise ValueError(f"`prompt` {prompt[:30]!r} tokenises to zero tokens")
    if not c_ids:
        raise ValueError("`completion` tokenises to zero tokens")
    _check_fits(model, tl, len(p_ids) + len(c_ids), "`prompt` + `completion`")
    ids = torch.tensor([p_ids + c_ids], device=arch.input_device(model))
    with frozen_model(model):
        logits = _logits(model, ids, tl, kwargs)[0, len(p_ids) - 1: -1]
    lp = torch.log_softmax(logits.float() * coldness, dim=-1).gather(
        -1, torch.tensor(c_ids, device=logits.device)[:, None])[:, 0]
    if do_one_minus:
        lp = log1mexp(lp)
    if not do_log:
        per = lp.exp()
        total = per.prod()
    else:
        per = torch.logaddexp(lp, torch.tensor(math.log(eps), device=lp.device)) if eps > 0 else lp
        total = per.sum()
    return (total, per.tolist()) if return_all_probs else total


def get_completion_logprob_hf(model: nn.Module, prompt: str, completion: str, tokenizer: Any,
                              **kwargs: Any) -> Any:
    """:func:`get_completion_logprob` for HuggingFace models (tokenizer required), as in llm-steering-opt."""
    if tokenizer is None:
        raise ValueError("`tokenizer` is required")
    if kwargs.pop("use_transformer_lens", False):
        raise TypeError("get_completion_logprob_hf is for HuggingFace models: `use_transformer_lens` must be False")
    return get_completion_logprob(model, prompt, completion, tokenizer, use_transformer_lens=False, **kwargs)


@torch.no_grad()
def sample_most_likely_completions_hf(
    model: nn.Module,
    tokenizer: Any,
    dst_prompt: str,
    src_prompt: str | None = None,
    k: int = 5,
    iters: int = 5,
    coldness: float | None = None,
    do_one_minus: bool = False,
    gc_interval: int | None = 3,
    use_total_probs: bool = False,
    reverse: bool = False,
    return_log_probs: bool = False,
    return_token_probs: bool = True,
    *,
    temperature: float | None = None,
    **kwargs: Any,
) -> tuple[list[str], np.ndarray]:
    """Beam search for the ``k`` completions of ``iters + 1`` tokens that are most likely after
    ``dst_prompt`` (or, with ``src_prompt``, whose next-token probability most exceeds that after
    ``src_prompt``; ``reverse`` flips the sign). llm-steering-opt's function, same parameters in the same
    order.

    Beams are kept as token ids (never re-tokenised), so they always have the same token length.

    Args:
        coldness: inverse temperature of the next-token softmax (default 1; ``temperature=`` is its older
            name).
        do_one_minus: rank and report ``1 - p`` instead of each next-token probability ``p`` (so the least
            likely continuations come first; with ``src_prompt`` it amounts to ``reverse``).
        gc_interval: run the garbage collector (and empty the CUDA cache) every ``gc_interval`` tokens;
            ``None``: never.
        use_total_probs: rank candidates by the product of their beam's probabilities so far times the
            next token's (instead of the next token's alone).
        return_log_probs: return natural logs of the probabilities.
        return_token_probs: per-token values (``False``: their product, or sum of logs, per completion).
        **kwargs: passed to the model's forward.

    Returns:
        ``(completions, probs)``: ``k`` decoded strings and an array ``(k, iters + 1)`` of per-token
        probability (differences) — log-probabilities with ``return_log_probs``; summed / multiplied
        over tokens (shape ``(k,)``) when ``return_token_probs=False``.
    """
    coldness = _coldness(coldness, temperature)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1, got {k!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"`iters` must be an int >= 0, got {iters!r}")
    if gc_interval is not None and (isinstance(gc_interval, bool) or not isinstance(gc_interval, int)
                                    or gc_interval < 1):
        raise ValueError(f"`gc_interval` must be an int >= 1 or None, got {gc_interval!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"`tokenizer` must be the model's HuggingFace tokenizer, got {type(tokenizer).__name__}")
    validate.text("dst_prompt", dst_prompt)
    if src_prompt is not None:
        validate.text("src_prompt", src_prompt)
    for name, text in (("dst_prompt", dst_prompt), ("src_prompt", src_prompt or "")):
        check_chars_fit(tokenizer, len(text), arch.context_length(model), f"`{name}`")
    dev = arch.input_device(model)
    dst = encode(tokenizer, dst_prompt, special=True)
    src = encode(tokenizer, src_prompt, special=True) if src_prompt is not None else None
    for name, ids in (("dst_prompt", dst), ("src_prompt", src)):
        if ids is not None:
            if not ids:
                raise ValueError(f"`{name}` tokenises to zero tokens")
            arch.check_context_length(model, len(ids) + iters + 1, f"`{name}` + {iters + 1} sampled tokens")
    beams: list[list[int]] = [[]]
    beam_probs: list[list[float]] = [[]]

    def next_probs(prefix: list[int], beams_: Sequence[list[int]]) -> torch.Tensor:
        ids = torch.tensor([prefix + b for b in beams_], device=dev)
        p = torch.softmax(_logits(model, ids, False, kwargs)[:, -1].float() * coldness, dim=-1)
        return 1 - p if do_one_minus else p

    for step in range(iters + 1):
        diffs = next_probs(dst, beams)
        if src is not None:
            diffs = diffs - next_probs(src, beams)
        if reverse:
            diffs = -diffs
        if use_total_probs:
            prior = torch.tensor([float(np.prod(p)) if p else 1.0 for p in beam_probs], device=diffs.device)
            score = diffs * prior[:, None]
        else:
            score = diffs
        top = torch.topk(score.flatten(), k=min(k, score.numel()))
        rows, toks = np.unravel_index(top.indices.cpu().numpy(), score.shape)
        beams = [beams[r] + [int(t)] for r, t in zip(rows, toks)]
        beam_probs = [beam_probs[r] + [float(diffs[r, t])] for r, t in zip(rows, toks)]
        if gc_interval is not None and (step + 1) % gc_interval == 0:
            gc.collect()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
    completions = tokenizer.batch_decode(beams)
    probs = np.array(beam_probs, dtype=np.float64)
    if return_log_probs:
        probs = np.log(probs)
        if not return_token_probs:
            probs = probs.sum(-1)
    elif not return_token_probs:
        probs = probs.prod(-1)
    return completions, probs
