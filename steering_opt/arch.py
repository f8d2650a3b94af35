"""Where things live inside a model: the one module that knows model architectures.

Architecture knowledge is *data*: :data:`ARCHITECTURES` maps ``config.model_type`` to an
:class:`ArchSpec` (the dotted path of the decoder-block ``ModuleList`` and, for each *site*, the path
of a module relative to one block). Adding an architecture is adding a table row. Models whose
``model_type`` is not in the table are handled by a structural fallback (see :func:`find_block_list`)
or by a user ``layer_config`` override (see :func:`get_site_module`).

Sites are named by *role*, after Llama's module names:

* ``decoder_block`` - the block itself; a forward pre-hook on it sees the residual stream entering
  the block (``output_hidden_states=True``'s ``hidden_states[layer]``).
* ``self_attn`` / ``mlp`` - the attention and MLP sub-modules.
* ``input_layernorm`` - the norm applied to the block input before attention.
* ``post_attention_layernorm`` - the norm whose output feeds the MLP (GPT-2's ``ln_2``; Gemma-2's
  ``pre_feedforward_layernorm``, because Gemma-2's own ``post_attention_layernorm`` normalises the
  attention *output* instead; in GPT-NeoX's default parallel-residual blocks it reads the block input).

Also here: helpers to read/replace the hidden-state argument inside forward pre-hooks
(:func:`get_hidden_states`, :func:`replace_hidden_states`) and block outputs in forward hooks, and
:func:`truncated_view`, a stand-in for the model that runs only the blocks from a given layer on.
"""

from __future__ import annotations

import contextlib
import numbers
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .util import uninterruptible

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ArchitectureError",
    "BlockList",
    "check_context_length",
    "context_length",
    "LayerConfig",
    "PER_LAYER_CONFIG_ATTRS",
    "SITES",
    "available_sites",
    "find_block_list",
    "get_blocks",
    "get_hidden_states",
    "get_output_hidden_states",
    "get_site_module",
    "hidden_size",
    "model_fingerprint",
    "num_layers",
    "replace_hidden_states",
    "replace_output_hidden_states",
    "resolve_layer",
    "site_path",
    "truncated_blocks",
    "truncated_view",
]

