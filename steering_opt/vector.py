"""``SteeringVector``: the one steering object (per-layer tensors + site + kind + metadata).

Both the optimiser (:meth:`SteeringVector.from_optimization`) and contrastive training produce it; it
applies itself to a model (:meth:`apply` context manager, :meth:`patch` handle), supports arithmetic
between compatible vectors, and is what persistence saves and loads.

Sites (``layer_type``): ``decoder_block`` steers the residual stream *entering* block ``L`` (a forward
pre-hook; the optimiser's site); every other site (``self_attn``, ``mlp``, ``input_layernorm``,
``post_attention_layernorm``) steers that module's *output* (a forward hook).

Token positions are read from the ``position_ids`` each decoder block receives, so ``min_token_index``
and ``token_indices`` select the same tokens with and without a KV cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import arch
from .hooks import steer

#: ``operator(activation (b, s, d), vector (d,)) -> delta (b, s, d) or (d,)`` added to the activation.
Operator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class SteeringVector:
    """Per-layer steering tensors and how to apply them.

    Attributes:
        layer_activations: ``{layer: vector (d,)}``.
        layer_type: the site (see module docstring).
        clamp: clamp coefficient ``c`` for clamp steering (``h - (h·v̂)v̂ + c·v``), else None.
        affine: ``{layer: (left (r, d), right (r, d))}`` for affine steering (``h + v + h (LᵀR)ᵀ``), else None.
        metadata: free-form JSON-able information (method, hyper-parameters, model fingerprint, ...).
    """

    layer_activations: dict[int, torch.Tensor]
    layer_type: str = "decoder_block"
    clamp: float | None = None
    affine: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layer_activations, dict) or not self.layer_activations:
            raise ValueError("SteeringVector: `layer_activations` must be a non-empty {layer: tensor} dict")
        shapes = {tuple(v.shape) for v in self.layer_activations.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"SteeringVector: every vector must have the same shape (d,), got {sorted(shapes)}")
        if self.layer_type not in arch.SITES:
            raise ValueError(f"SteeringVector: unknown layer_type {self.layer_type!r}; expected one of {arch.SITES}")
        if self.clamp is not None and self.affine is not None:
            raise ValueError("SteeringVector: clamp and affine steering cannot be combined")

    # ------------------------------------------------------------------ info
    @property
    def kind(self) -> str:
        """``"additive"``, ``"clamp"`` or ``"affine"``."""
        return "clamp" if self.clamp is not None else "affine" if self.affine else "additive"

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
        (or pass ``matrix``, factored by SVD); with ``vector_clamp=c`` pass ``clamp=c``.
        ``optimize_vectors`` → ``from_optimization(vectors_dict, info)``.
        """
        info = info or {}
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
        return SteeringVector(acts, self.layer_type, metadata={"method": "sum"})

    def __mul__(self, scale: float) -> SteeringVector:
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return dataclasses.replace(self, layer_activations={k: v * scale for k, v in self.layer_activations.items()},
                                   metadata=dict(self.metadata))

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
        return dataclasses.replace(self, layer_activations=acts, affine=affine)

    # ------------------------------------------------------------------ persistence (see persist.py)
    def save_pretrained(self, path: Any, *, model: nn.Module | None = None,
                        metadata: dict[str, Any] | None = None) -> Any:
        """Save atomically to a folder (or a ``.safetensors`` file); see :func:`steering_opt.persist.save`."""
        from .persist import save

        return save(self, path, model=model, metadata=metadata)

    @classmethod
    def from_pretrained(cls, path: Any, *, model: nn.Module | None = None, allow_mismatch: bool = False,
                        device: str | torch.device = "cpu") -> SteeringVector:
        """Load a saved vector (never unpickles; checks it against ``model`` if given); see
        :func:`steering_opt.persist.load`."""
        from .persist import load_vector

        return load_vector(path, model=model, allow_mismatch=allow_mismatch, device=device)

    # ------------------------------------------------------------------ application
    def patch(self, model: nn.Module, multiplier: float = 1.0, min_token_index: int = 0,
              token_indices: Sequence[int] | slice | torch.Tensor | None = None, operator: Operator | None = None,
              layer_config: arch.LayerConfig = None) -> _Handle:
        """Register the steering hooks on ``model`` and return a handle whose ``.remove()`` undoes it."""
        if arch.hidden_size(model) != self.hidden_size:
            raise ValueError(f"this steering vector has hidden size {self.hidden_size}, the model "
                             f"{arch.model_fingerprint(model).get('name_or_path') or type(model).__name__} "
                             f"has {arch.hidden_size(model)}")
        if not isinstance(multiplier, (int, float)):
            raise TypeError(f"`multiplier` must be a number, got {type(multiplier).__name__}")
        if not isinstance(min_token_index, int) or min_token_index < 0:
            raise ValueError(f"`min_token_index` must be an int >= 0, got {min_token_index!r}")
        handles: list[Any] = []
        try:
            for layer, vec in self.layer_activations.items():
                layer_r = arch.resolve_layer(model, layer) if layer_config is None else layer
                block = arch.get_site_module(model, layer_r, "decoder_block", layer_config)
                site = block if self.layer_type == "decoder_block" else \
                    arch.get_site_module(model, layer_r, self.layer_type, None)
                state: dict[str, torch.Tensor] = {}
                factors = self.affine.get(layer) if self.affine else None
                fn = _make_apply(vec, multiplier, self.clamp, factors, min_token_index, token_indices, operator,
                                 state)
                if self.layer_type == "decoder_block":
                    handles.append(block.register_forward_pre_hook(_pre(fn, state), with_kwargs=True))
                else:
                    handles.append(block.register_forward_pre_hook(_remember_positions(state), with_kwargs=True))
                    handles.append(site.register_forward_hook(_post(fn)))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return _Handle(handles)

    @contextlib.contextmanager
    def apply(self, model: nn.Module, multiplier: float = 1.0, min_token_index: int = 0,
              token_indices: Sequence[int] | slice | torch.Tensor | None = None, operator: Operator | None = None,
              layer_config: arch.LayerConfig = None) -> Iterator[SteeringVector]:
        """Context manager: steer ``model`` inside the block; hooks are always removed on exit.

        Args:
            multiplier: scales the vector (and the affine map).
            min_token_index: steer only positions ``>= min_token_index``.
            token_indices: steer only these positions (list, slice, or a bool/float mask ``(seq,)``).
            operator: ``(activation, vector) -> delta`` replacing plain addition (e.g.
                ``ablation_then_addition_operator()``); additive vectors only.
        """
        handle = self.patch(model, multiplier, min_token_index, token_indices, operator, layer_config)
        try:
            yield self
        finally:
            handle.remove()


