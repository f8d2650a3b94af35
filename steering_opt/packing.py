"""Packed scoring batches: completions after one shared copy of their prompt, logits only where needed.

One place for the layout used by the training engine (:class:`steering_opt.engine.FastEngine`) and by the
scoring passes (:func:`steering_opt.passes.token_logprobs`):

* a **row** is ``[prompt, c_1, c_2, ...]``: position ids restart at the prompt length for each completion, and a
  4D attention mask (a tree) lets each completion see the prompt and its own earlier tokens only. This is exact
  (every completion token sees the same keys at the same positions as in its own sequence) and the prompt runs
  once instead of once per completion. It needs eager or SDPA attention and no sliding window shorter than the
  row (:func:`tree_mask_ok`); otherwise each completion gets its own right-padded row (plain causal attention);
* rows are **batched** while ``rows × longest row`` stays within a token budget and the gathered positions within
  a logits budget (:func:`batches`);
* the LM head sees only the positions that predict a completion token (:func:`head_gather`): logits
  ``(1, N, vocab)`` instead of ``(b, s, vocab)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from . import arch
from .hooks import attach

#: A packed row grows to at least this many tokens before it is split (its attention costs ``T²``).
PACKED_ROW_TOKENS = 256
#: A batch gathers at most ``max(1, LOGIT_ELEMENTS // vocab)`` positions for the LM head (its float32 logits and
#: log-softmax are ``(positions, vocab)``: 512 MiB each at this bound).
LOGIT_ELEMENTS = 2**27


def tree_mask_ok(model: nn.Module, longest: int) -> bool:
    """Whether ``model`` takes the packed rows' 4D mask exactly: eager/SDPA attention, and no sliding window
    shorter than ``longest`` tokens (the longest single prompt + completion: each completion attends only within
    its own sequence, so a window at least that long never cuts anything)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    for c in (cfg, getattr(cfg, "text_config", None)):
        window = getattr(c, "sliding_window", None) if c is not None else None
        if isinstance(window, int) and window < longest:
            return False
    return True


def max_logits(model: nn.Module) -> int:
    """The most positions one batch gathers for the LM head (see :data:`LOGIT_ELEMENTS`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    vocab = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return max(1, LOGIT_ELEMENTS // vocab) if isinstance(vocab, int) and vocab > 0 else 2**62


def split_row(prompt_len: int, completion_lens: Sequence[int], max_tokens: int) -> list[list[int]]:
    """The completions (indices into ``completion_lens``) of one prompt, grouped into packed rows of at most
    ``max(PACKED_ROW_TOKENS, 2 × (prompt + longest completion))`` tokens and ``max_tokens`` (greedy, in order;
    a row holds at least one completion)."""
    limit = min(max_tokens, max(PACKED_ROW_TOKENS, 2 * (prompt_len + max(completion_lens, default=0))))
    rows: list[list[int]] = []
    cur: list[int] = []
    total = prompt_len
    for i, n in enumerate(completion_lens):
        if cur and total + n > limit:
            rows.append(cur)
            cur, total = [], prompt_len
        cur.append(i)
        total += n
    if cur:
        rows.append(cur)
    return rows


def batches(row_lens: Sequence[int], gathered: Sequence[int], *, max_batch_tokens: int, max_positions: int,
            max_rows: int | None = None) -> list[list[int]]:
    """Rows (indices, in order) batched while ``rows × longest row ≤ max_batch_tokens``, the gathered positions
    stay within ``max_positions`` and there are at most ``max_rows`` rows (linear time)."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = total = 0
    for i, (n, m) in enumerate(zip(row_lens, gathered)):
        if cur and (max(longest, n) * (len(cur) + 1) > max_batch_tokens or total + m > max_positions
                    or (max_rows is not None and len(cur) >= max_rows)):
            out.append(cur)
            cur, longest, total = [], 0, 0
        cur.append(i)
        longest, total = max(longest, n), total + m
    if cur:
        out.append(cur)
    return out


@dataclasses.dataclass
class Packed:
    """A batch of packed rows (CPU tensors; ``N`` = the completion tokens of the whole batch, in row order)."""

    input_ids: torch.Tensor  # (B, T); padding: pad_id
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T) additive tree mask (any row with 2+ completions), else (B, T) 0/1
    starts: list[list[int]]  # column of each completion's first token, per row
    gather_b: torch.Tensor  # (N,) row of the position predicting each completion token
    gather_t: torch.Tensor  # (N,) its column
    targets: torch.Tensor  # (N,) the completion tokens
    owner: torch.Tensor  # (N,) which completion (index in row order over the batch) each token belongs to


def pack(rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *, dtype: torch.dtype,
         pad_id: int = 0) -> Packed:
    """Lay out ``rows`` — ``(prompt ids, [completion ids, ...])`` each, every completion at least one token,
    prompts at least one token — as one right-padded batch. ``dtype``: the model's (for the additive mask)."""
    T = max(len(p) + sum(len(c) for c in cs) for p, cs in rows)
    B = len(rows)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -2, dtype=torch.long)  # -1 prompt, j completion j, -2 padding
    starts: list[list[int]] = []
    gb: list[int] = []
    gt: list[int] = []
    tg: list[int] = []
    ow: list[int] = []
    k = 0
    for b, (prompt, comps) in enumerate(rows):
        P = len(prompt)
        ids[b, :P] = torch.as_tensor(list(prompt), dtype=torch.long)
        pos[b, :P] = torch.arange(P)
        seg[b, :P] = -1
        o = P
        starts.append([])
        for j, c in enumerate(comps):
            n = len(c)
            ids[b, o: o + n] = torch.as_tensor(list(c), dtype=torch.long)
            pos[b, o: o + n] = torch.arange(P, P + n)
            seg[b, o: o + n] = j
            starts[-1].append(o)
            gb += [b] * n
            gt += [P - 1] + list(range(o, o + n - 1))
            tg += list(c)
            ow += [k] * n
            o += n
            k += 1
    if any(len(cs) > 1 for _, cs in rows):
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        allowed = causal[None] & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == -1)) \
            & (seg[:, None, :] != -2)
        allowed |= torch.eye(T, dtype=torch.bool)[None]  # padding rows attend to themselves
        mask = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    else:
        mask = (seg != -2).long()
    return Packed(input_ids=ids, position_ids=pos, attention_mask=mask, starts=starts, gather_b=torch.tensor(gb),
                  gather_t=torch.tensor(gt), targets=torch.tensor(tg), owner=torch.tensor(ow))


@contextlib.contextmanager
def head_gather(model: nn.Module, b: torch.Tensor, t: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """While active, ``model``'s LM head sees only the hidden states at ``(b[i], t[i])``, so the logits it returns
    are ``(1, N, vocab)``. Yields ``select(logits) -> (N, vocab)``: those positions' logits from the model's output,
    also when the head never ran as a module (a model that applies its output embeddings some other way returns
    full ``(batch, seq, vocab)`` logits, which ``select`` indexes)."""
    fired: list[bool] = []

    def select(logits: torch.Tensor) -> torch.Tensor:
        return logits[0] if fired else logits[b.to(logits.device), t.to(logits.device)]

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    if not isinstance(head, nn.Module):
        yield select
        return

    def gather(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        h = arch.get_hidden_states(args, kwargs)
        fired.append(True)
        return arch.replace_hidden_states(args, kwargs, h[b.to(h.device), t.to(h.device)][None])

    with attach([(head, gather, "pre")]):
        yield select
