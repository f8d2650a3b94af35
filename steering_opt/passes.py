"""Batched model passes on token ids: the measuring primitives under :mod:`steering_opt.evaluate`.

Prompts are formatted (plain text, or a chat template with the generation prompt) and encoded with the tokenizer's
special tokens, completions without, exactly as in training. Every pass runs whatever hooks are active on the model,
so it measures the steered model when called under steering; none of them changes the model's state. Each reports
its forward passes (a generation batch: ``max_new_tokens`` of them) to an enclosing progress bar that counts
``"pass"`` (:func:`steering_opt.progress.advance`; :func:`planned_passes` is the plan).

* :func:`generate_ids`: batched, left-padded, KV-cached generation (greedy or seeded sampling);
* :func:`token_logprobs`: ``log p(y_t | x, y_<t)`` of every completion token (nats);
* :func:`next_token_logprobs` and :func:`mean_kl`: next-token distributions and ``KL(p_u ‖ p_s)`` between two sets
  of them (nats);
* :class:`UpperBlocks`: the two scoring passes above run only the blocks from the lowest steered one on, on the
  unsteered residual stream stored at first use (exact: the blocks below never see the steering).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard

import torch
from torch import nn

from . import arch, packing
from .data import encode
from .hooks import HookSpec, attach, capture, capture_inputs, frozen_model, pad_sequences, pad_token_id
from .progress import advance

__all__ = [
    "Forward",
    "Prompt",
    "UpperBlocks",
    "check_prompts",
    "encode_prompts",
    "eos_token_ids",
    "format_prompt",
    "generate_ids",
    "is_chat",
    "length_batches",
    "logprob_batches",
    "looks_like_chat",
    "mean_kl",
    "next_token_logprobs",
    "planned_passes",
    "recording",
    "residual_norms",
    "token_logprobs",
    "upper_blocks",
]

#: A scoring forward: ``(input_ids (b, s), attention_mask (b, s) or additive (b, 1, s, s), position_ids (b, s) or
#: None) -> logits`` (``(b, s, vocab)``, or ``(1, N, vocab)`` under :func:`steering_opt.packing.head_gather`).
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

#: A prompt: plain text, or a chat conversation (a list of ``{"role", "content"}`` dicts).
Prompt = str | Sequence[Mapping[str, str]]


def is_chat(prompt: object) -> TypeGuard[Sequence[Mapping[str, str]]]:
    """Whether ``prompt`` is a chat conversation: a non-empty sequence (not a string) of mappings."""
    return isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0 and \
        all(isinstance(m, Mapping) for m in prompt)


def check_prompts(prompts: Any, name: str = "prompts") -> list[Prompt]:
    """Check a list of prompts (non-empty strings or chat message lists) and return it as a list."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of prompts (strings or chat message lists), "
                         f"got {prompts!r}"[:300])
    out = list(prompts)
    for i, p in enumerate(out):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"`{name}[{i}]` is an empty string")
        elif not is_chat(p):
            raise TypeError(f"`{name}[{i}]` must be a str or a list of chat messages, got {type(p).__name__}")
    return out


def format_prompt(tokenizer: Any, prompt: Prompt, *, chat: bool = False) -> str:
    """The text the model sees for ``prompt``: a plain string as is (or, with ``chat=True``, as one
    user turn), a conversation through the tokenizer's chat template with the generation prompt."""
    if isinstance(prompt, str):
        if not chat:
            return prompt
        messages: list[Mapping[str, str]] = [{"role": "user", "content": prompt}]
    elif is_chat(prompt):
        messages = list(prompt)
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message {i} must have 'role' and 'content' keys, got {sorted(m)}")
    else:
        raise TypeError(f"a prompt must be a str or a list of chat messages ({{'role', 'content'}} dicts), "
                        f"got {type(prompt).__name__}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat prompts need a tokenizer with a chat template (tokenizer.chat_template is None); "
                         "pass plain strings with chat=False")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _chat_affixes(tokenizer: Any) -> tuple[str, str] | None:
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    sentinel = "\u2063SENTINEL\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any template failure means "not chat"
        return None
    if sentinel not in text:
        return None
    pre, post = text.split(sentinel, 1)
    return pre, post


def looks_like_chat(tokenizer: Any, prompt: str) -> bool:
    """Whether ``prompt`` is chat-template text ending with the generation prompt (as made by
    ``apply_chat_template(..., add_generation_prompt=True)``)."""
    aff = _chat_affixes(tokenizer)
    return bool(aff and aff[1].strip() and prompt.endswith(aff[1]))


