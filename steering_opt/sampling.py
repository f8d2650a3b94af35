"""Completion log-probabilities and a beam search for the most likely completions.

Both run whatever hooks are active on the model (e.g. inside ``SteeringVector.apply`` or
``hf_hooks_contextmanager``), so they measure the steered model when called under steering.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import arch, validate
from .data import encode
from .engine import log1mexp


def _tokens(model: nn.Module, tokenizer: Any, text: str, *, special: bool) -> list[int]:
    if tokenizer is not None:
        return encode(tokenizer, text, special=special)
    if hasattr(model, "to_tokens"):  # TransformerLens HookedTransformer
        return model.to_tokens(text, prepend_bos=special)[0].tolist()  # type: ignore[operator]  # not in nn.Module
    raise ValueError("`tokenizer` is required for HuggingFace models (pass tokenizer=...)")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids) if hasattr(model, "to_tokens") else model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def get_completion_logprob(
    model: nn.Module,
    prompt: str,
    completion: str,
    tokenizer: Any = None,
    *,
    coldness: float = 1.0,
    do_one_minus: bool = False,
    return_all_probs: bool = False,
    temperature: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, list[float]]:
    """Log-probability (nats) of ``completion`` after ``prompt``: ``Σ_t log p_t``.

    ``p_t = softmax(coldness · logits)[y_t]``; with ``do_one_minus=True`` returns ``Σ_t log(1 - p_t)``
    (the negative of the suppression loss). Prompt and completion are tokenised separately, exactly as
    in training. Works with HF models (pass ``tokenizer``) and TransformerLens models (``to_tokens``).

    Returns:
        A 0-d float32 tensor, or ``(tensor, per-token values)`` with ``return_all_probs`` (per-token
        log-values, nats).
    """
    if temperature is not None:  # the reference library's name for the same multiplier
        coldness = temperature
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    validate.text("prompt", prompt)
    validate.text("completion", completion)
    validate.positive("coldness", coldness, allow_none=False)
    p_ids = _tokens(model, tokenizer, prompt, special=True)
    c_ids = _tokens(model, tokenizer, completion, special=False)
    if not p_ids:
        raise ValueError(f"`prompt` {prompt[:30]!r} tokenises to zero tokens")
    if not c_ids:
        raise ValueError("`completion` tokenises to zero tokens")
    if hasattr(model, "config"):
        arch.check_context_length(model, len(p_ids) + len(c_ids), "`prompt` + `completion`")
    ids = torch.tensor([p_ids + c_ids], device=arch.input_device(model))
    logits = _logits(model, ids)[0, len(p_ids) - 1: -1]
    lp = torch.log_softmax(logits.float() * coldness, dim=-1).gather(
        -1, torch.tensor(c_ids, device=logits.device)[:, None])[:, 0]
    if do_one_minus:
        lp = log1mexp(lp)
    total = lp.sum()
    return (total, lp.tolist()) if return_all_probs else total


def get_completion_logprob_hf(model: nn.Module, prompt: str, completion: str, tokenizer: Any,
                              **kwargs: Any) -> Any:
    """:func:`get_completion_logprob` for HuggingFace models (tokenizer required)."""
    if tokenizer is None:
        raise ValueError("`tokenizer` is required")
    return get_completion_logprob(model, prompt, completion, tokenizer, **kwargs)


@torch.no_grad()
def sample_most_likely_completions_hf(
    model: nn.Module,
    tokenizer: Any,
    dst_prompt: str,
    src_prompt: str | None = None,
    k: int = 5,
    iters: int = 5,
    coldness: float = 1.0,
    reverse: bool = False,
    return_log_probs: bool = False,
    return_token_probs: bool = True,
    use_total_probs: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Beam search for the ``k`` completions of ``iters + 1`` tokens that are most likely after
    ``dst_prompt`` (or, with ``src_prompt``, whose next-token probability most exceeds that after
    ``src_prompt``; ``reverse`` flips the sign).

    Beams are kept as token ids (never re-tokenised), so they always have the same token length.

    Returns:
        ``(completions, probs)``: ``k`` decoded strings and an array ``(k, iters + 1)`` of per-token
        probability (differences) — log-probabilities with ``return_log_probs``; summed / multiplied
        over tokens (shape ``(k,)``) when ``return_token_probs=False``.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1, got {k!r}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"`iters` must be an int >= 0, got {iters!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"`tokenizer` must be the model's HuggingFace tokenizer, got {type(tokenizer).__name__}")
    validate.text("dst_prompt", dst_prompt)
    if src_prompt is not None:
        validate.text("src_prompt", src_prompt)
    validate.positive("coldness", coldness, allow_none=False)
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
        return torch.softmax(_logits(model, ids)[:, -1].float() * coldness, dim=-1)

    for _ in range(iters + 1):
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
    completions = tokenizer.batch_decode(beams)
    probs = np.array(beam_probs, dtype=np.float64)
    if return_log_probs:
        probs = np.log(probs)
        if not return_token_probs:
            probs = probs.sum(-1)
    elif not return_token_probs:
        probs = probs.prod(-1)
    return completions, probs
