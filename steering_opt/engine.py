"""Loss engines: per-completion losses (nats) and their gradients w.r.t. steering parameters.

The objective (one place, :class:`Objective`): with ``p_t = softmax(coldness · logits)[y_t]`` at the
position predicting completion token ``y_t`` (steering applied),

* promote (dst):  ``-Σ_t log p_t``
* suppress (src): ``-Σ_t log(1 - p_t)`` (``do_one_minus=True``, computed stably with log1mexp in
  float32) or ``+Σ_t log p_t`` (``do_one_minus=False``),

optionally divided by the completion's token count. Two engines compute it:

* :class:`ReferenceEngine` — the naive algorithm, kept as the obviously-correct baseline: one full
  forward and backward per completion, full-vocabulary softmax at every position.
* :class:`FastEngine` — the default: runs the blocks below the lowest steered layer once (no grad)
  and caches their output; each step runs only the blocks from that layer up (through
  :func:`~steering_opt.arch.truncated_view`: the shared model is never modified), with every completion
  of every datapoint in one right-padded batch (chunked by a token budget), and takes logits only
  at positions that predict a completion token.

Both consume the same :class:`~steering_opt.data.TokenizedCompletion` records and the same per-row steering
specification, and agree to ~1e-5 (tested).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from . import arch, packing
from .data import SRC
from .data import TokenizedCompletion as Seq
from .hooks import HookSpec, attach, capture_inputs
from .parameterization import ADDITIVE, Steering, steer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SteerSpec:
    """Steering to apply to a set of sequences (rows).

    Attributes:
        rows: ``{layer: (n_rows, d)}`` per-row vectors (sign and noise already folded in).
        params: ``{layer: [Steering, ...]}`` the parameterisations (clamp coefficient, affine factors...);
            None: additive steering with the rows.
        which: ``(n_rows,)`` index into ``params[layer]`` of each row; None: every row uses ``params[layer][0]``.
    """

    rows: dict[int, torch.Tensor]
    params: dict[int, list[Steering]] | None = None
    which: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> SteerSpec:
        """The spec for the rows ``index`` ``(B,)`` (the fast engine gives each packed batch row the
        row of its first sequence)."""
        return SteerSpec(rows={k: v[index.to(v.device)] for k, v in self.rows.items()}, params=self.params,
                         which=None if self.which is None else self.which[index.to(self.which.device)])

    def apply(self, h: torch.Tensor, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Steer ``h`` ``(B, T, d)`` entering block ``layer`` (row ``b`` of ``h`` uses row ``b`` of the
        spec); ``mask`` ``(B, T)`` bool or None (all positions). Layers without rows are unchanged."""
        rows = self.rows.get(layer)
        if rows is None:
            return h
        params = self.params[layer] if self.params is not None else ADDITIVE
        return steer(h, params, rows, which=self.which, mask=mask)


SpecFn = Callable[[list[int]], SteerSpec]


class LossEngine(Protocol):
    """What the optimisation loop needs from an engine (:class:`Engine` and its data-parallel wrapper)."""

    seqs: list[Seq]
    layers: list[int]

    def run(self, spec_fn: SpecFn, *, weights: torch.Tensor | None = None, backward: bool = True,
            subset: Sequence[int] | None = None) -> torch.Tensor: ...

    def forget(self, subset: Sequence[int] | None) -> None: ...