@torch.no_grad()
def residual_norms(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], layers: Sequence[int], *,
                   chat: bool = False) -> dict[int, float]:
    """Median L2 norm of the residual stream entering each block in ``layers`` over every token of
    ``prompts`` except position 0 (small models put a massive activation on the first token).

    A natural unit for steering strengths: a vector whose norm is a fraction of this barely moves the
    model, one several times larger overwrites the stream.
    """
    prompts = check_prompts(prompts)
    resolved = [arch.resolve_layer(model, x, name="layers") for x in layers]
    dev = arch.input_device(model)
    layer_list = list(dict.fromkeys(resolved))
    blocks = [arch.get_site_module(model, x) for x in layer_list]
    acc: dict[int, list[torch.Tensor]] = {x: [] for x in layer_list}
    with frozen_model(model):
        for p in prompts:
            ids = torch.tensor([encode(tokenizer, format_prompt(tokenizer, p, chat=chat), special=True)], device=dev)
            for x, h in zip(layer_list, capture_inputs(model, blocks, {"input_ids": ids, "use_cache": False})):
                if h.shape[1] > 1:  # position 0 excluded
                    acc[x].append(h[0, 1:].float().norm(dim=-1).cpu())
    return {x: float(torch.cat(v).median()) if v else math.nan for x, v in acc.items()}


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], chat: bool) -> list[list[int]]:
    """The token ids of each prompt, formatted by :func:`format_prompt` and encoded with special tokens; a prompt
    that encodes to no token is an error."""
    ids = [encode(tokenizer, format_prompt(tokenizer, p, chat=chat), special=True) for p in prompts]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {i} tokenises to zero tokens")
    return ids


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id the model's generation config, its config or the tokenizer names (sorted)."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        val = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, (list, tuple)):
            ids.update(int(x) for x in val)
    return sorted(ids)


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (max_batch_tokens and (len(cur) + 1) * longest > max_batch_tokens)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def planned_passes(lengths: Sequence[int], batch_size: int, *, generate: int = 0) -> int:
    """The forward passes that :func:`next_token_logprobs` (``generate=0``) or :func:`generate_ids`
    (``generate=max_new_tokens``) report for sequences of these ``lengths`` (:func:`token_logprobs`: one per batch
    of :func:`logprob_batches`)."""
    if generate:
        return len(length_batches(lengths, batch_size)) * generate
    return len(length_batches(lengths, batch_size, 2048))


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]], *, max_new_tokens: int,
                  do_sample: bool, temperature: float, top_p: float, top_k: int, seed: int,
                  batch_size: int) -> list[list[int]]:
    """Generated token ids after each prompt (KV cache, left padding, cut before the first EOS). Sampling
    (``do_sample`` and ``temperature > 0``; temperature 0 is greedy) seeds length batch ``b`` with
    ``(seed + b) mod 2**63``."""
    from transformers import GenerationConfig

    do_sample = do_sample and temperature > 0

    arch.check_context_length(model, max(map(len, prompt_ids), default=0), "a prompt")
    pad = pad_token_id(tokenizer, model)
    eos = eos_token_ids(model, tokenizer)
    dev = arch.input_device(model)
    cfg_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                                      eos_token_id=eos or None, use_cache=True)
    if do_sample:
        cfg_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    gen_cfg = GenerationConfig(**cfg_kwargs)
    out: list[list[int]] = [[] for _ in prompt_ids]
    for b, idx in enumerate(length_batches([len(p) for p in prompt_ids], batch_size)):
        ids, mask = pad_sequences([prompt_ids[i] for i in idx], pad, side="left")
        longest = ids.shape[1]
        with contextlib.ExitStack() as stack:
            if do_sample:
                stack.enter_context(torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []))
                torch.manual_seed((seed + b) % 2**63)
            gen = model.generate(  # type: ignore[operator]  # nn.Module's typing does not know HF's generate()
                input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen_cfg)
        for r, i in enumerate(idx):
            toks = gen[r, longest:].tolist()
            for j, t in enumerate(toks):
                if t in eos:
                    toks = toks[:j]
                    break
            out[i] = toks
        advance(max_new_tokens, "pass")
    return out


