"""``SteeringVector``: the one steering object (per-layer tensors + site + kind + metadata).

Both the optimiser (:meth:`SteeringVector.from_optimization`) and contrastive training produce it; it
applies itself to a model (:meth:`apply` context manager, :meth:`patch` handle), supports arithmetic
between compatible vectors, and is what persistence saves and loads.

Sites (``layer_type``): ``decoder_block`` steers the residual stream *entering* block ``L`` (a forward
pre-hook; the optimiser's site); every other site (``self_attn``, ``mlp``, ``input_layernorm``,
``post_attention_layernorm``) steers that module's *output* (a forward hook).

Token positions are read from the ``position_ids`` the model receives, and a model-level
:class:`SequenceTracker` recognises the steps of a generation (with a KV cache or without one), so
``min_token_index``, ``token_indices`` and ``injection_mode`` select the same tokens with and without a
KV cache.

Also here: :func:`resolve_site_module` (the one site lookup, including steering-vectors style
``layer_config`` dicts). The hooks themselves (registration, site convention, token selection) are in
:mod:`steering_opt.hooks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import arch, validate
from .hooks import (
    HookHandle,
    HookSpec,
    SequenceTracker,
    SiteFn,
    TokenIndices,
    TokenSelection,
    attach,
    current_positions,
    site_hook,
    steer,
)
from .parameterization import Additive, Affine, Clamp, Steering
from .parameterization import steer as steer_with

#: ``operator(activation (b, s, d), vector (d,)) -> delta (b, s, d) or (d,)`` added to the activation.
Operator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: A number, or a zero-argument callable returning the number (read at every forward).
Multiplier = float | Callable[[], float]
#: ``arch.LayerConfig`` (template / callable naming the module) or ``{layer_type: template or callable}``.
SiteConfig = arch.LayerConfig | Mapping[str, Any]


@dataclasses.dataclass
class SteeringVector:
    """Per-layer steering tensors and how to apply them.

    Attributes:
        layer_activations: ``{layer: vector (d,)}``.
        layer_type: the site (see module docstring).
        clamp: clamp coefficient ``c`` for clamp steering (``h - (h·v̂)v̂ + c·v``), else None.
        affine: ``{layer: (left (r, d), right (r, d))}`` for affine steering (``h + v + h (LᵀR)ᵀ``), else None.
        metadata: free-form JSON-able information (method, hyper-parameters, model fingerprint, ...).
        custom: ``{layer: Steering}`` for a parameterisation other than the built-in three (a
            :class:`~steering_opt.parameterization.Steering` subclass); ``layer_activations`` then holds
            their primary vectors. Build with :meth:`from_steering`.
    """

    layer_activations: dict[int, torch.Tensor]
    layer_type: str = "decoder_block"
    clamp: float | None = None
    affine: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    custom: dict[int, Steering] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layer_activations, dict) or not self.layer_activations:
            raise ValueError("SteeringVector: `layer_activations` must be a non-empty {layer: tensor} dict")
        for k, v in self.layer_activations.items():
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise TypeError(f"SteeringVector: `layer_activations` keys must be int layers, got {k!r}")
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                what = f"tensor of dtype {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise TypeError(f"SteeringVector: `layer_activations[{k}]` must be a floating-point tensor (d,), "
                                f"got a {what}")
        shapes = {tuple(v.shape) for v in self.layer_activations.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"SteeringVector: every vector must have the same shape (d,), got {sorted(shapes)}")
        if self.layer_type not in arch.SITES:
            raise ValueError(f"SteeringVector: unknown layer_type {self.layer_type!r}; expected one of {arch.SITES}")
        if self.clamp is not None and self.affine is not None:
            raise ValueError("SteeringVector: clamp and affine steering cannot be combined")
        if self.custom is not None:
            if self.clamp is not None or self.affine is not None or set(self.custom) != set(self.layer_activations):
                raise ValueError("SteeringVector: `custom` steering replaces clamp/affine and needs one entry "
                                 "per layer")
            if len({type(p) for p in self.custom.values()}) != 1:
                raise ValueError("SteeringVector: every layer's `custom` steering must be of one class")

    # ------------------------------------------------------------------ info
    @property
    def kind(self) -> str:
        """``"additive"``, ``"clamp"``, ``"affine"`` or a custom parameterisation's ``kind``."""
        if self.custom:
            return next(iter(self.custom.values())).kind
        return "clamp" if self.clamp is not None else "affine" if self.affine else "additive"

    def steerings(self) -> dict[int, Steering]:
        """``{layer: Steering}``: the parameterisation object that applies each layer's steering."""
        if self.custom is not None:
            return dict(self.custom)
        out: dict[int, Steering] = {}
        for layer, v in self.layer_activations.items():
            if self.clamp is not None:
                out[layer] = Clamp(v, self.clamp)
            elif self.affine and layer in self.affine:
                out[layer] = Affine(v, *self.affine[layer])
            else:
                out[layer] = Additive(v)
        return out

    @classmethod
    def from_steering(cls, steering: Mapping[int, Steering], *, layer_type: str = "decoder_block",
                      metadata: dict[str, Any] | None = None) -> SteeringVector:
        """Wrap ``{layer: Steering}`` (e.g. ``OptimizeResult.steering``): built-in kinds become the
        usual fields, other parameterisations are kept in ``custom``. Tensors are detached float32 copies."""
        params = {int(k): p.map(lambda t: t.detach().float().clone()) for k, p in steering.items()}
        acts = {k: p.vector for k, p in params.items()}
        kinds = {type(p) for p in params.values()}
        meta = dict(metadata or {})
        if kinds == {Additive}:
            return cls(acts, layer_type, metadata=meta)
        if kinds == {Clamp} and len({p.coefficient for p in params.values() if isinstance(p, Clamp)}) == 1:
            c = next(p.coefficient for p in params.values() if isinstance(p, Clamp))
            return cls(acts, layer_type, clamp=c, metadata=meta)
        if kinds == {Affine} and all(isinstance(p, Affine) and p.left is not None for p in params.values()):
            affine = {k: (p.left, p.right) for k, p in params.items() if isinstance(p, Affine)
                      and p.left is not None and p.right is not None}
            return cls(acts, layer_type, affine=affine, metadata=meta)
        return cls(acts, layer_type, metadata=meta, custom=params)

    @property
    def layers(self) -> list[int]:
        return sorted(self.layer_activations)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.layer_activations.values())).shape[0])

    def __repr__(self) -> str:
        norms = ", ".join(f"{k}: {float(v.norm()):.3g}" for k, v in sorted(self.layer_activations.items()))
        return (f"SteeringVector(kind={self.kind!r}, layer_type={self.layer_type!r}, d={self.hidden_size}, "
                f"norms={{{norms}}})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_optimization(
        cls,
        vector: torch.Tensor | dict[int, torch.Tensor],
        info: dict[str, Any] | None = None,
        layers: int | Sequence[int] | None = None,
        *,
        matrix: torch.Tensor | None = None,
        clamp: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SteeringVector:
        """Wrap the result of ``optimize_vector`` / ``optimize_vectors``.

        ``optimize_vector(..., layer)`` → ``from_optimization(vector, info, layer)`` (a list of layers
        shares the vector); with ``affine_rank``, the factors are taken from ``info['affine_factors']``
        (or pass ``matrix``, factored by SVD); a clamp run is recognised from ``info['vector_clamp']``
        (or pass ``clamp=c``). ``optimize_vectors`` → ``from_optimization(vectors_dict, info)``.
        ``OptimizeResult.to_steering_vector()`` also records every option.
        """
        info = info or {}
        if clamp is None and isinstance(info.get("vector_clamp"), (int, float)):
            clamp = float(info["vector_clamp"])
        if isinstance(vector, dict):
            acts = {int(k): v.detach().float() for k, v in vector.items()}
        else:
            if layers is None:
                raise ValueError("`layers` is required when `vector` is a single tensor")
            ls = [layers] if isinstance(layers, int) else list(layers)
            acts = {int(x): vector.detach().float() for x in ls}
        affine = None
        factors = info.get("affine_factors")
        if factors is None and matrix is not None:
            u, s, vh = torch.linalg.svd(matrix.detach().float())
            r = int((s > s.max() * 1e-6).sum().clamp_min(1))
            factors = ((u[:, :r] * s[:r]).T, vh[:r])  # M = Lᵀ R with L = (U S)ᵀ, R = Vᴴ
        if factors is not None:
            left, right = factors
            affine = {k: (left.detach().float(), right.detach().float()) for k in acts}
        meta = {"method": "optimize_vector" if not isinstance(vector, dict) else "optimize_vectors"}
        for key in ("iters", "loss", "norm", "status", "loss_units"):
            if key in info and isinstance(info[key], (int, float, str)):
                meta[key] = info[key]
        meta.update(metadata or {})
        return cls(layer_activations=acts, clamp=clamp, affine=affine, metadata=meta)

    # ------------------------------------------------------------------ arithmetic
    def _check_compatible(self, other: SteeringVector) -> None:
        if not isinstance(other, SteeringVector):
            raise TypeError(f"expected a SteeringVector, got {type(other).__name__}")
        if other.layer_type != self.layer_type or other.hidden_size != self.hidden_size:
            raise ValueError(f"incompatible steering vectors: ({self.layer_type}, d={self.hidden_size}) vs "
                             f"({other.layer_type}, d={other.hidden_size})")
        if self.kind != "additive" or other.kind != "additive":
            raise ValueError("only additive steering vectors can be added; clamp/affine vectors can only be scaled")

    def __add__(self, other: SteeringVector) -> SteeringVector:
        self._check_compatible(other)
        acts = {k: v.clone() for k, v in self.layer_activations.items()}
        for k, v in other.layer_activations.items():
            acts[k] = acts[k] + v.to(acts[k]) if k in acts else v.clone()
        return SteeringVector(acts, self.layer_type, metadata=derived_metadata("sum", [self, other]))

    def __radd__(self, other: Any) -> SteeringVector:
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return dataclasses.replace(self * 1.0, metadata=dict(self.metadata))  # so that sum([v1, ...]) works
        return NotImplemented

    def __mul__(self, scale: float) -> SteeringVector:
        """Scale the vector (and an affine map's ``left`` factors): ``(v * k).apply(m)`` steers exactly like
        ``v.apply(m, multiplier=k)``. The result's metadata says it is derived (:func:`derived_metadata`)."""
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            return NotImplemented
        scale = float(scale)
        meta = derived_metadata("negated" if scale == -1.0 else "scaled", [self], multiplier=scale)
        if self.custom is not None:
            custom = {k: p.scaled(scale) for k, p in self.custom.items()}
            return dataclasses.replace(self, layer_activations={k: p.vector for k, p in custom.items()},
                                       custom=custom, metadata=meta)
        affine = None if self.affine is None else {k: (a * scale, b.clone()) for k, (a, b) in self.affine.items()}
        return dataclasses.replace(self, layer_activations={k: v * scale for k, v in self.layer_activations.items()},
                                   affine=affine, metadata=meta)

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> SteeringVector:
        return self * (1.0 / scale)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self + (-other)

    def to(self, *args: Any, **kwargs: Any) -> SteeringVector:
        """Move/cast every tensor (``torch.Tensor.to`` arguments)."""
        acts = {k: v.to(*args, **kwargs) for k, v in self.layer_activations.items()}
        affine = None if self.affine is None else {
            k: (a.to(*args, **kwargs), b.to(*args, **kwargs)) for k, (a, b) in self.affine.items()}
        if self.custom is not None:
            custom = {k: p.map(lambda t: t.to(*args, **kwargs)) for k, p in self.custom.items()}
            return dataclasses.replace(self, layer_activations={k: p.vector for k, p in custom.items()},
                                       custom=custom)
        return dataclasses.replace(self, layer_activations=acts, affine=affine)

    # ------------------------------------------------------------------ persistence (see persist.py)
    def save_pretrained(self, path: Any, *, model: nn.Module | None = None,
                        metadata: dict[str, Any] | None = None, datapoints: Sequence[Any] | None = None) -> Any:
        """Save atomically to a folder (or a ``.safetensors`` file), recording the model's fingerprint (with
        ``model=``) and a summary of the ``datapoints``; see :func:`steering_opt.persist.save`."""
        from .persist import save

        return save(self, path, model=model, metadata=metadata, datapoints=datapoints)

    @classmethod
    def from_pretrained(cls, path: Any, *, model: nn.Module | None = None, allow_mismatch: bool = False,
                        device: str | torch.device = "cpu") -> SteeringVector:
        """Load a saved vector (never unpickles; checks it against ``model`` if given); see
        :func:`steering_opt.persist.load`."""
        from .persist import load_vector

        return load_vector(path, model=model, allow_mismatch=allow_mismatch, device=device)

    # ------------------------------------------------------------------ application
    def check_values(self) -> None:
        """Raise ``ValueError`` if a tensor holds NaN/inf, or a clamp vector is zero (its direction is
        undefined): checked before any hook is registered, so steering never fails mid-forward."""
        for layer, v in self.layer_activations.items():
            factors = self.affine.get(layer, ()) if self.affine else ()
            if not all(bool(torch.isfinite(t).all()) for t in (v, *factors)):
                raise ValueError(f"this steering vector's layer {layer} contains NaN or infinite values")
            if self.clamp is not None and not bool(v.abs().sum() > 0):
                raise ValueError(f"clamp steering needs a non-zero vector, but layer {layer}'s vector is zero")

    def hook_specs(self, model: nn.Module, multiplier: Multiplier = 1.0, min_token_index: int = 0,
                   token_indices: TokenIndices = None, operator: Operator | None = None,
                   layer_config: SiteConfig = None, *, injection_mode: str = "all") -> list[HookSpec]:
        """The hooks that steer ``model`` with this vector, as specs for :func:`steering_opt.hooks.attach`
        (nothing is registered). Arguments as in :meth:`apply`.

        Everything is checked, and every module located, here: attaching the specs cannot fail on a bad
        argument. Returns a model-level :class:`~steering_opt.hooks.SequenceTracker` followed by one site
        hook per layer.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if arch.hidden_size(model) != self.hidden_size:
            raise ValueError(f"this steering vector has hidden size {self.hidden_size}, the model "
                             f"{arch.model_fingerprint(model).get('name_or_path') or type(model).__name__} "
                             f"has {arch.hidden_size(model)}")
        check_multiplier(multiplier)
        self.check_values()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype is not None:  # finite in float64 is not enough: 1e300 is inf in float32 (1e5 in float16)
            scale = 1.0 if callable(multiplier) else float(multiplier)
            for layer, v in self.layer_activations.items():
                validate.finite_in_dtype(f"layer_activations[{layer}] * multiplier", v * scale, dtype)
        if self.clamp is not None and not callable(multiplier) and multiplier == 0:
            raise ValueError("`multiplier` must be non-zero for a clamp steering vector (its direction is v/|v|)")
        selection = TokenSelection(min_token_index, token_indices, injection_mode)
        if operator is not None:
            if not callable(operator):
                raise TypeError(f"`operator` must be a callable (activation, vector) -> delta, got "
                                f"{type(operator).__name__}")
            if self.kind != "additive":
                raise ValueError(f"`operator` only applies to additive steering vectors; this one is {self.kind!r}")
        targets = [(layer, resolve_site_module(model, layer, self.layer_type, layer_config)) for layer in self.layers]
        tracker = SequenceTracker()
        specs: list[HookSpec] = [(model, tracker, "pre")]
        steerings = self.steerings()
        for layer, module in targets:
            fn = _make_apply(steerings[layer], multiplier, selection, operator, tracker)
            specs.append(site_hook(module, self.layer_type, fn))
        return specs

    def patch(self, model: nn.Module, multiplier: Multiplier = 1.0, min_token_index: int = 0,
              token_indices: TokenIndices = None, operator: Operator | None = None,
              layer_config: SiteConfig = None, *, injection_mode: str = "all") -> HookHandle:
        """Register the steering hooks on ``model`` and return a handle whose ``.remove()`` undoes it.

        Arguments as in :meth:`apply`. Everything is checked, and every module located, before the first
        hook is registered; if registration fails half-way the hooks already added are removed.

        The hooks act on the forward passes of every thread until ``.remove()`` is called (a persistent,
        process-wide patch). For steering limited to the calling thread, use :meth:`apply`.
        """
        return attach(self.hook_specs(model, multiplier, min_token_index, token_indices, operator, layer_config,
                                      injection_mode=injection_mode), scope="global")

    @contextlib.contextmanager
    def apply(self, model: nn.Module, multiplier: Multiplier = 1.0, min_token_index: int = 0,
              token_indices: TokenIndices = None, operator: Operator | None = None,
              layer_config: SiteConfig = None, *, injection_mode: str = "all") -> Iterator[SteeringVector]:
        """Context manager: steer ``model`` inside the block; hooks are always removed on exit.

        Steering inside the block acts only on forward passes run by the thread that entered it; other threads
        using the same model are not steered. To steer every thread, use :meth:`patch`.

        Token selection (all criteria combine with AND; positions are the model's ``position_ids``, so
        with left padding under ``generate`` they count from each row's first real token):

        Args:
            model: the model to steer (any ``nn.Module`` whose blocks :mod:`steering_opt.arch` finds).
            multiplier: scales the vector (and the affine map): a number, or a zero-argument callable
                returning the number, read again at every forward (used by the injectors).
            min_token_index: steer only positions ``>= min_token_index``.
            token_indices: steer only these positions: an int or a list of ints (negative ints count from
                the end of the prompt, i.e. the first forward of a generation, and stay attached to the
                same token while generating), a slice (negative bounds likewise), a bool mask ``(seq,)``
                indexed by position, or a float tensor ``(seq,)`` of per-position weights.
            operator: ``(activation (b, s, d), vector (d,)) -> delta`` added instead of the vector (e.g.
                :func:`~steering_opt.contrastive.ablation_then_addition_operator`); additive vectors only.
                The vector it receives is already multiplied by ``multiplier``.
            layer_config: where the modules are: ``None`` (the architecture table), a template / callable
                naming this vector's module (see :func:`resolve_site_module`), or a dict
                ``{layer_type: template or callable}`` (steering-vectors style).
            injection_mode: ``"all"`` (every selected position), ``"first"`` (the prompt's first token),
                ``"last"`` (the prompt's last token and every generated token) or ``"generated"`` (only
                generated tokens). Generation is recognised identically with a KV cache and without one
                (``use_cache=False``), so the same tokens are steered: see :class:`SequenceTracker`.
        """
        handle = attach(self.hook_specs(model, multiplier, min_token_index, token_indices, operator, layer_config,
                                        injection_mode=injection_mode))
        try:
            yield self
        finally:
            handle.remove()


# ------------------------------------------------------------------------------ sites


#: Metadata of a vector that belongs to the file or the model rather than to how the vector was made.
_NOT_PROVENANCE = ("model", "library_version", "saved_at")
#: ``method`` of the vectors :meth:`SteeringVector.__mul__` (and ``__neg__``) return.
_SCALING = ("scaled", "negated")


def derived_metadata(operation: str, sources: Sequence[SteeringVector], **details: Any) -> dict[str, Any]:
    """The metadata of a vector computed from ``sources`` (``operation``: ``"scaled"``, ``"negated"``,
    ``"sum"``, ...): ``method`` is the operation, ``details`` (e.g. ``multiplier``) are recorded, and each
    source's own metadata (how it was made: method, options, datapoints, final loss, ...) is kept under
    ``derived_from`` instead of as the new vector's own, so a scaled vector never claims its source's final
    loss. The model fingerprint (``model``) is kept when every source records the same one; scaling a scaled
    vector multiplies the multipliers instead of nesting."""
    meta: dict[str, Any] = {"method": operation, **details}
    origins: list[dict[str, Any]] = []
    for src in sources:
        m = src.metadata
        if operation in _SCALING and m.get("method") in _SCALING and isinstance(m.get("multiplier"), (int, float)) \
                and isinstance(m.get("derived_from"), list):
            meta["multiplier"] = float(m["multiplier"]) * float(details.get("multiplier", 1.0))
            meta["method"] = "negated" if meta["multiplier"] == -1.0 else "scaled"
            origins.extend(m["derived_from"])
        else:
            origins.append({k: v for k, v in m.items() if k not in _NOT_PROVENANCE})
    models = [src.metadata.get("model") for src in sources]
    if models and models[0] is not None and all(x == models[0] for x in models):
        meta["model"] = models[0]
    else:
        for origin, model in zip(origins, models):
            if model is not None:
                origin["model"] = model
    meta["derived_from"] = origins
    return meta


def resolve_site_module(model: nn.Module, layer: int, layer_type: str = "decoder_block",
                        layer_config: SiteConfig = None) -> nn.Module:
    """The module of ``layer_type`` at ``layer``: the one lookup used for steering and for reading.

    Args:
        layer: block index (negative counts from the end).
        layer_type: a site name (:data:`steering_opt.arch.SITES`).
        layer_config: ``None`` (the architecture table, :func:`steering_opt.arch.get_site_module`); a
            template such as ``"model.layers.{num}.mlp"`` or a callable ``(model, layer) -> module`` naming
            the exact module for this ``layer_type``; or a dict ``{layer_type: template or callable}`` as in
            steering-vectors, whose callables may also be ``num -> "dotted.path"`` (site types missing
            from the dict come from the table).

    Raises:
        TypeError / ValueError: bad ``layer_type``, ``layer`` or ``layer_config`` (the message says what
            was expected); :class:`~steering_opt.arch.ArchitectureError` if the module cannot be found.
    """
    if not isinstance(layer_type, str):
        raise TypeError(f"`layer_type` must be a str (one of {arch.SITES}), got {type(layer_type).__name__}")
    if isinstance(layer_config, Mapping):
        bad = [k for k in layer_config if not isinstance(k, str)]
        if bad:
            raise TypeError(f"`layer_config` dict keys must be layer_type names, got {bad!r}")
        if layer_type not in layer_config:
            return arch.get_site_module(model, layer, layer_type)
        selector = layer_config[layer_type]
        if callable(selector) and not isinstance(selector, str) and _n_positional(selector) == 1:
            selector = _path_selector(selector)
        return arch.get_site_module(model, layer, "decoder_block", selector)
    if layer_config is not None:
        return arch.get_site_module(model, layer, "decoder_block", layer_config)
    return arch.get_site_module(model, layer, layer_type)


def _n_positional(fn: Callable) -> int:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _path_selector(fn: Callable[[int], str]) -> Callable[[nn.Module, int], nn.Module]:
    """Adapt a steering-vectors style ``num -> "dotted.path"`` selector to ``(model, layer) -> module``."""

    def select(model: nn.Module, layer: int) -> nn.Module:
        path = fn(layer)
        if not isinstance(path, str):
            raise TypeError(f"layer_config callable must return a dotted module path (str) for layer {layer}, "
                            f"got {type(path).__name__}")
        try:
            return model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"layer_config: model has no submodule {path!r} (layer {layer})") from e

    return select


# ------------------------------------------------------------------------------ steering functions


def check_multiplier(multiplier: Any, *, allow_callable: bool = True) -> Multiplier:
    """Check a steering multiplier and return it (a number as ``float``; a callable, when allowed, as is).

    Raises:
        TypeError: ``multiplier`` is not a finite real number (nor, with ``allow_callable``, a callable).
    """
    if allow_callable and callable(multiplier):
        return multiplier
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real) or not math.isfinite(multiplier):
        also = " (or a callable returning one)" if allow_callable else ""
        raise TypeError(f"`multiplier` must be a finite number{also}, got {multiplier!r}")
    return float(multiplier)


def _make_apply(param: Steering, multiplier: Multiplier, selection: TokenSelection, operator: Operator | None,
                tracker: SequenceTracker) -> SiteFn:
    """The site function steering with ``param`` scaled by the (possibly callable) ``multiplier``."""
    def fn(h: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        if h.dim() != 3:
            raise ValueError(f"steering expects activations of shape (batch, seq, d), got {tuple(h.shape)}")
        m = float(multiplier() if callable(multiplier) else multiplier)
        mask = None
        if not selection.selects_all:
            mask = selection.mask(*current_positions(h, position_ids, tracker))
        if operator is not None:  # additive vectors only (checked by hook_specs)
            return steer(h, param.vector.to(h) * m, mask=mask, operator=operator)
        p = param if m == 1.0 else param.scaled(m)
        return steer_with(h, [p], p.vector, mask=mask)

    return fn
