"""rotalabs-steer API (reading and injecting activations), as thin adapters over the core.

* :class:`ActivationHook`: record activations at some layers during any forward.
* :class:`ActivationInjector` / :class:`MultiVectorInjector`: steer with one or several named vector sets
  at adjustable strengths; :meth:`MultiVectorInjector.set_strength` takes effect on the next forward
  without re-registering hooks.
* :func:`generate_with_steering` (blog-style one-call generation).

Everything is built on :meth:`SteeringVector.hook_specs <steering_opt.vector.SteeringVector.hook_specs>`,
the site lookup :func:`~steering_opt.vector.resolve_site_module` and the hook core
(:func:`~steering_opt.hooks.attach`, :func:`~steering_opt.hooks.site_hook`), so a vector from
:func:`~steering_opt.optimize.optimize_vector` and a contrastive one behave identically here.

Layer convention: ``component="residual"`` is the residual stream *entering* block ``L``
(``hidden_states[L]``, the optimiser's site); ``"mlp"``/``"attn"`` are those modules' outputs.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .. import arch
from ..contrastive import Text, tokenize_text
from ..hooks import (
    INJECTION_MODES,
    HookHandle,
    HookSpec,
    SequenceTracker,
    TokenIndices,
    attach,
    frozen_model,
    pad_sequences,
    pad_token_id,
    site_hook,
)
from ..vector import Operator, SiteConfig, SteeringVector, resolve_site_module

__all__ = [
    "COMPONENTS",
    "ActivationHook",
    "ActivationInjector",
    "MultiVectorInjector",
    "as_steering_vectors",
    "generate_with_steering",
]

#: rotalabs-steer component names -> our site names (our site names are accepted as well).
COMPONENTS: dict[str, str] = {"residual": "decoder_block", "mlp": "mlp", "attn": "self_attn"}
TOKEN_POSITIONS: tuple[str, ...] = ("last", "first", "all", "mean")

SteeringLike = SteeringVector | torch.Tensor | Mapping[int, torch.Tensor] | Sequence[Any]


def _site_of(component: Any) -> str:
    if isinstance(component, str) and component in COMPONENTS:
        return COMPONENTS[component]
    if isinstance(component, str) and component in arch.SITES:
        return component
    raise ValueError(f"`component` must be one of {list(COMPONENTS)} (or a site name {list(arch.SITES)}), "
                     f"got {component!r}")


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise TypeError(f"`{name}` must be a number, got {value!r}")
    return float(value)


def as_steering_vectors(steering: SteeringLike, layer: int | Sequence[int] | None = None, *,
                        layer_type: str = "decoder_block", name: str = "steering") -> list[SteeringVector]:
    """Normalise the ways of passing steering to a list of :class:`SteeringVector`.

    Accepts a SteeringVector, a ``{layer: tensor (d,)}`` dict, a tensor ``(d,)`` plus ``layer`` (an int or
    a list of layers sharing it), or a list of any of these.
    """
    if isinstance(steering, SteeringVector):
        return [steering]
    if isinstance(steering, torch.Tensor):
        if steering.dim() != 1:
            raise ValueError(f"`{name}` as a tensor must be one vector of shape (d,), got {tuple(steering.shape)}")
        if layer is None:
            raise ValueError(f"`{name}` is a raw tensor: pass `layer` (an int or a list of ints) to say where it goes")
        layers = [layer] if isinstance(layer, (int, numbers.Integral)) else list(layer)
        if not layers or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in layers):
            raise TypeError(f"`layer` must be an int or a non-empty list of ints, got {layer!r}")
        return [SteeringVector({int(x): steering.detach() for x in layers}, layer_type, metadata={"method": "tensor"})]
    if isinstance(steering, Mapping):
        return [SteeringVector({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in steering.items()},
                               layer_type, metadata={"method": "tensor"})]
    if isinstance(steering, Sequence) and not isinstance(steering, (str, bytes)) and len(steering) > 0:
        out: list[SteeringVector] = []
        for item in steering:
            out.extend(as_steering_vectors(item, layer, layer_type=layer_type, name=name))
        return out
    raise TypeError(f"`{name}` must be a SteeringVector, a {{layer: tensor}} dict, a tensor (d,) with `layer`, or a "
                    f"non-empty list of these; got {type(steering).__name__}")


# ------------------------------------------------------------------------------ reading


class ActivationHook:
    """Record activations at some layers during the forward passes run inside ``with hook:``.

    Args:
        model: the model.
        layer_indices: an int or a list of block indices (negative from the end).
        component: ``"residual"`` (stream entering the block, ``hidden_states[L]``), ``"mlp"`` or ``"attn"``
            (module outputs); site names (``"decoder_block"``, ``"input_layernorm"``, ...) also work.
        token_position: per row and forward, ``"last"`` / ``"first"`` real token (padding excluded when the
            forward gets an ``attention_mask``), ``"mean"`` over real tokens, or ``"all"`` positions.
        layer_config: module override (see :func:`~steering_opt.vector.resolve_site_module`).
        device: where to keep the recorded tensors (default: where they were computed).

    After the block, :meth:`get_activations` returns ``{layer: tensor}``: ``(total_rows, d)`` for
    last/first/mean (rows of every forward, concatenated), ``(total_rows, seq, d)`` for ``"all"``.
    Tensors are detached, in the model's dtype. Hooks are removed on exit, also on errors.
    """

    def __init__(self, model: nn.Module, layer_indices: int | Sequence[int], component: str = "residual",
                 token_position: str = "last", *, layer_config: SiteConfig = None,
                 device: str | torch.device | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.site = _site_of(component)
        if token_position not in TOKEN_POSITIONS:
            raise ValueError(f"`token_position` must be one of {TOKEN_POSITIONS}, got {token_position!r}")
        layers = [layer_indices] if isinstance(layer_indices, numbers.Integral) else layer_indices
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise TypeError(f"`layer_indices` must be an int or a non-empty list of ints, got {layer_indices!r}")
        self.model = model
        self.component = component
        self.token_position = token_position
        self.device = torch.device(device) if device is not None else None
        self.layer_indices = [int(x) for x in layers]
        self._modules = [resolve_site_module(model, layer, self.site, layer_config) for layer in self.layer_indices]
        self._acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layer_indices}
        self._handle = HookHandle()

    def _reader(self, layer: int, tracker: SequenceTracker) -> Any:
        def fn(h: torch.Tensor, _pos: torch.Tensor | None) -> None:
            if h.dim() != 3:
                raise ValueError(f"ActivationHook expects activations (batch, seq, d), got {tuple(h.shape)}")
            b, n = h.shape[:2]
            real = tracker.real
            if real is None or tuple(real.shape) != (b, n):
                real = torch.ones(b, n, dtype=torch.bool, device=h.device)
            real = real.to(h.device)
            real = real | ~real.any(dim=1, keepdim=True)  # a row with no real token: use all of it
            h = h.detach()
            if self.token_position == "all":
                val = h
            elif self.token_position == "mean":
                w = real.to(h.dtype)[..., None]
                val = (h * w).sum(1) / w.sum(1)
            else:
                ar = torch.arange(n, device=h.device).expand(b, n)
                if self.token_position == "last":
                    idx = ar.masked_fill(~real, -1).max(dim=1).values
                else:
                    idx = ar.masked_fill(~real, n).min(dim=1).values
                val = h[torch.arange(b, device=h.device), idx]
            self._acts[layer].append(val.to(self.device) if self.device is not None else val)

        return fn

    def __enter__(self) -> ActivationHook:
        if self._handle.active:
            raise RuntimeError("this ActivationHook is already active")
        tracker = SequenceTracker()
        specs: list[HookSpec] = [(self.model, tracker, "pre")]
        specs += [site_hook(module, self.site, self._reader(layer, tracker))
                  for layer, module in zip(self.layer_indices, self._modules)]
        self._handle = attach(specs)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks (the recorded activations are kept)."""
        self._handle.remove()

    def clear(self) -> None:
        """Forget the recorded activations."""
        for v in self._acts.values():
            v.clear()

    def get_activations(self, concat: bool = True) -> dict[int, torch.Tensor] | dict[int, list[torch.Tensor]]:
        """``{layer: tensor}`` of everything recorded (see the class docstring for shapes).

        With ``concat=False``: ``{layer: [tensor per forward]}`` (needed for ``"all"`` when forwards had
        different lengths).

        Raises:
            RuntimeError: if no forward pass ran inside the context.
            ValueError: ``"all"`` positions from forwards of different lengths with ``concat=True``.
        """
        if not any(self._acts.values()):
            raise RuntimeError("ActivationHook recorded nothing: run the model inside `with hook:` first")
        if not concat:
            return {k: list(v) for k, v in self._acts.items()}
        if self.token_position == "all" and len({t.shape[1] for v in self._acts.values() for t in v}) > 1:
            raise ValueError("token_position='all' recorded forwards of different lengths; use "
                             "get_activations(concat=False) for one tensor per forward")
        return {k: torch.cat(v) for k, v in self._acts.items()}