def logprob_batches(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int,
                    max_batch_tokens: int = 2048, share_prompts: bool = False) -> list[list[list[int]]]:
    """How :func:`token_logprobs` batches ``pairs``: batches of rows of pair indices (a row: the completions
    packed after one copy of their prompt, see :mod:`steering_opt.packing`; one completion per row without
    ``share_prompts`` or where the model cannot take the packed mask). Pairs with empty completions are left out."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (p, c) in enumerate(pairs):
        if c:
            groups.setdefault(tuple(p) if share_prompts else (i,), []).append(i)
    rows = [[g[j] for j in r] for g in groups.values()
            for r in packing.split_row(len(pairs[g[0]][0]), [len(pairs[i][1]) for i in g], max_batch_tokens)]
    lens = [len(pairs[r[0]][0]) + sum(len(pairs[i][1]) for i in r) for r in rows]
    longest = max((len(pairs[i][0]) + len(pairs[i][1]) for r in rows for i in r), default=0)  # one sequence
    if share_prompts and any(len(r) > 1 for r in rows) and not packing.tree_mask_ok(model, longest):
        return logprob_batches(model, pairs, batch_size, max_batch_tokens, share_prompts=False)
    order = sorted(range(len(rows)), key=lambda j: -lens[j])  # similar lengths together
    return [[rows[order[j]] for j in b] for b in packing.batches(
        [lens[j] for j in order], [lens[j] - len(pairs[rows[j][0]][0]) for j in order],
        max_batch_tokens=max_batch_tokens, max_positions=packing.max_logits(model), max_rows=batch_size)]


@torch.no_grad()
def token_logprobs(model: nn.Module, tokenizer: Any, pairs: list[tuple[list[int], list[int]]], *, batch_size: int,
                   max_batch_tokens: int = 2048, forward: Forward | None = None,
                   share_prompts: bool = False) -> list[torch.Tensor]:
    """``log p(y_t | x, y_<t)`` (float32, nats) of every completion token, one tensor per
    (prompt ids, completion ids) pair; right padding; the LM head and log-softmax only at the positions that
    predict a completion token. ``forward``: how a batch is run (default: the whole model; see
    :class:`UpperBlocks`). ``share_prompts``: the completions of one prompt run after one shared copy of it
    (:mod:`steering_opt.packing`; exact, and the prompt runs once) — leave it off under hooks that select tokens
    relative to the end of the sequence (``token_indices=-1``), which would see the packed row's end."""
    arch.check_context_length(model, max((len(p) + len(c) for p, c in pairs), default=0),
                              "a prompt + completion")
    for i, (p, c) in enumerate(pairs):
        if c and not p:
            raise ValueError(f"pairs[{i}]: the prompt must have at least one token to score a completion after it")
    pad = pad_token_id(tokenizer, model)
    dev = arch.input_device(model)
    dtype = next(model.parameters()).dtype
    out: list[torch.Tensor] = [torch.zeros(0) for _ in pairs]
    for rows in logprob_batches(model, pairs, batch_size, max_batch_tokens, share_prompts):
        pk = packing.pack([(pairs[r[0]][0], [pairs[i][1] for i in r]) for r in rows], dtype=dtype, pad_id=pad)
        with packing.head_gather(model, pk.gather_b, pk.gather_t) as select:
            lg = select(_run(model, forward, pk.input_ids.to(dev), pk.attention_mask.to(dev), pk.position_ids.to(dev)))
        lp = torch.log_softmax(lg.float(), -1).gather(-1, pk.targets.to(lg.device)[:, None])[:, 0].cpu()
        for k, i in enumerate(i for r in rows for i in r):
            out[i] = lp[pk.owner == k]
        advance(1, "pass")
    return out


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]], *, positions: str,
                         batch_size: int, forward: Forward | None = None) -> list[torch.Tensor]:
    """Log-softmax next-token distributions ``(n_positions, vocab)`` (float32) of each prompt, at every
    position (``positions="all"``) or the last one (``"last"``); ``forward`` as in :func:`token_logprobs`."""
    arch.check_context_length(model, max(map(len, prompt_ids), default=0), "a prompt")
    pad = pad_token_id(tokenizer, model)
    dev = arch.input_device(model)
    out: list[torch.Tensor] = [torch.zeros(0) for _ in prompt_ids]
    lengths = [len(p) for p in prompt_ids]
    for idx in length_batches(lengths, batch_size, 2048):
        ids, mask = pad_sequences([prompt_ids[i] for i in idx], pad)
        logits = _run(model, forward, ids.to(dev), mask.to(dev))
        for r, i in enumerate(idx):
            sl = slice(0, lengths[i]) if positions == "all" else slice(lengths[i] - 1, lengths[i])
            out[i] = torch.log_softmax(logits[r, sl].float(), -1).cpu()
        advance(1, "pass")
    return out


