"""Contrastive steering vectors (CAA and friends) and steering operators.

Recipe: run (positive, negative) text pairs through the model, read one token's activation per text at
every requested layer (:func:`extract_activations`), combine the positive/negative activations into one
vector per layer (:func:`aggregate_activations` with an aggregator), and wrap the result in the same
:class:`~steering_opt.vector.SteeringVector` the optimiser produces (:func:`contrastive_vector` does all
of it, and :func:`train_steering_vector` is the same with positional arguments;
:mod:`steering_opt.compat.steering_vectors` has steering-vectors' exact API and layer numbering)::

    vec = contrastive_vector(model, tok, [("I love it", "I hate it"), ...], layers=[6])
    with vec.apply(model, multiplier=4.0):
        model.generate(...)

Site convention: activations are read at exactly the tensor that steering modifies
(:func:`steering_opt.hooks.site_hook`): for ``layer_type="decoder_block"`` that is the residual
stream *entering* block ``L`` (``hidden_states[L]``), so a vector read at layer ``L`` is applied at layer
``L``. (steering-vectors reads the block *output*: its layer ``L`` is our layer ``L + 1``.) Other sites
read the module's output.

Token choice: by default the *last* token of each text is read (``read_token_index=-1``). Averaging over
the sequence instead is wrecked in many small models (the embedded SmolLM2 included) by the massive
activation of the first token (norm ~24,000 vs ~200 elsewhere): see the README, "Contrastive vectors".

Aggregators map ``(pos (n, d), neg (n, d)) -> vector (d,)``; operators map
``(activation (b, s, d), vector (d,)) -> delta`` that is added to the activation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import arch
from .hooks import capture, frozen_model, pad_sequences, pad_token_id, site_kind
from .progress import check_progress, progress_bar
from .vector import Operator, SiteConfig, SteeringVector, resolve_site_module

__all__ = [
    "Aggregator",
    "ContrastPair",
    "ablation_operator",
    "ablation_then_addition_operator",
    "addition_operator",
    "aggregate_activations",
    "contrastive_vector",
    "extract_activations",
    "logistic_aggregator",
    "mean_aggregator",
    "pca_aggregator",
    "projection_operator",
    "tokenize_text",
    "train_steering_vector",
]

#: A plain string, or a chat as a list of ``{"role": ..., "content": ...}`` messages.
Text = str | Sequence[Mapping[str, str]]
#: ``aggregator(pos (n, d), neg (n, d)) -> vector (d,)``; row ``i`` of both comes from pair ``i``.
Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Which token to read: an index into the text's tokens (negative from the end), or a callable
#: ``text -> index`` (``text`` is the string as tokenised, i.e. after the chat template).
ReadIndex = int | Callable[[str], int]


@dataclasses.dataclass(frozen=True)
class ContrastPair:
    """One training pair: a text showing the behaviour and a matched text that does not.

    Each side is a string or a chat (list of ``{"role", "content"}`` dicts, rendered with the
    tokenizer's chat template; see :func:`tokenize_text`).
    """

    positive: Text
    negative: Text


# ------------------------------------------------------------------------------ aggregators


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    return fn


def mean_aggregator() -> Aggregator:
    """CAA: the mean of the per-pair differences, ``mean_i(pos_i - neg_i)`` (same units as the activations)."""

    def mean(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return (pos - neg).mean(dim=0)

    return _named(mean, "mean")


def pca_aggregator() -> Aggregator:
    """The first principal component of the differences ``d_i = pos_i - neg_i``, unit norm.

    As in steering-vectors, the PCA is of the symmetrised set ``{d_i} ∪ {-d_i}`` (zero mean by
    construction), i.e. the top right-singular vector of the uncentred ``D = [d_1; ...; d_n]``; centring the
    ``d_i`` themselves would remove exactly the shared direction we are after. Sign rule: the returned
    ``u`` satisfies ``mean_i(d_i · u) >= 0`` (it points from negative to positive).

    Raises:
        ValueError: if every difference is zero (no direction exists).
    """

    def pca(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        deltas = (pos - neg).double()
        if not bool(deltas.abs().sum() > 0):
            raise ValueError("pca_aggregator: all positive-negative differences are zero; no direction to find")
        _, _, vh = torch.linalg.svd(deltas, full_matrices=False)
        u = vh[0]
        sign = -1.0 if float((deltas @ u).mean()) < 0 else 1.0
        return (sign * u).to(pos.dtype)

    return _named(pca, "pca")


def logistic_aggregator(C: float = 1.0, max_iter: int = 500, normalize: bool = False) -> Aggregator:
    """The weight vector of an L2-regularised logistic regression separating positive from negative.

    Same model as scikit-learn's default ``LogisticRegression(C=C)`` (which steering-vectors uses), fitted
    with torch (L-BFGS, float64): minimise ``½‖w‖² + C Σ_i log(1 + exp(-y_i (x_i·w + b)))`` with ``y = +1``
    for positive and ``-1`` for negative activations; the intercept ``b`` is not regularised. The objective
    is strictly convex, so the optimum is unique.

    Args:
        C: inverse regularisation strength (> 0).
        max_iter: L-BFGS iterations.
        normalize: return ``w / ‖w‖`` instead of ``w`` (the raw ``w`` has units of 1/activation).
    """
    if isinstance(C, bool) or not isinstance(C, numbers.Real) or not C > 0:
        raise ValueError(f"logistic_aggregator: `C` must be a number > 0, got {C!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"logistic_aggregator: `max_iter` must be an int >= 1, got {max_iter!r}")

    def logistic(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        x = torch.cat([pos, neg]).double()
        y = torch.cat([torch.ones(len(pos)), -torch.ones(len(neg))]).double().to(x.device)
        w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(max_iter), tolerance_grad=1e-12,
                                tolerance_change=1e-15, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = 0.5 * (w * w).sum() + float(C) * torch.nn.functional.softplus(-y * (x @ w + b)).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        out = w.detach()
        if normalize:
            n = out.norm()
            out = out / n if n > 0 else out
        return out.to(pos.dtype)

    return _named(logistic, "logistic")


# ------------------------------------------------------------------------------ operators


def addition_operator() -> Operator:
    """Add the vector (the default): ``delta = v``."""

    def addition(activation: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return vector.to(activation)

    return _named(addition, "addition")


def _unit(vector: torch.Tensor) -> torch.Tensor | None:
    n = vector.norm()
    return None if not bool(n > 0) else vector / n


def ablation_operator() -> Operator:
    """Remove the activation's component along the vector: ``delta = -(h·v̂) v̂`` (a zero vector: no-op).

    Only the direction of the vector matters, so ``multiplier`` has no effect (except 0: no-op)."""

    def ablation(activation: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        u = _unit(vector.to(activation))
        if u is None:
            return torch.zeros_like(activation)
        return -(activation @ u)[..., None] * u

    return _named(ablation, "ablation")


def ablation_then_addition_operator() -> Operator:
    """Remove the component along ``v̂``, then add ``v``: ``delta = -(h·v̂) v̂ + v``, so the activation's
    projection on the direction is exactly ``v`` (same as clamp steering with ``c = 1``)."""
    ablate = ablation_operator()

    def ablation_then_addition(activation: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return ablate(activation, vector) + vector.to(activation)

    return _named(ablation_then_addition, "ablation_then_addition")


def projection_operator(scale: float = 1.0, normalize: bool = True) -> Operator:
    """Projection steering (as in LLM-Steering-Using-Steering-Vectors): scale the activation's own component
    along the vector.

    ``delta = scale · (h·u) u`` with ``u = v/‖v‖`` (``normalize=True``; the vector's length and sign then
    do not matter and ``scale`` sets the strength: ``-1`` removes the component like
    :func:`ablation_operator`, ``0`` does nothing, ``1`` doubles it) or ``u = v`` (``normalize=False``: the
    change grows with ``‖v‖²``, so with the multiplier squared). The steering adapts to how much of the
    direction each token already carries, unlike plain addition. The projection form of steering,
    ``h - s·(h·v̂)v̂``, is ``projection_operator(scale=-s)``.
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"projection_operator: `scale` must be a number, got {scale!r}")
    scale = float(scale)

    def projection(activation: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        u = _unit(vector.to(activation)) if normalize else vector.to(activation)
        if u is None:
            return torch.zeros_like(activation)
        return scale * (activation @ u)[..., None] * u

    return _named(projection, "projection")


# ------------------------------------------------------------------------------ inputs


def _check_messages(text: Any, where: str) -> list[dict[str, str]]:
    msgs = list(text)
    if not msgs:
        raise ValueError(f"{where}: an empty list of chat messages")
    for m in msgs:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"{where}: chat messages must be dicts with str 'role' and 'content', got {m!r}")
    return [dict(m) for m in msgs]