class _Handle:
    """Removes the hooks of one :meth:`SteeringVector.patch` call."""

    def __init__(self, handles: list[Any]):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> _Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _positions_from(kwargs: dict, h: torch.Tensor) -> torch.Tensor:
    pos = kwargs.get("position_ids")
    if pos is None:
        return torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
    return pos.to(h.device).expand(h.shape[0], -1)


def _make_apply(vec: torch.Tensor, multiplier: float, clamp: float | None,
                factors: tuple[torch.Tensor, torch.Tensor] | None, min_token_index: int,
                token_indices: Any, operator: Operator | None, state: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(h: torch.Tensor) -> torch.Tensor:
        pos = state.get("pos")
        if pos is None or pos.shape[-1] != h.shape[1]:
            pos = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        mask = pos >= min_token_index
        if token_indices is not None:
            if isinstance(token_indices, slice):
                sel = torch.zeros_like(mask)
                start = token_indices.start or 0
                stop = token_indices.stop if token_indices.stop is not None else 2**62
                sel = (pos >= start) & (pos < stop)
            elif isinstance(token_indices, torch.Tensor) and token_indices.dtype == torch.bool:
                tmask = token_indices.to(h.device)
                sel = torch.zeros_like(mask)
                inside = pos < tmask.shape[-1]
                sel[inside] = tmask[pos[inside]]
            else:
                idx = torch.as_tensor(list(token_indices), device=h.device)
                sel = (pos[..., None] == idx).any(-1)
            mask = mask & sel
        v = vec.to(h) * multiplier
        if operator is not None:
            delta = operator(h, v)
            return h + delta.to(h) * mask[..., None].to(h)
        left = right = None
        if factors is not None:
            left, right = factors[0] * multiplier, factors[1]
        return steer(h, v, left=left, right=right, clamp=clamp, mask=mask)

    return fn


def _pre(fn: Callable[[torch.Tensor], torch.Tensor], state: dict) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        h = arch.get_hidden_states(args, kwargs)
        state["pos"] = _positions_from(kwargs, h)
        return arch.replace_hidden_states(args, kwargs, fn(h))

    return hook


def _remember_positions(state: dict) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = arch.get_hidden_states(args, kwargs)
        state["pos"] = _positions_from(kwargs, h)

    return hook


def _post(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        h = arch.get_output_hidden_states(output)
        return arch.replace_output_hidden_states(output, fn(h))

    return hook