SITES: tuple[str, ...] = ("decoder_block", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")

#: User override of where a layer's module lives: a template such as ``"model.layers.{num}"`` (the
#: block) or ``"model.layers.{num}.mlp"`` (a sub-module), formatted with ``num=layer`` and resolved
#: with ``model.get_submodule``; or a callable ``(model, layer) -> nn.Module``; or ``None`` (use the table).
LayerConfig = str | Callable[[nn.Module, int], nn.Module] | None

#: Config attributes holding one entry per decoder layer, indexed by the position in the loop over
#: blocks (e.g. ``layer_types[i]`` selects the sliding-window or full attention mask in Qwen2/Gemma-2).
PER_LAYER_CONFIG_ATTRS: tuple[str, ...] = ("layer_types",)


class ArchitectureError(ValueError):
    """The decoder blocks (or a site) of a model could not be located."""


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture is laid out.

    Attributes:
        blocks: dotted path (from the ``*ForCausalLM`` model) of the ``nn.ModuleList`` of blocks.
        sites: site name -> dotted path relative to one block (``""`` is the block itself).
        truncatable: whether :func:`truncated_blocks` has been verified exact for this architecture.
    """

    blocks: str
    sites: Mapping[str, str]
    truncatable: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", MappingProxyType(dict(self.sites)))


_LLAMA_SITES = {
    "decoder_block": "",
    "self_attn": "self_attn",
    "mlp": "mlp",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}
_LLAMA_LIKE = ArchSpec(blocks="model.layers", sites=_LLAMA_SITES, truncatable=True)

#: ``config.model_type`` -> layout. ``truncatable`` is only set where ``tests/test_arch.py`` checks
#: that :func:`truncated_blocks` reproduces the full forward exactly.
ARCHITECTURES: Mapping[str, ArchSpec] = MappingProxyType(
    {
        "llama": _LLAMA_LIKE,
        "mistral": _LLAMA_LIKE,
        "qwen2": _LLAMA_LIKE,
        "qwen3": _LLAMA_LIKE,
        "gemma": _LLAMA_LIKE,
        "phi3": _LLAMA_LIKE,
        "gemma2": ArchSpec(
            blocks="model.layers",
            sites={
                **_LLAMA_SITES,
                "post_attention_layernorm": "pre_feedforward_layernorm",  # the norm that feeds the MLP
                "pre_feedforward_layernorm": "pre_feedforward_layernorm",
                "post_feedforward_layernorm": "post_feedforward_layernorm",
            },
            truncatable=True,
        ),
        "gpt2": ArchSpec(
            blocks="transformer.h",
            sites={
                "decoder_block": "",
                "self_attn": "attn",
                "mlp": "mlp",
                "input_layernorm": "ln_1",
                "post_attention_layernorm": "ln_2",
            },
            truncatable=True,
        ),
        "gpt_neox": ArchSpec(
            blocks="gpt_neox.layers",
            sites={
                "decoder_block": "",
                "self_attn": "attention",
                "mlp": "mlp",
                "input_layernorm": "input_layernorm",
                "post_attention_layernorm": "post_attention_layernorm",
            },
            truncatable=True,
        ),
    }
)

#: For models not in the table: candidate child names per site, first match wins.
_FALLBACK_SITE_CANDIDATES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "decoder_block": ("",),
        "self_attn": ("self_attn", "attn", "attention", "self_attention"),
        "mlp": ("mlp", "feed_forward", "ffn"),
        "input_layernorm": ("input_layernorm", "ln_1", "attention_norm"),
        "post_attention_layernorm": ("post_attention_layernorm", "ln_2", "ffn_norm"),
    }
)

_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_SIZE_ATTRS = ("hidden_size", "n_embd", "d_model")
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length")


@dataclass(frozen=True)
class BlockList:
    """Where the numbered decoder blocks live.

    Attributes:
        parent: the module owning the ``ModuleList``.
        attr: its attribute name on ``parent`` (e.g. ``"layers"`` or ``"h"``).
        blocks: the ``ModuleList`` itself.
        path: dotted path from the model, e.g. ``"model.layers"``.
    """

    parent: nn.Module
    attr: str
    blocks: nn.ModuleList = field(repr=False)
    path: str


# ----------------------------------------------------------------------------------------- config


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _text_config(model: nn.Module) -> Any:
    cfg = _config(model)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config(decoder=True)
        except Exception:  # odd configs: fall back to the top-level one
            return cfg
    return cfg


def _model_type(model: nn.Module) -> str | None:
    cfg = _config(model)
    return getattr(cfg, "model_type", None) or None


def _config_int(cfg: Any, names: tuple[str, ...]) -> int | None:
    if cfg is None:
        return None
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _spec(model: nn.Module) -> ArchSpec | None:
    mt = _model_type(model)
    return ARCHITECTURES.get(mt) if mt is not None else None


# ----------------------------------------------------------------------------------------- blocks


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _block_list_at(model: nn.Module, path: str) -> BlockList | None:
    mod = _get(model, path)
    if not isinstance(mod, nn.ModuleList):
        return None
    parent_path, _, attr = path.rpartition(".")
    parent = _get(model, parent_path)
    if parent is None or parent._modules.get(attr) is not mod:
        return None
    return BlockList(parent=parent, attr=attr, blocks=mod, path=path)


def _search_block_list(model: nn.Module) -> tuple[BlockList | None, int | None, list[str]]:
    """Structural fallback: the largest homogeneous ModuleList (of the configured length, if known)."""
    expected = _config_int(_text_config(model), _LAYER_COUNT_ATTRS)
    seen: list[str] = []
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or not name:
            continue
        seen.append(f"{name} ({len(mod)} x {type(mod[0]).__name__})")
        if len({type(child) for child in mod}) != 1:
            continue
        if expected is not None and len(mod) != expected:
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        key = (len(mod), n_params)
        if best is None or key > best[:2]:
            best = (len(mod), n_params, name, mod)
    if best is None:
        return None, expected, seen
    return _block_list_at(model, best[2]), expected, seen


def _table_block_list(model: nn.Module) -> BlockList | None:
    """The block list at the table's path (or a suffix of it, for base models), if any."""
    spec = _spec(model)
    if spec is None:
        return None
    parts = spec.blocks.split(".")
    for i in range(len(parts)):
        found = _block_list_at(model, ".".join(parts[i:]))
        if found is not None:
            return found
    return None


def find_block_list(model: nn.Module) -> BlockList:
    """Locate the ``nn.ModuleList`` of decoder blocks of ``model``.

    Known ``config.model_type`` values are looked up in :data:`ARCHITECTURES` (the path is also tried
    without its leading components, so base models such as ``LlamaModel`` work). Otherwise the
    largest ``ModuleList`` whose children all share one class, and whose length equals
    ``config.num_hidden_layers`` (or ``n_layer`` / ``num_layers``) when the config says, is used.

    Raises:
        ArchitectureError: (a ``ValueError``) if no such list exists; the message lists what was
            searched and how to pass a ``layer_config`` override instead.
    """
    found = _table_block_list(model)
    if found is not None:
        return found
    spec = _spec(model)
    found, expected, seen = _search_block_list(model)
    if found is not None:
        return found
    mt = _model_type(model)
    known = f"table path {spec.blocks!r} not found; " if spec is not None else ""
    length = f" of length {expected} (config's layer count)" if expected is not None else ""
    raise ArchitectureError(
        f"Cannot find the decoder blocks of {type(model).__name__} (model_type={mt!r}): {known}"
        f"searched named_modules() for a ModuleList{length} whose children all share one class; "
        f"ModuleLists seen: {', '.join(seen) or 'none'}. Pass layer_config='path.to.blocks.{{num}}' "
        "(a template formatted with num=layer) or layer_config=lambda model, layer: <module>, or add "
        "the architecture to steering_opt.arch.ARCHITECTURES."
    )


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks (see :func:`find_block_list`)."""
    return find_block_list(model).blocks


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks of ``model``."""
    return len(get_blocks(model))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream: ``config.hidden_size`` / ``n_embd`` / ``d_model``, else the
    width of the input embedding matrix."""
    value = _config_int(_text_config(model), _HIDDEN_SIZE_ATTRS)
    if value is not None:
        return value
    get_emb = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_emb() if callable(get_emb) else None
    except (NotImplementedError, AttributeError):
        emb = None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[-1])
    raise ArchitectureError(
        f"Cannot determine the hidden size of {type(model).__name__}: no config.hidden_size/n_embd/d_model "
        "and no input embedding matrix."
    )


def context_length(model: nn.Module) -> int | None:
    """The longest token sequence the model accepts (``config.max_position_embeddings`` / ``n_positions``
    / ``max_sequence_length``), or ``None`` if the config does not say."""
    return _config_int(_text_config(model), _CONTEXT_ATTRS)


def check_context_length(model: nn.Module, n_tokens: int, what: str) -> None:
    """Raise ``ValueError`` (before any forward pass) if ``what`` (``n_tokens`` long) does not fit the
    model's context; positions past it would crash inside the model (learned position embeddings) or
    silently extrapolate (rotary ones)."""
    n = context_length(model)
    if n is not None and n_tokens > n:
        raise ValueError(f"{what} is {n_tokens} tokens, longer than the model's context ({n} tokens)")


def resolve_layer(model: nn.Module, layer: int, *, name: str = "layer") -> int:
    """Check a block index and make it non-negative (``-1`` is the last block).

    Raises:
        TypeError: if ``layer`` is not an integer (``bool`` is rejected too).
        ValueError: if it is out of range; the message names the argument ``name`` and the valid range.
    """
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(layer).__name__} {layer!r}")
    layer = int(layer)
    n = num_layers(model)
    if not -n <= layer < n:
        raise ValueError(f"{name}={layer} is out of range for a model with {n} layers (valid: {-n}..{n - 1})")
    return layer % n


# ----------------------------------------------------------------------------------------- sites


def _site_table(model: nn.Module) -> Mapping[str, str]:
    """site -> path relative to a block, for this model (table row, or probed for unknown models)."""
    spec = _spec(model)
    if spec is not None and _table_block_list(model) is not None:
        return spec.sites
    block = get_blocks(model)[0]
    sites: dict[str, str] = {}
    for site, candidates in _FALLBACK_SITE_CANDIDATES.items():
        for cand in candidates:
            if _get(block, cand) is not None:
                sites[site] = cand
                break
    return sites


def available_sites(model: nn.Module) -> tuple[str, ...]:
    """The site names :func:`get_site_module` accepts for ``model`` (without ``layer_config``)."""
    return tuple(_site_table(model))


def _site_rel_path(model: nn.Module, site: str) -> str:
    if not isinstance(site, str):
        raise TypeError(f"site must be a str, got {type(site).__name__} {site!r}")
    table = _site_table(model)
    if site not in table:
        raise ValueError(
            f"Unknown site {site!r} for model_type={_model_type(model)!r}. Standard sites: {list(SITES)}; "
            f"available for this architecture: {list(table)}. For anything else pass a layer_config "
            "override (e.g. 'model.layers.{num}.mlp')."
        )
    return table[site]


def _resolve_for_override(model: nn.Module, layer: int) -> int:
    """Like resolve_layer, but a model whose blocks cannot be found accepts any layer >= 0."""
    try:
        return resolve_layer(model, layer)
    except ArchitectureError:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}") from None
        if layer < 0:
            raise ValueError(
                f"layer={layer}: negative layers need a model whose blocks can be found; "
                "pass a non-negative layer with this layer_config"
            ) from None
        return int(layer)


def _check_override(layer_config: LayerConfig, site: str) -> None:
    if site != "decoder_block":
        raise ValueError(
            f"site={site!r} cannot be combined with layer_config: layer_config already names the exact "
            "module (write e.g. 'model.layers.{num}.mlp')"
        )
    if not (isinstance(layer_config, str) or callable(layer_config)):
        raise TypeError(
            f"layer_config must be a str template, a callable (model, layer) -> module, or None; "
            f"got {type(layer_config).__name__}"
        )


def _format_template(template: str, layer: int) -> str:
    try:
        return template.format(num=layer)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"layer_config={template!r} must be a template with a '{{num}}' field (e.g. 'model.layers.{{num}}')"
        ) from e


def get_site_module(
    model: nn.Module, layer: int, site: str = "decoder_block", layer_config: LayerConfig = None
) -> nn.Module:
    """The module at ``site`` of block ``layer`` (negative ``layer`` counts from the end).

    With ``layer_config`` the table is bypassed: a string template is formatted with ``num=layer``
    and resolved with ``model.get_submodule``; a callable is called as ``layer_config(model, layer)``.
    ``layer_config`` names the exact module, so it cannot be combined with a ``site`` other than
    ``"decoder_block"``.

    Raises:
        ValueError: unknown site (message lists :data:`SITES` and those available for this
            architecture), out-of-range layer, or a template that does not resolve.
        TypeError: non-int layer, or a ``layer_config`` callable that does not return a module.
    """
    if layer_config is not None:
        _check_override(layer_config, site)
        layer = _resolve_for_override(model, layer)
        if isinstance(layer_config, str):
            path = _format_template(layer_config, layer)
            try:
                return model.get_submodule(path)
            except AttributeError as e:
                raise ValueError(f"layer_config={layer_config!r}: model has no submodule {path!r}") from e
        module = layer_config(model, layer)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"layer_config callable returned {type(module).__name__} for layer {layer}, not an nn.Module"
            )
        return module
    rel = _site_rel_path(model, site)
    layer = resolve_layer(model, layer)
    block = get_blocks(model)[layer]
    found = _get(block, rel)
    if found is None:
        raise ArchitectureError(
            f"block {layer} ({type(block).__name__}) has no submodule {rel!r} for site {site!r}; "
            "pass a layer_config override (e.g. 'model.layers.{num}.mlp')"
        )
    return found


def site_path(model: nn.Module, layer: int, site: str = "decoder_block", layer_config: LayerConfig = None) -> str:
    """Dotted path (from ``model``) of :func:`get_site_module`'s result, for display and metadata."""
    if layer_config is not None:
        if isinstance(layer_config, str):
            _check_override(layer_config, site)
            return _format_template(layer_config, _resolve_for_override(model, layer))
        target = get_site_module(model, layer, site, layer_config)
        for name, mod in model.named_modules():
            if mod is target:
                return name
        return f"<{type(target).__name__} from layer_config(model, {layer})>"
    rel = _site_rel_path(model, site)
    path = f"{find_block_list(model).path}.{resolve_layer(model, layer)}"
    return f"{path}.{rel}" if rel else path


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identify a model for saved metadata.

    Returns ``{"model_type", "architecture", "hidden_size", "num_layers", "name_or_path"}``.
    """
    cfg = _config(model)
    archs = getattr(cfg, "architectures", None)
    try:
        n_layers: int | None = num_layers(model)
    except ArchitectureError:
        n_layers = _config_int(_text_config(model), _LAYER_COUNT_ATTRS)
    try:
        width: int | None = hidden_size(model)
    except ArchitectureError:
        width = None
    return {
        "model_type": _model_type(model),
        "architecture": archs[0] if archs else type(model).__name__,
        "hidden_size": width,
        "num_layers": n_layers,
        "name_or_path": getattr(cfg, "_name_or_path", None) or None,
    }


# ----------------------------------------------------------------------------- hook arguments


def _no_hidden_states(kwargs: dict) -> str:
    return f"no hidden states in the block's arguments (no positional args; kwargs: {sorted(kwargs)})"


def get_hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a block, from a ``with_kwargs=True`` forward pre-hook's arguments.

    Transformers passes it as ``kwargs["hidden_states"]`` or as the first positional argument.
    """
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    if args:
        return args[0]
    raise ValueError(_no_hidden_states(kwargs))


def replace_hidden_states(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    """Return ``(args, kwargs)`` with the hidden-state input replaced by ``new`` (inputs not mutated).

    Return the result from a ``with_kwargs=True`` forward pre-hook.
    """
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": new}
    if args:
        return (new, *args[1:]), kwargs
    raise ValueError(_no_hidden_states(kwargs))


def get_output_hidden_states(output: Any) -> torch.Tensor:
    """The hidden states in a block's output (a tensor in transformers 5, a tuple in older versions)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unrecognised block output of type {type(output).__name__}")


def replace_output_hidden_states(output: Any, new: torch.Tensor) -> Any:
    """A block's output with its hidden states replaced by ``new`` (same container type)."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)([new, *output[1:]])
    raise TypeError(f"unrecognised block output of type {type(output).__name__}")


# --------------------------------------------------------------------------------- truncation

_TRUNCATED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _truncation_plan(model: nn.Module, start: int, what: str) -> tuple[BlockList, int, list[tuple[Any, str, Any]]]:
    """Checks shared by :func:`truncated_view` / :func:`truncated_blocks`: the block list, ``start`` resolved,
    and the per-layer config entries ``(config, attr, value rotated left by start)`` to use."""
    spec = _spec(model)
    if spec is None or not spec.truncatable or not type(model).__module__.startswith("transformers.models."):
        raise NotImplementedError(
            f"{what} is only verified for transformers' own model classes of the types "
            f"{sorted(k for k, v in ARCHITECTURES.items() if v.truncatable)}, not "
            f"{type(model).__module__}.{type(model).__qualname__} (model_type={_model_type(model)!r})")
    start = resolve_layer(model, start, name="start")
    bl = find_block_list(model)
    n = len(bl.blocks)
    rotated: list[tuple[Any, str, Any]] = []
    for cfg in (_config(model), _text_config(model), getattr(bl.parent, "config", None)):
        if cfg is None or any(cfg is c for c, _, _ in rotated):
            continue
        for attr in PER_LAYER_CONFIG_ATTRS:
            value = getattr(cfg, attr, None)
            if isinstance(value, (list, tuple)) and len(value) == n:
                rotated.append((cfg, attr, type(value)([*value[start:], *value[:start]])))
    return bl, start, rotated


def _shallow_copy(obj: Any) -> Any:
    """A new object of ``obj``'s class sharing every attribute value (no ``__init__``, no ``__copy__``)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


def truncated_view(model: nn.Module, start: int) -> nn.Module:
    """A stand-in for ``model`` running only the blocks ``start, start+1, ...``; ``model`` is not modified.

    The modules on the path from ``model`` to the block ``ModuleList`` are shallow copies (sharing every
    parameter, buffer, sub-module and hook) whose block list is ``blocks[start:]`` (the same block objects,
    so their hooks fire) and whose config has the per-layer entries of :data:`PER_LAYER_CONFIG_ATTRS` (e.g.
    ``layer_types``) rotated left by ``start``, so the loop's ``i``-th block gets its own mask type. Other
    users of the model, in any thread, see nothing. The embeddings still run: feed the real input and
    replace block ``start``'s hidden-state input with a pre-hook (e.g. a tensor captured from a full
    forward); the logits are then the full model's. Pass ``use_cache=False``; ``output_hidden_states`` is
    not meaningful. Build the view when needed (it copies the path's train/eval flags when made).

    Raises:
        NotImplementedError: architectures not verified exact (``ArchSpec.truncatable``), model classes not
            defined in ``transformers.models``. Callers catch it and run the full model instead.
    """
    bl, start, rotated = _truncation_plan(model, start, "truncated_view")
    configs: dict[int, Any] = {}
    for cfg, attr, value in rotated:
        object.__setattr__(configs.setdefault(id(cfg), _shallow_copy(cfg)), attr, value)
    names = bl.path.split(".")[:-1]
    chain = [model]
    for name in names:
        chain.append(chain[-1].get_submodule(name))
    copies = [_shallow_copy(m) for m in chain]
    for i, c in enumerate(copies):
        c.__dict__["_modules"] = dict(chain[i]._modules)
        if i + 1 < len(copies):
            c.__dict__["_modules"][names[i]] = copies[i + 1]
        cfg = c.__dict__.get("config")
        if cfg is not None and id(cfg) in configs:
            c.__dict__["config"] = configs[id(cfg)]
    copies[-1].__dict__["_modules"][bl.attr] = nn.ModuleList(list(bl.blocks)[start:])
    return copies[0]


@contextlib.contextmanager
def truncated_blocks(model: nn.Module, start: int) -> Iterator[nn.ModuleList]:
    """Temporarily make ``model`` itself run only the blocks ``start, ...`` (as :func:`truncated_view`, by
    swapping the block list and rotating the config on the model; put back on exit, also on Ctrl-C). Every
    thread sees the shorter model meanwhile: prefer :func:`truncated_view` (the library uses it).

    Raises:
        NotImplementedError: as :func:`truncated_view`, and when nested on the same model.
    """
    bl, start, rotated = _truncation_plan(model, start, "truncated_blocks")
    if model in _TRUNCATED:
        raise NotImplementedError("truncated_blocks is already active on this model (nesting unsupported)")
    saved = [(cfg, attr, getattr(cfg, attr)) for cfg, attr, _ in rotated]
    _TRUNCATED.add(model)

    def put_back() -> None:  # idempotent
        setattr(bl.parent, bl.attr, bl.blocks)
        for cfg, attr, value in saved:
            setattr(cfg, attr, value)
        _TRUNCATED.discard(model)

    try:
        for cfg, attr, value in rotated:
            setattr(cfg, attr, value)
        short = nn.ModuleList(list(bl.blocks)[start:])
        setattr(bl.parent, bl.attr, short)
        yield short
    finally:
        uninterruptible(put_back)


# --------------------------------------------------------------------------------- devices


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's ``execution_device`` when it is dispatched
    (``device_map``, CPU/disk offload: the weights may live on ``meta``), else its first real parameter's
    device, else the CPU."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None and not isinstance(dev, dict):
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
        for p in m.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """The device the model's input ids must be on (that of its input embeddings)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)  # HF models; typed as nn.Module's Tensor | Module
    emb = get_embeddings() if get_embeddings is not None else None
    return execution_device(emb if emb is not None else model)