def tokenize_text(tokenizer: Any, text: Text, *, where: str = "text") -> tuple[list[int], str]:
    """Token ids of a string or a chat, and the string that was tokenised.

    A string is tokenised as the tokenizer does by default (with its special tokens, e.g. a BOS). A chat
    (list of ``{"role", "content"}``) is rendered with ``tokenizer.apply_chat_template``: if it ends with an
    assistant message, that message is left open (``continue_final_message=True``, so the last token is
    the answer's last token, not an end-of-turn marker); otherwise the assistant prompt is appended
    (``add_generation_prompt=True``). The rendered string is tokenised without extra special tokens.

    Raises:
        TypeError / ValueError: ``text`` is neither a non-empty string nor a valid chat; the tokenizer has
            no chat template; the text has no tokens.
    """
    if isinstance(text, str):
        if not text:
            raise ValueError(f"{where}: empty string")
        rendered, special = text, True
    elif isinstance(text, Sequence) and not isinstance(text, (bytes, bytearray)):
        msgs = _check_messages(text, where)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where}: chat messages need a tokenizer with a chat template "
                             f"({type(tokenizer).__name__} has none); pass plain strings instead")
        last_is_assistant = msgs[-1]["role"] == "assistant"
        rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=not last_is_assistant,
                                                 continue_final_message=last_is_assistant)
        special = False
    else:
        raise TypeError(f"{where}: expected a string or a list of chat messages, got {type(text).__name__}")
    ids = tokenizer(rendered, add_special_tokens=special)["input_ids"]
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if not ids:
        raise ValueError(f"{where}: tokenises to zero tokens")
    return ids, rendered