# ------------------------------------------------------------------------------ injecting


_I = TypeVar("_I", bound="_Injector")


class _Injector:
    """Shared lifecycle of the injectors: :meth:`patch` attaches the specs of :meth:`_specs` as one
    :class:`~steering_opt.hooks.HookHandle`; :meth:`remove` and leaving the ``with`` block take them off."""

    model: nn.Module
    _handle: HookHandle

    def _specs(self) -> list[HookSpec]:  # pragma: no cover - overridden
        raise NotImplementedError

    def patch(self: _I, *, scope: str = "global") -> _I:
        """Register the hooks; undo with :meth:`remove`. Called directly, they act on the forward passes of
        every thread until removed (a persistent, process-wide patch); ``with injector:`` registers them with
        ``scope="thread"``, acting only on the thread that entered the block."""
        if self._handle.active:
            raise RuntimeError("this injector is already active")
        self._handle = attach(self._specs(), scope=scope)
        return self

    def remove(self) -> None:
        """Remove every hook this injector registered (idempotent)."""
        self._handle.remove()

    def __enter__(self: _I) -> _I:
        return self.patch(scope="thread")

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class ActivationInjector(_Injector):
    """Add steering vectors to the model inside ``with injector:`` (rotalabs-steer's API).

    Args:
        model: the model.
        vectors: a :class:`SteeringVector`, a list of them (e.g. one per layer), a ``{layer: tensor}`` dict,
            or a tensor ``(d,)`` with ``layer=``.
        strength: multiplier of every vector. Assigning ``injector.strength = x`` takes effect on the next
            forward.
        injection_mode: ``"all"`` positions, ``"first"`` (the prompt's first token), ``"last"`` (the prompt's
            last token and every generated token: the same tokens with and without a KV cache) or
            ``"generated"`` (generated tokens only).
        layer: layers for a raw tensor. ``operator``, ``min_token_index``, ``token_indices``,
            ``layer_config``: as in :meth:`SteeringVector.apply`.
    """

    def __init__(self, model: nn.Module, vectors: SteeringLike, strength: float = 1.0, injection_mode: str = "all",
                 *, layer: int | Sequence[int] | None = None, operator: Operator | None = None,
                 min_token_index: int = 0, token_indices: TokenIndices = None, layer_config: SiteConfig = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if injection_mode not in INJECTION_MODES:
            raise ValueError(f"`injection_mode` must be one of {INJECTION_MODES}, got {injection_mode!r}")
        self.model = model
        self.vectors = as_steering_vectors(vectors, layer, name="vectors")
        self.strength = _check_number(strength, "strength")
        self.injection_mode = injection_mode
        self._options: dict[str, Any] = dict(operator=operator, min_token_index=min_token_index,
                                             token_indices=token_indices, layer_config=layer_config)
        self._handle = HookHandle()

    def _multiplier(self) -> float:
        return self.strength

    def _specs(self) -> list[HookSpec]:
        return [spec for vec in self.vectors for spec in
                vec.hook_specs(self.model, self._multiplier, injection_mode=self.injection_mode, **self._options)]


class MultiVectorInjector(_Injector):
    """Steer with several named vector sets at independent strengths (rotalabs-steer's API).

    Args:
        model: the model.
        vector_sets: ``{name: SteeringVector or list of them (or {layer: tensor})}``.
        strengths: ``{name: multiplier}``; names left out get 1.0.
        injection_mode, layer_config: as in :class:`ActivationInjector`.

    :meth:`set_strength` changes a set's multiplier; the hooks read it at every forward, so it takes
    effect on the next forward without re-registering anything (also while generating).
    """

    def __init__(self, model: nn.Module, vector_sets: Mapping[str, SteeringLike],
                 strengths: Mapping[str, float] | None = None, injection_mode: str = "all", *,
                 layer_config: SiteConfig = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(vector_sets, Mapping) or not vector_sets:
            raise TypeError("`vector_sets` must be a non-empty dict {name: SteeringVector or list of them}")
        strengths = dict(strengths or {})
        unknown = sorted(set(strengths) - set(vector_sets))
        if unknown:
            raise ValueError(f"`strengths` names {unknown} are not in `vector_sets` ({sorted(vector_sets)})")
        if injection_mode not in INJECTION_MODES:
            raise ValueError(f"`injection_mode` must be one of {INJECTION_MODES}, got {injection_mode!r}")
        self.model = model
        self.vector_sets = {name: as_steering_vectors(v, name=f"vector_sets[{name!r}]") for name, v in
                            vector_sets.items()}
        self._strengths = {name: _check_number(strengths.get(name, 1.0), f"strengths[{name!r}]")
                           for name in vector_sets}
        self.injection_mode = injection_mode
        self.layer_config = layer_config
        self._handle = HookHandle()

    @property
    def strengths(self) -> dict[str, float]:
        """A copy of the current ``{name: strength}``."""
        return dict(self._strengths)

    def _strength_of(self, name: str) -> Callable[[], float]:
        return lambda: self._strengths[name]

    def set_strength(self, name: str, value: float) -> None:
        """Set the multiplier of vector set ``name`` (effective from the next forward)."""
        if name not in self._strengths:
            raise KeyError(f"no vector set named {name!r}; known: {sorted(self._strengths)}")
        self._strengths[name] = _check_number(value, "value")

    def _specs(self) -> list[HookSpec]:
        return [spec for name, vecs in self.vector_sets.items() for vec in vecs for spec in
                vec.hook_specs(self.model, self._strength_of(name), layer_config=self.layer_config,
                               injection_mode=self.injection_mode)]


# ------------------------------------------------------------------------------ generation


def generate_with_steering(
    model: nn.Module,
    tokenizer: Any,
    prompt: Text | Sequence[Text],
    steering: SteeringLike | None,
    layer: int | Sequence[int] | None = None,
    multiplier: float = 1.0,
    *,
    injection_mode: str = "all",
    min_token_index: int = 0,
    token_indices: TokenIndices = None,
    operator: Operator | None = None,
    layer_config: SiteConfig = None,
    **generate_kwargs: Any,
) -> str | list[str]:
    """Generate from ``prompt`` while steering; returns the generated text only (prompt excluded).

    Args:
        model, tokenizer: a HuggingFace causal LM and its tokenizer.
        prompt: a string, a chat (list of ``{"role", "content"}``; the assistant prompt is appended), or a
            list of either (a batch, left-padded; then a list of strings is returned).
        steering: a :class:`SteeringVector` (or a list / ``{layer: tensor}``), a tensor ``(d,)`` with
            ``layer``, or ``None`` (no steering, for a baseline).
        layer: the layer(s) of a raw tensor (ignored otherwise).
        multiplier: scales the steering (negative: steer the other way).
        injection_mode: ``"generated"`` steers only generated tokens; see :meth:`SteeringVector.apply`.
        min_token_index, token_indices, operator, layer_config: as in :meth:`SteeringVector.apply`.
        **generate_kwargs: passed to ``model.generate``; defaults ``max_new_tokens=40``, ``do_sample=False``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    batched = isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0 and \
        not isinstance(prompt[0], Mapping)
    prompts: Sequence[Any] = prompt if batched else [prompt]  # each one checked by tokenize_text
    encoded = [tokenize_text(tokenizer, p, where=f"prompt[{i}]" if batched else "prompt")[0]
               for i, p in enumerate(prompts)]
    for i, e in enumerate(encoded):
        arch.check_context_length(model, len(e), f"prompt[{i}]" if batched else "prompt")
    vecs = [] if steering is None else as_steering_vectors(steering, layer, name="steering")
    _check_number(multiplier, "multiplier")
    pad_id = pad_token_id(tokenizer, model)
    ids, mask = pad_sequences(encoded, pad_id, side="left")
    specs = [spec for vec in vecs for spec in vec.hook_specs(model, multiplier, min_token_index, token_indices,
                                                             operator, layer_config, injection_mode=injection_mode)]
    device = arch.input_device(model)
    kwargs = {"do_sample": False, "pad_token_id": pad_id, **generate_kwargs}
    if "max_new_tokens" not in kwargs and "max_length" not in kwargs:
        kwargs["max_new_tokens"] = 40
    with frozen_model(model), attach(specs):
        out = model.generate(  # type: ignore[operator]  # nn.Module's typing does not know HF's generate()
            input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts if batched else texts[0]