def _run(model: nn.Module, forward: Forward | None, ids: torch.Tensor, mask: torch.Tensor,
         pos: torch.Tensor | None = None) -> torch.Tensor:
    if forward is not None:
        return forward(ids, mask, pos)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


class UpperBlocks:
    """Scoring passes that run only the blocks ``start, start+1, ...``: the hidden states entering block
    ``start`` are those of the unsteered model whenever nothing steers below ``start``, so they are computed
    once per batch (a forward that stops after block ``start - 1``) and stored, keyed by the batch's token ids.
    The logits are the full model's (:func:`steering_opt.arch.truncated_view`); a repeated measurement at the
    same layer (other strengths, other vectors) costs only the upper blocks.

    Use::

        upper = UpperBlocks(model, start)          # raises NotImplementedError where truncation is not exact
        with upper.feeding():                      # before any steering hook at block `start` is attached
            with steering:                         # hooks at layers >= start only
                token_logprobs(..., forward=upper.forward)

    The store holds ``(b, s, d)`` per batch (float, on the model's device): a few MB for a few dozen prompts.
    """

    def __init__(self, model: nn.Module, start: int):
        if not isinstance(start, int) or start < 1:
            raise ValueError(f"`start` must be a layer >= 1, got {start!r}")
        self.model, self.start = model, start
        self.view = arch.truncated_view(model, start)
        blocks = arch.get_blocks(model)
        self.block, self.below = blocks[start], blocks[start - 1]
        self.store: dict[tuple, torch.Tensor] = {}
        self._slot: list[torch.Tensor] = []

    @contextlib.contextmanager
    def feeding(self) -> Iterator[None]:
        """Attach the pre-hook that feeds block ``start`` the stored hidden states during :meth:`forward`
        (attached first, so steering hooks at that block still act on what it feeds)."""
        def feed(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if self._slot:
                return arch.replace_hidden_states(args, kwargs, self._slot[0])
            return None

        with attach([(self.block, feed, "pre")]):
            yield

    @staticmethod
    def key(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None) -> tuple:
        """The store's key of one batch (its exact inputs)."""
        return tuple(None if t is None else (tuple(t.shape), t.dtype, t.detach().cpu().contiguous().view(torch.uint8)
                                             .numpy().tobytes()) for t in (ids, mask, pos))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of one padded batch (a :data:`Forward`; call inside :meth:`feeding`)."""
        key = self.key(ids, mask, pos)
        h = self.store.get(key)
        if h is None:
            got = capture(lambda: self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False),
                          {0: (self.below, "post")}, read=lambda _k, x: x.detach())
            if 0 not in got:
                raise RuntimeError(f"block {self.start - 1} did not run")
            h = self.store[key] = got[0]
        self._slot.append(h)
        try:
            return self.view(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        finally:
            self._slot.clear()


def recording(model: nn.Module, uppers: Sequence[UpperBlocks]) -> Forward:
    """A full-model :data:`Forward` that also stores, in each of ``uppers``, the hidden states entering its block
    on that batch (what its own first pass would compute): one unsteered pass fills the stores of every layer."""
    def forward(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        got: dict[int, torch.Tensor] = {}

        def spec(u: UpperBlocks) -> HookSpec:
            return u.below, lambda m, a, out: got.setdefault(u.start, arch.get_output_hidden_states(out).detach()), \
                "post"

        with attach([spec(u) for u in uppers]):
            logits = _run(model, None, ids, mask, pos)
        for u in uppers:
            u.store[u.key(ids, mask, pos)] = got[u.start]
        return logits

    return forward


def upper_blocks(model: nn.Module, start: int, cache: dict[int, UpperBlocks | None]) -> UpperBlocks | None:
    """The :class:`UpperBlocks` of ``model`` from block ``start`` (kept in ``cache``); None when ``start`` is 0
    or the architecture cannot run a truncated model exactly (the full model is then run)."""
    if start < 1:
        return None
    if start not in cache:
        try:
            cache[start] = UpperBlocks(model, start)
        except NotImplementedError:
            cache[start] = None
    return cache[start]


def mean_kl(unsteered: list[torch.Tensor], steered: list[torch.Tensor]) -> float:
    """Mean over positions of ``KL(p_u ‖ p_s)`` (nats)."""
    lu, ls = torch.cat(unsteered), torch.cat(steered)
    per_pos = (lu.exp() * (lu - ls)).sum(-1)
    return float(per_pos.clamp_min(0).mean())