def _pairs(training_samples: Any) -> list[tuple[Text, Text]]:
    if isinstance(training_samples, (str, bytes, Mapping)) or not isinstance(training_samples, Sequence):
        raise TypeError("`training_samples` must be a list of (positive, negative) tuples or ContrastPairs, got "
                        f"{type(training_samples).__name__}")
    if len(training_samples) == 0:
        raise ValueError("`training_samples` is empty; pass at least one (positive, negative) pair")
    out: list[tuple[Text, Text]] = []
    for i, s in enumerate(training_samples):
        if isinstance(s, ContrastPair):
            out.append((s.positive, s.negative))
        elif isinstance(s, (tuple, list)) and len(s) == 2:
            out.append((s[0], s[1]))
        else:
            raise TypeError(f"`training_samples[{i}]` must be a (positive, negative) tuple or a ContrastPair, got "
                            f"{type(s).__name__}{f' of length {len(s)}' if isinstance(s, (tuple, list)) else ''}")
    return out


def _resolve_layers(model: nn.Module, layers: Any, layer_config: SiteConfig) -> list[int]:
    if layers is None:
        return list(range(arch.num_layers(model)))
    items: Sequence[Any] = [layers] if isinstance(layers, numbers.Integral) and not isinstance(layers, bool) else layers
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) == 0:
        raise TypeError(f"`layers` must be None, an int or a non-empty list of ints, got {layers!r}")
    out: list[int] = []
    for layer in items:
        try:
            r = arch.resolve_layer(model, layer, name="layers")
        except arch.ArchitectureError:
            if layer_config is None or isinstance(layer, bool) or not isinstance(layer, numbers.Integral) \
                    or layer < 0:
                raise
            r = int(layer)
        if r not in out:
            out.append(r)
    return out