@dataclasses.dataclass(frozen=True)
class Objective:
    """How token log-probs become per-completion losses (nats)."""

    coldness: float = 0.7
    do_one_minus: bool = True
    normalize_token_length: bool = False

    def token_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``log softmax(coldness·logits)[target]`` in float32; logits ``(N, V)``, targets ``(N,)``."""
        lp = torch.log_softmax(logits.float() * self.coldness, dim=-1)
        return lp.gather(-1, targets[:, None].to(lp.device))[:, 0]

    def token_scores(self, logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """What the engines sum per completion (before :meth:`completion_losses`): the token log-probs
        ``(N,)``. ``rows`` ``(N,)`` numbers every predicted position of the engine's sequences (completion
        token ``j`` of sequence ``s`` is row ``Engine.row0[s] + j``); objectives that compare whole
        distributions with stored ones (:class:`steering_opt.kl.DivergenceObjective`) use it."""
        return self.token_logprobs(logits, targets)

    def completion_losses(self, logp: torch.Tensor, owner: torch.Tensor, kinds: torch.Tensor,
                          lengths: torch.Tensor) -> torch.Tensor:
        """Per-completion losses ``(n,)`` from token log-probs ``(N,)`` owned by completion ``owner``."""
        if self.do_one_minus:
            src_term = -log1mexp(logp)  # -log(1 - p)
        else:
            src_term = logp
        is_src = (kinds[owner] == SRC).to(logp.device)
        per_token = torch.where(is_src, src_term, -logp)
        out = torch.zeros(len(kinds), dtype=per_token.dtype, device=per_token.device)
        out = out.index_add(0, owner.to(per_token.device), per_token)
        if self.normalize_token_length:
            out = out / lengths.to(out)
        return out


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x ≤ 0``, stable at both ends (Mächler 2012). ``x`` is clamped to
    ``≤ -1e-12`` so that ``p = 1`` gives a large finite value instead of ``-inf``."""
    x = x.float().clamp(max=-1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class Engine:
    """Common set-up: the model, the sequences, the steered layers and the objective."""

    def __init__(self, model: nn.Module, seqs: Sequence[Seq], layers: Sequence[int], objective: Objective,
                 *, layer_config: arch.LayerConfig = None):
        self.model = model
        self.seqs = list(seqs)
        self.layers = sorted(set(layers))
        self.objective = objective
        self.layer_config = layer_config
        self.modules = {
            layer: arch.get_site_module(model, layer, "decoder_block", layer_config) for layer in self.layers
        }
        self.kinds = torch.tensor([s.kind for s in self.seqs])
        self.lengths = torch.tensor([s.completion_len for s in self.seqs], dtype=torch.float32)
        #: ``(n_seqs,)`` row of each sequence's first predicted position (see :meth:`Objective.token_scores`)
        self.row0 = torch.cumsum(self.lengths.long(), 0) - self.lengths.long()
        self.device = arch.input_device(model)

    def run(self, spec_fn: SpecFn, *, weights: torch.Tensor | None = None, backward: bool = True,
            subset: Sequence[int] | None = None) -> torch.Tensor:
        """Compute the losses of ``subset`` (default: all sequences) under ``spec_fn``'s steering.

        If ``backward``, accumulates ``d(Σ_s weights[s]·loss_s)/d(params)`` into the ``.grad`` of the
        tensors ``spec_fn`` built its rows from (weights default to 1). Returns the detached losses,
        shape ``(len(subset),)``, float32, nats.
        """
        raise NotImplementedError

    def forget(self, subset: Sequence[int] | None) -> None:
        """Drop what :meth:`run` cached for ``subset`` (None: for every subset) to free memory."""

    def _hook_for(self, layer: int, spec: SteerSpec, mask: torch.Tensor | None,
                  replace: torch.Tensor | None = None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            h = replace if replace is not None else arch.get_hidden_states(args, kwargs)
            h = spec.apply(h, layer, mask)
            return arch.replace_hidden_states(args, kwargs, h)

        return hook


class ReferenceEngine(Engine):
    """The naive algorithm: one full forward (+ backward) per completion, full-vocab softmax."""

    def run(self, spec_fn: SpecFn, *, weights: torch.Tensor | None = None, backward: bool = True,
            subset: Sequence[int] | None = None) -> torch.Tensor:
        idx = list(range(len(self.seqs))) if subset is None else list(subset)
        out = []
        for j, s_i in enumerate(idx):
            seq = self.seqs[s_i]
            spec = spec_fn([s_i])
            T = len(seq.ids)
            mask = None
            if seq.steer_positions is not None:
                mask = torch.tensor(seq.steer_positions, device=self.device)[None]
            ids = torch.tensor([seq.ids], device=self.device)
            with torch.set_grad_enabled(backward), \
                    attach([(self.modules[layer], self._hook_for(layer, spec, mask), "pre") for layer in self.layers]):
                logits = self.model(input_ids=ids, use_cache=False).logits[0]
                pos = torch.arange(seq.prompt_len - 1, T - 1, device=logits.device)
                tgt = ids[0, seq.prompt_len:].to(logits.device)
                rows = int(self.row0[s_i]) + torch.arange(len(pos))
                logp = self.objective.token_scores(logits[pos], tgt, rows)
                owner = torch.zeros(len(pos), dtype=torch.long)
                loss = self.objective.completion_losses(
                    logp, owner, self.kinds[s_i: s_i + 1], self.lengths[s_i: s_i + 1])[0]
                if backward:
                    w = 1.0 if weights is None else weights[j]
                    (loss * w).backward()
            out.append(loss.detach())
        return torch.stack(out).float().cpu()


@dataclasses.dataclass
class _Chunk:
    groups: list[list[int]]  # the sequences of each packed row
    seq_idx: list[int]  # sequences in this chunk (order of `owner`)
    row_first: torch.Tensor  # (B,) index into seq_idx of each packed row's first sequence
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attn: torch.Tensor | None  # (B, 1, T, T) additive tree mask, None = plain causal (right padding)
    mask: torch.Tensor | None  # (B, T) steering mask, None = all
    gather_b: torch.Tensor  # (N,)
    gather_t: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,)
    owner: torch.Tensor  # (N,) index into seq_idx
    rows: torch.Tensor  # (N,) the engine-wide row of each gathered position (Objective.token_scores)
    cache: torch.Tensor | None = None  # input of the lowest steered block (B, T, d)


class FastEngine(Engine):
    """Default engine: cached lower layers, shared prompts, one padded batch, logits only where needed.

    Prompt sharing: the completions of one datapoint are packed into one row after a single copy of
    the prompt — ``[prompt, c_1, c_2, ...]`` — with position ids restarting at the prompt length for
    each completion and a 4D attention mask in which each completion sees the prompt and its own
    earlier tokens only. This is exact (the same attention inputs as separate sequences), and the
    prompt runs once per step instead of once per completion. It is used with eager/SDPA attention
    when no sliding window is shorter than the longest sequence; otherwise every completion gets its
    own right-padded row.

    Args:
        max_batch_tokens: token budget (rows × padded length) of one forward/backward chunk; bounds
            memory for long prompts and many completions. Gradients are accumulated over chunks. A chunk
            also gathers at most :attr:`max_logits` positions for the LM head, and packed rows stay short
            (their attention is quadratic). If an allocation still fails in a forward, the chunk is split in
            two and retried (kept split for later steps, with a warning); a failure in the backward, or on a
            single sequence, raises ``MemoryError`` saying which ``max_batch_tokens`` to set.
        cache_lower_layers: cache the input of the lowest steered block (exact: nothing below it is
            steered). Disable to trade speed for memory.
        share_prompts: pack each datapoint's completions after one copy of its prompt (see above).
    """

    def __init__(self, model: nn.Module, seqs: Sequence[Seq], layers: Sequence[int], objective: Objective,
                 *, layer_config: arch.LayerConfig = None, max_batch_tokens: int = 16384,
                 cache_lower_layers: bool = True, share_prompts: bool = True):
        super().__init__(model, seqs, layers, objective, layer_config=layer_config)
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.cache_lower_layers = cache_lower_layers and layer_config is None
        self.share_prompts = share_prompts and packing.tree_mask_ok(model, max(len(s.ids) for s in self.seqs))
        self.low = self.layers[0]
        if model.get_output_embeddings() is None:  # type: ignore[operator]  # an HF PreTrainedModel method
            raise ValueError("model has no output embeddings (get_output_embeddings() is None)")
        #: predicted positions per chunk (bounds the ``(positions, vocab)`` logits; see packing.LOGIT_ELEMENTS)
        self.max_logits = packing.max_logits(model)
        self.dtype = next(model.parameters()).dtype
        self._chunks: dict[tuple[int, ...], list[_Chunk]] = {}

    def _groups(self, idx: list[int]) -> list[list[int]]:
        """The packed rows: each datapoint's completions after one copy of its prompt (linear time), split as
        :func:`steering_opt.packing.split_row` does."""
        if not self.share_prompts:
            return [[i] for i in idx]
        groups: dict[int, list[int]] = {}
        for i in idx:
            groups.setdefault(self.seqs[i].datapoint, []).append(i)
        return [[g[j] for j in row] for g in groups.values() for row in packing.split_row(
            self.seqs[g[0]].prompt_len, [self.seqs[i].completion_len for i in g], self.max_batch_tokens)]

    def _make_chunks(self, idx: list[int]) -> list[_Chunk]:
        """Rows batched while ``rows × longest row ≤ max_batch_tokens`` and the predicted positions stay within
        :attr:`max_logits` (linear time)."""
        groups = self._groups(idx)
        lens = [[self.seqs[i].completion_len for i in g] for g in groups]
        return [self._build_chunk([groups[j] for j in b]) for b in packing.batches(
            [self.seqs[g[0]].prompt_len + sum(n) for g, n in zip(groups, lens)], [sum(n) for n in lens],
            max_batch_tokens=self.max_batch_tokens, max_positions=self.max_logits)]

    def _build_chunk(self, groups: list[list[int]]) -> _Chunk:
        seq_idx = [i for g in groups for i in g]
        P = [self.seqs[g[0]].prompt_len for g in groups]
        packed = packing.pack([(self.seqs[g[0]].ids[:p], [self.seqs[i].ids[p:] for i in g])
                               for g, p in zip(groups, P)], dtype=self.dtype)
        steer_m = torch.zeros(packed.input_ids.shape, dtype=torch.bool)
        rw: list[int] = []
        for b, (g, p) in enumerate(zip(groups, P)):
            flags0 = self.seqs[g[0]].steer_positions
            steer_m[b, :p] = True if flags0 is None else torch.tensor(flags0[:p])
            for i, o in zip(g, packed.starts[b]):
                s = self.seqs[i]
                n = s.completion_len
                steer_m[b, o: o + n] = True if s.steer_positions is None else torch.tensor(s.steer_positions[p:])
                rw += range(int(self.row0[i]), int(self.row0[i]) + n)
        attn = packed.attention_mask if packed.attention_mask.dim() == 4 else None
        need_mask = any(self.seqs[i].steer_positions is not None for i in seq_idx)
        row_first = torch.tensor([0] + [len(g) for g in groups[:-1]]).cumsum(0)
        return _Chunk(
            groups=groups, seq_idx=seq_idx, row_first=row_first, input_ids=packed.input_ids.to(self.device),
            position_ids=packed.position_ids.to(self.device), attn=None if attn is None else attn.to(self.device),
            mask=steer_m.to(self.device) if need_mask else None, gather_b=packed.gather_b, gather_t=packed.gather_t,
            targets=packed.targets, owner=packed.owner, rows=torch.tensor(rw, dtype=torch.long),
        )

    def _forward(self, chunk: _Chunk, model: nn.Module | None = None) -> Any:
        return (model or self.model)(input_ids=chunk.input_ids, position_ids=chunk.position_ids,
                                     attention_mask=chunk.attn, use_cache=False)

    @torch.no_grad()
    def _fill_cache(self, chunk: _Chunk) -> None:
        """Store the input of the lowest steered block (the forward stops there)."""
        (h,) = capture_inputs(self.model, [self.modules[self.low]], lambda: self._forward(chunk))
        chunk.cache = h.detach()

    def _upper_model(self) -> nn.Module | None:
        """A view of the model running only the blocks from the lowest steered one on (the shared model is
        never modified, so other threads may use it meanwhile); None: run the full model."""
        if not self.cache_lower_layers or self.low == 0:
            return None
        try:
            return arch.truncated_view(self.model, self.low)
        except NotImplementedError as e:
            log.info("lower-layer cache disabled for this architecture: %s", e)
            self.cache_lower_layers = False
            return None

    def forget(self, subset: Sequence[int] | None) -> None:
        if subset is None:
            self._chunks.clear()
        else:
            self._chunks.pop(tuple(subset), None)

    def run(self, spec_fn: SpecFn, *, weights: torch.Tensor | None = None, backward: bool = True,
            subset: Sequence[int] | None = None) -> torch.Tensor:
        idx = list(range(len(self.seqs))) if subset is None else list(subset)
        key = tuple(idx)
        if key not in self._chunks:
            self._chunks[key] = self._make_chunks(idx)
        chunks = self._chunks[key]
        pos_in_subset = {s: j for j, s in enumerate(idx)}
        out = torch.zeros(len(idx))
        upper = self._upper_model()
        k = 0
        while k < len(chunks):
            chunk = chunks[k]
            losses = self._forward_losses(chunk, spec_fn, upper, backward)
            if losses is None:  # out of memory: nothing was accumulated; retry in two smaller chunks (kept)
                chunks[k: k + 1] = self._split(chunk)
                continue
            if backward:
                if weights is None:
                    total = losses.sum()
                else:
                    w = weights[[pos_in_subset[s] for s in chunk.seq_idx]].to(losses)
                    total = (losses * w).sum()
                try:
                    total.backward()
                except (RuntimeError, MemoryError) as e:
                    if not is_allocation_failure(e):
                        raise
                    rows, width = chunk.input_ids.shape
                    raise MemoryError(
                        f"out of memory in the backward pass of a chunk of {rows} row(s) x {width} tokens "
                        f"(max_batch_tokens={self.max_batch_tokens}); set max_batch_tokens={max(1, rows * width // 2)}"
                        f" or lower (OptimizeOptions.max_batch_tokens, --max-batch-tokens)") from e
            for j, s in enumerate(chunk.seq_idx):
                out[pos_in_subset[s]] = losses[j].detach().float().cpu()
            k += 1
        return out

    def _forward_losses(self, chunk: _Chunk, spec_fn: SpecFn, upper: nn.Module | None,
                        grad: bool) -> torch.Tensor | None:
        """The per-completion losses ``(len(chunk.seq_idx),)`` of one chunk (attached to the graph if ``grad``);
        None when an allocation failed (memory freed, nothing accumulated)."""
        use_cache = upper is not None
        try:
            if use_cache and chunk.cache is None:
                self._fill_cache(chunk)
            spec = spec_fn(chunk.seq_idx).select(chunk.row_first)
            specs: list[HookSpec] = []
            for layer in self.layers:
                replace = chunk.cache if (use_cache and layer == self.low) else None
                specs.append((self.modules[layer], self._hook_for(layer, spec, chunk.mask, replace), "pre"))
            with torch.set_grad_enabled(grad), attach(specs), \
                    packing.head_gather(self.model, chunk.gather_b, chunk.gather_t) as select:
                logits = select(self._forward(chunk, upper).logits)
                logp = self.objective.token_scores(logits, chunk.targets, chunk.rows)
                idx_t = torch.tensor(chunk.seq_idx)
                return self.objective.completion_losses(logp, chunk.owner, self.kinds[idx_t], self.lengths[idx_t])
        except (RuntimeError, MemoryError) as e:
            if not is_allocation_failure(e):
                raise
        chunk.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return None

    def _split(self, chunk: _Chunk) -> list[_Chunk]:
        """Two chunks with the rows (or, for one packed row, the completions) of ``chunk`` in halves."""
        rows, width = chunk.input_ids.shape
        g = chunk.groups
        if len(g) == 1 and len(g[0]) == 1:
            raise MemoryError(
                f"out of memory on a single sequence of {width} tokens: a smaller max_batch_tokens (now "
                f"{self.max_batch_tokens}) cannot split it; use shorter prompts/completions, steer a later "
                f"layer, or a device with more memory")
        log.warning("out of memory on a chunk of %d row(s) x %d tokens: retrying in two halves (set "
                    "max_batch_tokens=%d or lower to avoid the retry)", rows, width, max(1, rows * width // 2))
        halves = [g[: len(g) // 2], g[len(g) // 2:]] if len(g) > 1 else \
            [[g[0][: len(g[0]) // 2]], [g[0][len(g[0]) // 2:]]]
        return [self._build_chunk(h) for h in halves]


def is_allocation_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed memory allocation (CUDA / MPS out of memory, torch's CPU allocator,
    Python's ``MemoryError``) rather than another error."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    msg = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def make_engine(name: str, model: nn.Module, seqs: Sequence[Seq], layers: Sequence[int], objective: Objective,
                *, layer_config: arch.LayerConfig = None, max_batch_tokens: int = 16384) -> Engine:
    """Build the engine called ``name`` ("fast" or "reference")."""
    if name == "fast":
        return FastEngine(model, seqs, layers, objective, layer_config=layer_config,
                          max_batch_tokens=max_batch_tokens)
    if name == "reference":
        return ReferenceEngine(model, seqs, layers, objective, layer_config=layer_config)
    raise ValueError(f"engine must be 'fast' or 'reference', got {name!r}")
