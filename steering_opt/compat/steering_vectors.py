"""steering-vectors (Chanin et al.) API: ``from steering_opt.compat.steering_vectors import ...`` replaces
``from steering_vectors import ...`` and the code runs unchanged, with steering-vectors' layer numbering.

Thin adapters over the native core: activations are read by :func:`steering_opt.contrastive.extract_activations`,
combined by :func:`steering_opt.contrastive.aggregate_activations`, and steering goes through
:meth:`steering_opt.vector.SteeringVector.patch` (hooks registered by :func:`steering_opt.hooks.attach`).

**Layer numbering is steering-vectors'**: for ``layer_type="decoder_block"`` layer ``L`` is the *output* of
decoder block ``L`` (``output_hidden_states[L + 1]`` for ``L`` below the last block), both where a vector is
read and where it is applied. steering_opt's own ``decoder_block`` layer ``L`` is the residual stream
*entering* block ``L``, so steering-vectors' ``L`` is steering_opt's ``L + 1``;
:meth:`SteeringVector.to_steering_opt` makes that conversion explicitly (nothing is shifted silently). The
other layer types (``self_attn``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``) are the module's
output in both libraries, with the same numbers.

Differences from steering-vectors, kept on purpose:

* token positions (``min_token_index``, ``token_indices``) are the tokens' positions in their sequence, read
  from the model's ``position_ids``: with a KV cache, generated tokens are steered as in a full forward
  (steering-vectors indexes the current forward's columns, so e.g. ``min_token_index=10`` never steers a
  token generated with a cache), and with left padding positions count from the first real token.
  ``min_token_index`` and ``token_indices`` may be combined (AND); ``token_indices`` masks must be 1-D.
* a layer that does not exist raises ``ValueError`` (steering-vectors silently skips it).
* ``train_steering_vector`` aggregates in float32 before casting the vector to the model's dtype, and the
  tokenizer is not modified (no pad token is set on it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .. import arch
from ..contrastive import (
    Aggregator,
    ContrastPair,
    ReadIndex,
    Text,
    ablation_operator,
    ablation_then_addition_operator,
    addition_operator,
    mean_aggregator,
    pca_aggregator,
    tokenize_text,
)
from ..contrastive import aggregate_activations as core_aggregate
from ..contrastive import extract_activations as core_extract
from ..contrastive import logistic_aggregator as core_logistic
from ..hooks import HookHandle, TokenIndices, attach
from ..vector import Operator
from ..vector import SteeringVector as CoreSteeringVector

__all__ = [
    "Aggregator",
    "LayerMatcher",
    "LayerType",
    "ModelLayerConfig",
    "PatchDeltaOperator",
    "SteeringPatchHandle",
    "SteeringVector",
    "SteeringVectorTrainingSample",
    "ablation_operator",
    "ablation_then_addition_operator",
    "addition_operator",
    "aggregate_activations",
    "core_site",
    "extract_activations",
    "get_num_matching_layers",
    "guess_and_enhance_layer_config",
    "logistic_aggregator",
    "mean_aggregator",
    "pca_aggregator",
    "record_activations",
    "train_steering_vector",
]

LayerType = Literal["decoder_block", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"]
#: A template such as ``"model.layers.{num}.mlp"``, or a callable ``(model, num) -> "dotted.path"`` (``num ->
#: path`` is accepted too, as steering-vectors' documentation shows it).
LayerMatcher = str | Callable[..., Any]
#: ``{layer_type: LayerMatcher}``.
ModelLayerConfig = Mapping[str, LayerMatcher]
#: ``operator(activation (b, s, d), vector (d,)) -> delta`` added to the activation.
PatchDeltaOperator = Operator
#: What :meth:`SteeringVector.patch_activations` returns: ``.remove()`` undoes the patch.
SteeringPatchHandle = HookHandle

_LAYER_TYPES: tuple[str, ...] = ("decoder_block", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
#: The core reads and steers every site other than ``decoder_block`` at its module's *output*, and a
#: ``layer_config`` entry names that module exactly; so this site with a config naming the block itself is
#: "the output of block L", which is steering-vectors' ``decoder_block`` (the name is only a key here).
_OUTPUT_SITE = "mlp"


@dataclasses.dataclass
class SteeringVectorTrainingSample:
    """One training pair; ``read_*_token_index`` (if not None) overrides ``read_token_index`` for that text."""

    positive_str: str
    negative_str: str
    read_positive_token_index: int | None = None
    read_negative_token_index: int | None = None


# ------------------------------------------------------------------------------------ layer matching


def _check_layer_type(layer_type: Any) -> str:
    if layer_type not in _LAYER_TYPES:
        raise ValueError(f"`layer_type` must be one of {list(_LAYER_TYPES)}, got {layer_type!r}")
    return str(layer_type)


def _check_layer_config(layer_config: Any) -> Mapping[str, Any]:
    if layer_config is None:
        return {}
    if not isinstance(layer_config, Mapping):
        raise TypeError("`layer_config` must be a dict {layer_type: template or callable} (steering-vectors' "
                        f"ModelLayerConfig), got {type(layer_config).__name__}")
    for key, matcher in layer_config.items():
        if not (isinstance(matcher, str) or callable(matcher)):
            raise TypeError(f"`layer_config[{key!r}]` must be a template such as 'model.layers.{{num}}' or a "
                            f"callable returning a module path, got {type(matcher).__name__}")
        if isinstance(matcher, str) and "{num}" not in matcher:
            raise ValueError(f"`layer_config[{key!r}]`={matcher!r} must contain '{{num}}'")
    return layer_config


def _n_required_positional(fn: Callable[..., Any]) -> int:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _selector(layer_type: str, layer_config: Mapping[str, Any]) -> Callable[[nn.Module, int], nn.Module]:
    """``(model, layer) -> module`` whose *output* steering-vectors reads for ``layer_type`` at ``layer``."""
    matcher = layer_config.get(layer_type)
    if matcher is None:
        return lambda model, layer: arch.get_site_module(model, layer, layer_type)

    def select(model: nn.Module, layer: int) -> nn.Module:
        if isinstance(matcher, str):
            path: Any = matcher.format(num=layer)
        else:
            path = matcher(layer) if _n_required_positional(matcher) == 1 else matcher(model, layer)
        if isinstance(path, nn.Module):
            return path
        if not isinstance(path, str):
            raise TypeError(f"`layer_config[{layer_type!r}]` returned {type(path).__name__} for layer {layer}; "
                            "expected a dotted module path (str)")
        try:
            return model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"`layer_config[{layer_type!r}]`: the model has no module {path!r} (layer {layer})") from e

    return select


def core_site(layer_type: str, layer_config: ModelLayerConfig | None = None) -> tuple[str, dict[str, Any]]:
    """``(layer_type, layer_config)`` for the native core that read and steer exactly the tensor steering-vectors
    uses for ``layer_type`` (with its ``layer_config``): the *output* of the matched module (for
    ``decoder_block``, of block ``L`` itself). Layer numbers are unchanged. Pass them to
    :func:`steering_opt.contrastive.extract_activations` or :meth:`steering_opt.vector.SteeringVector.patch`.
    """
    layer_type = _check_layer_type(layer_type)
    config = _check_layer_config(layer_config)
    site = _OUTPUT_SITE if layer_type == "decoder_block" else layer_type
    return site, {site: _selector(layer_type, config)}


def guess_and_enhance_layer_config(
    model: nn.Module,
    layer_config: ModelLayerConfig | None = None,
    layer_type: LayerType | None = None,
) -> dict[str, LayerMatcher]:
    """``layer_config`` completed with templates (e.g. ``"model.layers.{num}.mlp"``) for the layer types it lacks
    (only ``layer_type`` if given), from steering_opt's architecture table (or, for unknown models, the block
    list it finds). Types the model does not have are left out, as in steering-vectors."""
    config = dict(_check_layer_config(layer_config))
    wanted = _LAYER_TYPES if layer_type is None else (_check_layer_type(layer_type),)
    blocks = arch.find_block_list(model).path
    for site in wanted:
        if site in config or site not in arch.available_sites(model):
            continue
        full = arch.site_path(model, 0, site)
        head = f"{blocks}.0"
        if full == head or full.startswith(head + "."):
            config[site] = f"{blocks}.{{num}}{full[len(head):]}"
    return config


def get_num_matching_layers(model: nn.Module, layer_matcher: LayerMatcher) -> int:
    """How many of layers ``0, 1, 2, ...`` the matcher names an existing module for (stops at the first miss)."""
    select = _selector("decoder_block", _check_layer_config({"decoder_block": layer_matcher}))
    n = 0
    while True:
        try:
            select(model, n)
        except (ValueError, TypeError, IndexError, AttributeError):
            return n
        n += 1


def _layer_list(model: nn.Module, layers: Any) -> list[int] | None:
    if layers is None:
        return None
    items: Any = [layers] if isinstance(layers, numbers.Integral) and not isinstance(layers, bool) else layers
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
        raise TypeError(f"`layers` must be None or a non-empty list of ints, got {layers!r}")
    return [arch.resolve_layer(model, layer, name="layers") for layer in items]


# ------------------------------------------------------------------------------------ recording


@contextlib.contextmanager
def record_activations(
    model: nn.Module,
    layer_type: LayerType = "decoder_block",
    layer_config: ModelLayerConfig | None = None,
    clone_activations: bool = True,
    layer_nums: Sequence[int] | None = None,
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record the activations of every forward inside the block: ``{layer: [activation (b, s, d), ...]}``, one
    entry per forward, in steering-vectors' numbering (``decoder_block`` layer ``L``: the output of block ``L``).

    Args:
        layer_nums: layers to record (negative count from the end; keys are non-negative); None: all.
        clone_activations: store detached copies (else the tensors the model produced).

    The hooks are removed on exit, also on errors.
    """
    select = _selector(_check_layer_type(layer_type), _check_layer_config(layer_config))
    resolved = _layer_list(model, layer_nums)
    wanted = list(range(arch.num_layers(model))) if resolved is None else sorted(set(resolved))
    records: dict[int, list[torch.Tensor]] = defaultdict(list)

    def make(layer: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            h = arch.get_output_hidden_states(output)
            records[layer].append(h.clone().detach() if clone_activations else h)

        return hook

    with attach([(select(model, layer), make(layer), "post") for layer in wanted]):
        yield records


# ------------------------------------------------------------------------------------ training


def _samples(training_samples: Any) -> list[SteeringVectorTrainingSample | tuple[Text, Text]]:
    if isinstance(training_samples, (str, bytes, Mapping)) or not isinstance(training_samples, Sequence):
        raise TypeError("`training_samples` must be a list of (positive, negative) tuples or "
                        f"SteeringVectorTrainingSamples, got {type(training_samples).__name__}")
    if not training_samples:
        raise ValueError("`training_samples` is empty; pass at least one (positive, negative) pair")
    out: list[SteeringVectorTrainingSample | tuple[Text, Text]] = []
    for i, s in enumerate(training_samples):
        if isinstance(s, SteeringVectorTrainingSample):
            for side in ("positive_str", "negative_str"):
                if not isinstance(getattr(s, side), str):
                    raise TypeError(f"`training_samples[{i}].{side}` must be a str")
            for side in ("read_positive_token_index", "read_negative_token_index"):
                v = getattr(s, side)
                if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                    raise TypeError(f"`training_samples[{i}].{side}` must be an int or None, got {v!r}")
            out.append(s)
        elif isinstance(s, ContrastPair):
            out.append((s.positive, s.negative))
        elif isinstance(s, (tuple, list)) and len(s) == 2:
            out.append((s[0], s[1]))
        else:
            raise TypeError(f"`training_samples[{i}]` must be a (positive, negative) tuple or a "
                            f"SteeringVectorTrainingSample, got {type(s).__name__}")
    return out


def _pair(s: SteeringVectorTrainingSample | tuple[Text, Text]) -> tuple[Text, Text]:
    return (s.positive_str, s.negative_str) if isinstance(s, SteeringVectorTrainingSample) else s


def _index_for(read_token_index: ReadIndex, text: str) -> int:
    return read_token_index(text) if callable(read_token_index) else int(read_token_index)


def _lookup(table: dict[str, int], default: ReadIndex, text: str) -> int:
    return table[text] if text in table else _index_for(default, text)


def _groups(samples: list[SteeringVectorTrainingSample | tuple[Text, Text]],
            read_token_index: ReadIndex) -> list[tuple[list[tuple[Text, Text]], ReadIndex]]:
    """Split samples (in order) into runs one core call can read, each with its ``read_token_index``: per-text
    overrides become a ``text -> index`` lookup, and a text needing another index than earlier in the run
    starts a new run."""
    if not any(isinstance(s, SteeringVectorTrainingSample) and (s.read_positive_token_index is not None
                                                                or s.read_negative_token_index is not None)
               for s in samples):
        return [([_pair(s) for s in samples], read_token_index)]
    runs: list[tuple[list[tuple[Text, Text]], dict[str, int]]] = []
    for i, s in enumerate(samples):
        overrides = ((s.read_positive_token_index, s.read_negative_token_index)
                     if isinstance(s, SteeringVectorTrainingSample) else (None, None))
        wanted: dict[str, int] = {}
        for text, override in zip(_pair(s), overrides):
            if not isinstance(text, str):
                continue
            ix = int(override) if override is not None else _index_for(read_token_index, text)
            if wanted.get(text, ix) != ix:
                raise ValueError(f"`training_samples[{i}]`: the same text cannot be read at two token indices")
            wanted[text] = ix
        if not runs or any(runs[-1][1].get(t, ix) != ix for t, ix in wanted.items()):
            runs.append(([], {}))
        runs[-1][0].append(_pair(s))
        runs[-1][1].update(wanted)
    return [(pairs, functools.partial(_lookup, table, read_token_index)) for pairs, table in runs]


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _extract(model: nn.Module, tokenizer: Any, training_samples: Any, layers: Any, layer_type: Any,
             layer_config: Any, read_token_index: ReadIndex, show_progress: bool, batch_size: int,
             tqdm_desc: str) -> tuple[list[int], list[dict[int, torch.Tensor]], list[dict[int, torch.Tensor]]]:
    """Read every sample through the core, ``batch_size`` samples per step (as steering-vectors batches):
    ``(layers, [pos {layer: (b, d)} per batch], [neg ... per batch])``, float32 on the CPU."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    if not (callable(read_token_index) or (isinstance(read_token_index, numbers.Integral)
                                           and not isinstance(read_token_index, bool))):
        raise TypeError(f"`read_token_index` must be an int or a callable text -> int, got {read_token_index!r}")
    samples = _samples(training_samples)
    site, config = core_site(layer_type, layer_config)
    layer_list = _layer_list(model, layers)
    layer_list = list(range(arch.num_layers(model))) if layer_list is None else list(dict.fromkeys(layer_list))
    for layer in layer_list:
        config[site](model, layer)  # every module located before any forward pass
    batches: list[list[tuple[list[tuple[Text, Text]], ReadIndex]]] = []
    for start in range(0, len(samples), batch_size):
        batches.append(_groups(samples[start:start + batch_size], read_token_index))
    # check every text's read position before the first forward
    for runs in batches:
        for pairs, index in runs:
            for pair in pairs:
                for text in pair:
                    ids, rendered = tokenize_text(tokenizer, text, where="training sample")
                    ix = _index_for(index, rendered)
                    if not -len(ids) <= ix < len(ids):
                        raise ValueError(f"`read_token_index`={ix} is out of range for {rendered!r:.60} "
                                         f"({len(ids)} tokens)")
    iterator: Any = batches
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=tqdm_desc)
    pos_out: list[dict[int, torch.Tensor]] = []
    neg_out: list[dict[int, torch.Tensor]] = []
    for runs in iterator:
        parts = [core_extract(model, tokenizer, pairs, layer_list, site, config, index, batch_size)
                 for pairs, index in runs]
        pos_out.append({layer: torch.cat([p[0][layer] for p in parts]) for layer in layer_list})
        neg_out.append({layer: torch.cat([p[1][layer] for p in parts]) for layer in layer_list})
    return layer_list, pos_out, neg_out


def extract_activations(
    model: nn.Module,
    tokenizer: Any,
    training_samples: Sequence[SteeringVectorTrainingSample | tuple[str, str]],
    layers: Sequence[int] | None = None,
    layer_type: LayerType = "decoder_block",
    layer_config: ModelLayerConfig | None = None,
    move_to_cpu: bool = False,
    read_token_index: int | Callable[[str], int] = -1,
    show_progress: bool = False,
    batch_size: int = 1,
    tqdm_desc: str = "Extracting activations",
) -> tuple[dict[int, list[torch.Tensor]], dict[int, list[torch.Tensor]]]:
    """Positive and negative activations, as steering-vectors returns them.

    Returns:
        ``(pos, neg)``: ``{layer: [tensor (b, d) per batch of batch_size samples]}`` in sample order, in the
        model's dtype, on the model's device (on the CPU with ``move_to_cpu=True``); layer numbers are
        steering-vectors' (see the module docstring).
    """
    layer_list, pos, neg = _extract(model, tokenizer, training_samples, layers, layer_type, layer_config,
                                    read_token_index, show_progress, batch_size, tqdm_desc)
    device = torch.device("cpu") if move_to_cpu else arch.input_device(model)
    dtype = _model_dtype(model)
    return ({layer: [b[layer].to(device, dtype) for b in pos] for layer in layer_list},
            {layer: [b[layer].to(device, dtype) for b in neg] for layer in layer_list})


def _concat(acts: Any, name: str) -> dict[int, torch.Tensor]:
    if not isinstance(acts, Mapping):
        raise TypeError(f"`{name}` must be a dict {{layer: [activations (b, d), ...]}}, got {type(acts).__name__}")
    out: dict[int, torch.Tensor] = {}
    for layer, v in acts.items():
        if isinstance(v, torch.Tensor):
            out[layer] = v
        elif isinstance(v, Sequence) and v and all(isinstance(t, torch.Tensor) for t in v):
            out[layer] = torch.cat([t.reshape(-1, t.shape[-1]) for t in v])
        else:
            raise TypeError(f"`{name}[{layer}]` must be a non-empty list of tensors (b, d), got {type(v).__name__}")
    return out


def aggregate_activations(
    pos_acts_by_layer: Mapping[int, Sequence[torch.Tensor] | torch.Tensor],
    neg_acts_by_layer: Mapping[int, Sequence[torch.Tensor] | torch.Tensor],
    aggregator: Aggregator | None = None,
) -> dict[int, torch.Tensor]:
    """``{layer: aggregator(cat(pos), cat(neg))}``: one vector ``(d,)`` per layer (default: mean difference), in
    the activations' dtype and device. Each value is a list of ``(b, d)`` tensors (as :func:`extract_activations`
    returns) or one ``(n, d)`` tensor."""
    pos, neg = _concat(pos_acts_by_layer, "pos_acts_by_layer"), _concat(neg_acts_by_layer, "neg_acts_by_layer")
    vectors = core_aggregate(pos, neg, aggregator)
    return {layer: v.to(pos[layer].device, pos[layer].dtype) for layer, v in vectors.items()}


def train_steering_vector(
    model: nn.Module,
    tokenizer: Any,
    training_samples: Sequence[SteeringVectorTrainingSample | tuple[str, str]],
    layers: Sequence[int] | None = None,
    layer_type: LayerType = "decoder_block",
    layer_config: ModelLayerConfig | None = None,
    move_to_cpu: bool = False,
    read_token_index: int | Callable[[str], int] = -1,
    show_progress: bool = False,
    aggregator: Aggregator | None = None,
    batch_size: int = 1,
    tqdm_desc: str = "Training steering vector",
) -> SteeringVector:
    """Train a steering vector from (positive, negative) pairs (steering-vectors' ``train_steering_vector``).

    Args are steering-vectors' (same order): ``layers`` (None: all; negative count from the end),
    ``layer_type``, ``layer_config`` (``{layer_type: template or callable}``), ``move_to_cpu`` (keep the
    vector on the CPU instead of the model's device), ``read_token_index`` (int or ``text -> int``; a
    :class:`SteeringVectorTrainingSample` may override it per text), ``show_progress`` / ``tqdm_desc`` (a
    progress bar over batches), ``aggregator`` (default: mean of differences), ``batch_size`` (samples per
    step; positives and negatives of a step are read together).

    Returns:
        A :class:`SteeringVector` ``{layer: vector (d,)}`` in steering-vectors' numbering (``decoder_block``
        layer ``L``: the output of block ``L``), in the model's dtype; it applies at the same site.
    """
    layer_list, pos, neg = _extract(model, tokenizer, training_samples, layers, layer_type, layer_config,
                                    read_token_index, show_progress, batch_size, tqdm_desc)
    vectors = core_aggregate({layer: torch.cat([b[layer] for b in pos]) for layer in layer_list},
                             {layer: torch.cat([b[layer] for b in neg]) for layer in layer_list},
                             mean_aggregator() if aggregator is None else aggregator)
    device = torch.device("cpu") if move_to_cpu else arch.input_device(model)
    dtype = _model_dtype(model)
    return SteeringVector({layer: vectors[layer].to(device, dtype) for layer in layer_list}, layer_type)


def logistic_aggregator(sklearn_kwargs: dict[str, Any] | None = None) -> Aggregator:
    """steering-vectors' logistic-regression aggregator: the unit-norm weights of an L2-regularised logistic
    regression separating ``pos - m`` from ``neg - m`` (``m``: each pair's mean), without intercept.

    Fitted by :func:`steering_opt.contrastive.logistic_aggregator` (the centred pairs are symmetric, so its
    intercept is exactly 0 and the optimum is the one scikit-learn finds). ``sklearn_kwargs``: ``C`` and
    ``max_iter`` are used; ``penalty`` must be ``"l2"``; ``fit_intercept``, ``solver``, ``tol``,
    ``random_state``, ``verbose``, ``n_jobs``, ``warm_start`` do not change the (unique) optimum and are
    ignored. Anything else raises ``ValueError``.
    """
    kwargs = dict(sklearn_kwargs or {})
    harmless = {"fit_intercept", "solver", "tol", "random_state", "verbose", "n_jobs", "warm_start"}
    if kwargs.get("penalty", "l2") != "l2":
        raise ValueError(f"logistic_aggregator: only penalty='l2' is supported, got {kwargs['penalty']!r}")
    unknown = sorted(set(kwargs) - harmless - {"C", "max_iter", "penalty"})
    if unknown:
        raise ValueError(f"logistic_aggregator: unsupported sklearn_kwargs {unknown}; supported: C, max_iter, "
                         f"penalty='l2' (and, without effect, {sorted(harmless)})")
    fit = core_logistic(C=kwargs.get("C", 1.0), max_iter=max(int(kwargs.get("max_iter", 500)), 500), normalize=True)

    def logistic(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        mean = (pos + neg) / 2
        return fit(pos - mean, neg - mean)

    return logistic


# ------------------------------------------------------------------------------------ the vector


def _token_indices(token_indices: Any) -> TokenIndices:
    if not isinstance(token_indices, torch.Tensor):
        return token_indices
    mask = token_indices.detach()
    if mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 1:
        raise ValueError(f"`token_indices` as a mask must be 1-D (seq,) (or (1, seq)), got shape {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("`token_indices` tensor must be a mask (containing only 0s and 1s)")
    return mask.bool()


@dataclasses.dataclass
class SteeringVector:
    """steering-vectors' ``SteeringVector``: ``{layer: vector (d,)}`` and the layer type, in steering-vectors'
    numbering (``decoder_block`` layer ``L``: the output of block ``L``). Applied by the native core."""

    layer_activations: dict[int, torch.Tensor]
    layer_type: LayerType = "decoder_block"

    def _core(self) -> CoreSteeringVector:
        return CoreSteeringVector(dict(self.layer_activations), core_site(self.layer_type)[0])

    def patch_activations(
        self,
        model: nn.Module,
        layer_config: ModelLayerConfig | None = None,
        operator: PatchDeltaOperator | None = None,
        multiplier: float = 1.0,
        min_token_index: int | None = None,
        token_indices: list[int] | slice | torch.Tensor | None = None,
    ) -> HookHandle:
        """Steer ``model`` until the returned handle's ``.remove()``: adds ``multiplier * vector`` (or
        ``operator(activation, multiplier * vector)``) at each layer, at the tokens selected by
        ``min_token_index`` / ``token_indices`` (a list of positions, a slice or a 0/1 mask ``(seq,)``)."""
        site, config = core_site(self.layer_type, layer_config)
        return self._core().patch(model, multiplier, 0 if min_token_index is None else min_token_index,
                                  _token_indices(token_indices), operator, config)

    def patch(
        self,
        model: nn.Module,
        layer_config: ModelLayerConfig | None = None,
        operator: PatchDeltaOperator | None = None,
        multiplier: float = 1.0,
        min_token_index: int | None = None,
        token_indices: list[int] | slice | torch.Tensor | None = None,
    ) -> HookHandle:
        """The same as :meth:`patch_activations` (the name steering-vectors' documentation uses)."""
        return self.patch_activations(model, layer_config, operator, multiplier, min_token_index, token_indices)

    @contextlib.contextmanager
    def apply(
        self,
        model: nn.Module,
        layer_config: ModelLayerConfig | None = None,
        operator: PatchDeltaOperator | None = None,
        multiplier: float = 1.0,
        min_token_index: int = 0,
        token_indices: list[int] | slice | torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Context manager: :meth:`patch_activations` on entry, removed on exit (also on errors)."""
        handle = self.patch_activations(model, layer_config, operator, multiplier, min_token_index, token_indices)
        try:
            yield
        finally:
            handle.remove()

    def to(self, *args: Any, **kwargs: Any) -> SteeringVector:
        """A copy with every tensor moved/cast (``torch.Tensor.to`` arguments)."""
        return dataclasses.replace(self, layer_activations={k: v.to(*args, **kwargs)
                                                            for k, v in self.layer_activations.items()})

    def to_steering_opt(self, model: nn.Module | None = None) -> CoreSteeringVector:
        """The same steering as a native :class:`steering_opt.vector.SteeringVector` (for saving, sweeps,
        the optimiser, ...): ``decoder_block`` layer ``L`` becomes steering_opt's layer ``L + 1`` (the input of
        the next block, the same tensor); other layer types keep their numbers. With ``model``, a vector on the
        last block's output (which has no steering_opt ``decoder_block`` layer) raises ``ValueError``."""
        shift = 1 if self.layer_type == "decoder_block" else 0
        if shift and model is not None:
            last = [layer for layer in self.layer_activations if layer + 1 >= arch.num_layers(model)]
            if last:
                raise ValueError(f"layer(s) {last}: the output of the last block has no steering_opt "
                                 "decoder_block layer; keep using this steering-vectors SteeringVector to apply it")
        return CoreSteeringVector({int(k) + shift: v.detach().float().cpu() for k, v in self.layer_activations.items()},
                                  self.layer_type, metadata={"method": "steering-vectors"})