def _read_index(read_token_index: Any, text: str, n_tokens: int, where: str) -> int:
    idx = read_token_index(text) if callable(read_token_index) else read_token_index
    if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
        raise TypeError(f"`read_token_index` must be an int or a callable text -> int; got {idx!r} for {where}")
    index = int(idx)
    if not -n_tokens <= index < n_tokens:
        raise ValueError(f"`read_token_index`={idx} is out of range for {where} ({n_tokens} tokens)")
    return index % n_tokens


# ------------------------------------------------------------------------------ extraction


def extract_activations(
    model: nn.Module,
    tokenizer: Any,
    training_samples: Sequence[tuple[Text, Text] | ContrastPair],
    layers: int | Sequence[int] | None = None,
    layer_type: str = "decoder_block",
    layer_config: SiteConfig = None,
    read_token_index: ReadIndex = -1,
    batch_size: int = 1,
    show_progress: bool | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Read one token's activation per text, at every layer, for positive and negative texts.

    Texts are batched (``batch_size`` sequences per forward, positives and negatives mixed, sorted by
    length to limit padding) and padded on the tokenizer's ``padding_side``; ``position_ids`` count from
    each row's first real token, so every activation equals the one of the text run alone (tested to
    1e-5 for left and right padding). One forward per batch serves all layers, and it stops after the
    deepest requested module has run.

    Args:
        model: a HuggingFace causal LM (any model :mod:`steering_opt.arch` can navigate).
        tokenizer: its tokenizer.
        training_samples: ``(positive, negative)`` tuples or :class:`ContrastPair` s; each text a string or a
            chat (list of ``{"role", "content"}`` dicts, see :func:`tokenize_text`).
        layers: block indices (negative from the end); ``None``: every layer.
        layer_type: the site to read (``"decoder_block"``: residual stream entering the block;
            ``"self_attn"``, ``"mlp"``, ``"input_layernorm"``, ``"post_attention_layernorm"``: the output).
        layer_config: module override, see :func:`steering_opt.vector.resolve_site_module`.
        read_token_index: which token of each text to read: an int (default ``-1``, the last token;
            negative counts from the end of the text's own tokens, padding excluded) or a callable
            ``text -> int`` (called with the string as tokenised).
        batch_size: sequences per forward pass (>= 1).
        show_progress: a progress bar over batches: ``None`` (default) when a person is watching (Jupyter, or
            stderr a terminal; see :mod:`steering_opt.progress`), ``True`` / ``False`` always / never.

    Returns:
        ``(positive, negative)``: two dicts ``{layer: tensor (n_pairs, d)}`` (float32, CPU), row ``i`` from
        pair ``i``; layers as non-negative ints.

    Raises:
        TypeError / ValueError: on bad arguments, before any forward pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(tokenizer):
        raise TypeError(f"`tokenizer` must be a HuggingFace tokenizer (callable), got {type(tokenizer).__name__}")
    pairs = _pairs(training_samples)
    if not isinstance(layer_type, str):
        raise TypeError(f"`layer_type` must be a str (one of {arch.SITES}), got {type(layer_type).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    if not (callable(read_token_index) or (isinstance(read_token_index, numbers.Integral)
                                           and not isinstance(read_token_index, bool))):
        raise TypeError(f"`read_token_index` must be an int or a callable text -> int, got {read_token_index!r}")
    check_progress(show_progress, "show_progress")
    layer_list = _resolve_layers(model, layers, layer_config)
    modules = [resolve_site_module(model, layer, layer_type, layer_config) for layer in layer_list]

    # tokenise everything (and check every read position) before running the model
    seqs: list[tuple[list[int], int]] = []  # (ids, read index) for pos0, neg0, pos1, neg1, ...
    for i, (pos_text, neg_text) in enumerate(pairs):
        for side, text in (("positive", pos_text), ("negative", neg_text)):
            where = f"training_samples[{i}] ({side})"
            ids, rendered = tokenize_text(tokenizer, text, where=where)
            arch.check_context_length(model, len(ids), where)
            seqs.append((ids, _read_index(read_token_index, rendered, len(ids), where)))

    pad_id = pad_token_id(tokenizer, model)
    side = "left" if getattr(tokenizer, "padding_side", "right") == "left" else "right"
    order = sorted(range(len(seqs)), key=lambda j: -len(seqs[j][0]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    device = arch.input_device(model)
    d = arch.hidden_size(model)
    out = {layer: torch.empty(len(seqs), d, dtype=torch.float32) for layer in layer_list}
    points = {layer: (module, site_kind(layer_type)) for layer, module in zip(layer_list, modules)}

    def read_batch(batch: list[int]) -> dict[int, torch.Tensor]:
        """``{layer: (len(batch), d)}``: the read token of each text of ``batch``; the forward stops after the
        deepest requested module."""
        ids, mask = pad_sequences([seqs[j][0] for j in batch], pad_id, side=side)
        width = ids.shape[1]
        rows = torch.arange(len(batch))
        cols = torch.tensor([(width - len(seqs[j][0]) if side == "left" else 0) + seqs[j][1] for j in batch])
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)

        def forward() -> Any:
            return model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=position_ids.to(device), use_cache=False)

        return capture(forward, points,
                       read=lambda _, h: h[rows.to(h.device), cols.to(h.device)].detach().float().cpu())

    bar = progress_bar(len(batches), "extract activations", progress=show_progress, unit="batch")
    with frozen_model(model), torch.no_grad(), contextlib.closing(bar):
        for batch in batches:
            captured = read_batch(batch)
            missing = [layer for layer in layer_list if layer not in captured]
            if missing:
                raise RuntimeError(f"extract_activations: the {layer_type!r} modules of layers {missing} did not "
                                   "run during the forward pass; check `layer_config`")
            for layer in layer_list:
                out[layer][torch.tensor(batch)] = captured[layer]
            bar.update(1)
    pos = {layer: t[0::2].contiguous() for layer, t in out.items()}
    neg = {layer: t[1::2].contiguous() for layer, t in out.items()}
    return pos, neg


# ------------------------------------------------------------------------------ aggregation / training


def _as_matrix(acts: Any, name: str, layer: int) -> torch.Tensor:
    if isinstance(acts, torch.Tensor):
        t = acts
    elif isinstance(acts, Sequence) and acts and all(isinstance(a, torch.Tensor) for a in acts):
        t = torch.stack([a.reshape(-1) for a in acts])
    else:
        raise TypeError(f"`{name}[{layer}]` must be a tensor (n, d) or a non-empty list of (d,) tensors, "
                        f"got {type(acts).__name__}")
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"`{name}[{layer}]` must have shape (n, d) with n >= 1, got {tuple(t.shape)}")
    return t.float()


def aggregate_activations(
    pos_acts: Mapping[int, torch.Tensor | Sequence[torch.Tensor]],
    neg_acts: Mapping[int, torch.Tensor | Sequence[torch.Tensor]],
    aggregator: Aggregator | None = None,
) -> dict[int, torch.Tensor]:
    """One vector per layer: ``aggregator(pos_acts[layer], neg_acts[layer])``.

    Args:
        pos_acts, neg_acts: ``{layer: (n, d) tensor}`` (or lists of ``(d,)`` tensors), as returned by
            :func:`extract_activations`; the same layers on both sides.
        aggregator: ``(pos (n, d), neg (n, d)) -> (d,)``; default :func:`mean_aggregator`.

    Returns:
        ``{layer: vector (d,)}`` (float32).
    """
    aggregator = mean_aggregator() if aggregator is None else aggregator
    if not callable(aggregator):
        raise TypeError(f"`aggregator` must be a callable (pos, neg) -> vector, got {type(aggregator).__name__}")
    if not isinstance(pos_acts, Mapping) or not isinstance(neg_acts, Mapping):
        raise TypeError("`pos_acts` and `neg_acts` must be dicts {layer: activations}")
    if set(pos_acts) != set(neg_acts) or not pos_acts:
        raise ValueError(f"`pos_acts` and `neg_acts` must have the same non-empty set of layers, got "
                         f"{sorted(pos_acts)} and {sorted(neg_acts)}")
    out: dict[int, torch.Tensor] = {}
    for layer in pos_acts:
        pos = _as_matrix(pos_acts[layer], "pos_acts", layer)
        neg = _as_matrix(neg_acts[layer], "neg_acts", layer)
        if pos.shape[1] != neg.shape[1]:
            raise ValueError(f"layer {layer}: positive and negative activations have widths {pos.shape[1]} and "
                             f"{neg.shape[1]}")
        vec = aggregator(pos, neg)
        if not isinstance(vec, torch.Tensor) or tuple(vec.shape) != (pos.shape[1],):
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"aggregator returned {shape} for layer {layer}; expected a tensor of shape "
                             f"({pos.shape[1]},)")
        out[int(layer)] = vec.detach().float()
    return out


def contrastive_vector(
    model: nn.Module,
    tokenizer: Any,
    training_samples: Sequence[tuple[Text, Text] | ContrastPair],
    layers: int | Sequence[int] | None = None,
    *,
    aggregator: Aggregator | None = None,
    layer_type: str = "decoder_block",
    layer_config: SiteConfig = None,
    read_token_index: ReadIndex = -1,
    batch_size: int = 1,
    show_progress: bool | None = None,
) -> SteeringVector:
    """A steering vector from contrast pairs: :func:`extract_activations` then :func:`aggregate_activations`.

    See those two for the arguments. ``aggregator`` defaults to :func:`mean_aggregator` (CAA); also
    :func:`pca_aggregator`, :func:`logistic_aggregator` or any ``(pos (n, d), neg (n, d)) -> (d,)`` function.

    Returns:
        A :class:`~steering_opt.vector.SteeringVector` with one vector per layer, ``layer_type`` as given,
        and ``metadata`` recording the method, aggregator, read index and number of pairs. Apply it with
        ``.apply(model, ...)`` (pass the same ``layer_config`` if you used one).
    """
    aggregator = mean_aggregator() if aggregator is None else aggregator
    if not callable(aggregator):
        raise TypeError(f"`aggregator` must be a callable (pos, neg) -> vector, got {type(aggregator).__name__}")
    if layer_type not in arch.SITES:
        raise ValueError(f"`layer_type` must be one of {arch.SITES}, got {layer_type!r}")
    pos, neg = extract_activations(model, tokenizer, training_samples, layers, layer_type, layer_config,
                                   read_token_index, batch_size, show_progress)
    vectors = aggregate_activations(pos, neg, aggregator)
    n_pairs = next(iter(pos.values())).shape[0]
    meta: dict[str, Any] = {
        "method": "contrastive",
        "aggregator": getattr(aggregator, "__name__", type(aggregator).__name__),
        "read_token_index": "callable" if callable(read_token_index) else int(read_token_index),
        "n_pairs": int(n_pairs),
    }
    return SteeringVector(layer_activations=vectors, layer_type=layer_type, metadata=meta)


def train_steering_vector(
    model: nn.Module,
    tokenizer: Any,
    training_samples: Sequence[tuple[Text, Text] | ContrastPair],
    layers: int | Sequence[int] | None = None,
    layer_type: str = "decoder_block",
    layer_config: SiteConfig = None,
    read_token_index: ReadIndex = -1,
    batch_size: int = 1,
    show_progress: bool | None = None,
    aggregator: Aggregator | None = None,
) -> SteeringVector:
    """:func:`contrastive_vector` with every argument also accepted by position (``so.train_steering_vector``).

    Layers are steering_opt's: ``decoder_block`` layer ``L`` is the residual stream *entering* block ``L``.
    For steering-vectors' own signature and numbering (its layer ``L`` is the *output* of block ``L``) use
    :func:`steering_opt.compat.steering_vectors.train_steering_vector`.
    """
    return contrastive_vector(model, tokenizer, training_samples, layers, aggregator=aggregator,
                              layer_type=layer_type, layer_config=layer_config, read_token_index=read_token_index,
                              batch_size=batch_size, show_progress=show_progress)
