"""The hook core: every steering, reading and early stop of a forward pass goes through here.

* :func:`steer` — the one place where an activation is modified (training and inference alike).
* :func:`attach` — the one way to register hooks: ``(module, fn, kind)`` specs become one :class:`HookHandle`.
* :func:`site_hook` — the site convention: ``decoder_block`` is read/steered at the block *input*
  (``hidden_states[L]``, TransformerLens' ``blocks.L.hook_resid_pre``), every other site at the module *output*.
* :func:`capture` — run a forward, keep the activations of some modules, and stop the forward as soon as the
  last of them is reached (one internal exception, so captures nest); :func:`capture_inputs`: block inputs.
* :class:`TokenSelection`, :class:`SequenceTracker`, :func:`current_positions` — which token positions to
  steer; positions come from the ``position_ids`` the model receives, so a token index means the same
  token in one pass and during KV-cached (or uncached) generation, and with left padding positions
  count from each row's first real token.
* :func:`pad_sequences`, :func:`pad_token_id` (the one padder); :func:`frozen_model` (the one freezer of a model).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from . import arch
from .parameterization import Additive, Affine, Clamp, OperatorSteering, Steering
from .parameterization import steer as steer_rows
from .util import uninterruptible

# ------------------------------------------------------------------------------------------ steering


def steer(
    h: torch.Tensor,
    vector: torch.Tensor,
    *,
    left: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
    matrix: torch.Tensor | None = None,
    clamp: float | None = None,
    mask: torch.Tensor | None = None,
    operator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Steer ``h`` with raw tensors: picks the parameterisation they describe and applies it with
    :func:`steering_opt.parameterization.steer` (the one place an activation is changed).

    Args:
        h: activations, shape ``(batch, seq, d)``.
        vector: ``(d,)`` or one vector per row ``(batch, d)``.
        left, right: affine factors ``(r, d)``: ``h -> h + v + (h rightᵀ) left`` (:class:`Affine`).
        matrix: a dense ``(d, d)`` matrix ``M``: ``h -> h + v + h Mᵀ``.
        clamp: clamp coefficient ``c``: ``h -> h - (h·v̂) v̂ + c v`` (:class:`Clamp`).
        mask: bool ``(batch, seq)``; positions where it is False are left untouched (a float mask
            weights the change per position).
        operator: ``operator(h, vector) -> delta`` (shape ``(batch, seq, d)`` or ``(d,)``) replacing the
            additive rule (e.g. :func:`steering_opt.contrastive.ablation_operator`).

    Returns:
        Tensor of the same shape and dtype as ``h``.
    """
    given = [name for name, x in (("clamp", clamp), ("left/right", left), ("matrix", matrix),
                                   ("operator", operator)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"steer: {' and '.join(given)} cannot be combined")
    param: Steering
    if operator is not None:
        param = OperatorSteering(vector, operator)
    elif clamp is not None:
        param = Clamp(vector, clamp)
    elif left is not None or right is not None:
        param = Affine(vector, left, right)
    elif matrix is not None:
        param = Affine(vector, matrix=matrix)
    else:
        param = Additive(vector)
    return steer_rows(h, [param], vector, mask=mask)


# --------------------------------------------------------------------------------------------- hooks

#: ``"pre"``: a forward pre-hook registered ``with_kwargs=True``, ``fn(module, args, kwargs)`` returning
#: ``None`` or new ``(args, kwargs)``. ``"post"``: a forward hook, ``fn(module, args, output)`` returning
#: ``None`` or a new output.
HOOK_KINDS: tuple[str, ...] = ("pre", "post")
#: ``(module, fn, kind)``: one hook to register (see :data:`HOOK_KINDS`).
HookSpec = tuple[nn.Module, Callable[..., Any], str]


#: Where :func:`attach`'s hooks act: ``"thread"`` (forwards run by the attaching thread) or ``"global"`` (all).
HOOK_SCOPES: tuple[str, ...] = ("thread", "global")


class HookHandle:
    """Removes a group of hooks registered together; also a context manager (removal on exit).

    ``remove()`` is idempotent, removes in reverse registration order, and finishes even when Ctrl-C is pressed
    meanwhile (the interrupt is raised once every hook is off). ``thread``: the ident of the only thread
    whose forwards the hooks act on, or None when they act on every thread (``scope="global"``). Thread-scoped
    hooks are also removed when the handle is garbage-collected: keep the handle as long as they should act.
    """

    def __init__(self, handles: Iterable[Any] = (), *, thread: int | None = None) -> None:
        self._handles: list[Any] = list(handles)
        self.thread: int | None = thread
        self._remove_rest = functools.partial(_remove_rest, self._handles)  # holds the list, not the handle
        # hooks left on die with the handle (not __del__: the cyclic gc clears torch handles' weakrefs first)
        self._finalizer = weakref.finalize(self, uninterruptible, self._remove_rest) if thread is not None else None

    @property
    def active(self) -> bool:
        """Whether some hook of this handle is still registered."""
        return bool(self._handles)

    def remove(self, *_exc: Any) -> None:
        """Remove every hook of this handle (a second call does nothing)."""
        try:
            uninterruptible(self._remove_rest)
        except KeyboardInterrupt:  # Ctrl-C landed before the removal could start deferring it
            uninterruptible(self._remove_rest)
            raise
        if self._finalizer is not None:  # nothing left to remove: the finalizer would only run for nothing
            self._finalizer.detach()

    def __enter__(self) -> HookHandle:
        return self

    __exit__ = remove  # not a call to it: a Ctrl-C taken as that call started would leave every hook on


def _remove_rest(handles: list[Any]) -> None:  # resumable: a handle leaves the list only once it is removed
    while handles:
        handles[-1].remove()
        handles.pop()


def _for_thread(fn: Callable[..., Any], thread: int) -> Callable[..., Any]:
    """``fn`` on the forwards of ``thread``; a pass-through (``None``: nothing changed) on other threads."""

    def scoped(*args: Any) -> Any:
        return fn(*args) if threading.get_ident() == thread else None

    return scoped


def attach(hooks: Iterable[HookSpec], *, scope: str = "thread") -> HookHandle:
    """Register hooks ``[(module, fn, kind), ...]`` and return one :class:`HookHandle` removing them all.

    Args:
        hooks: the specs (see :data:`HookSpec`); every one is checked before the first is registered.
        scope: ``"thread"`` (default): the hooks act only on forward passes run by the calling thread, and
            pass through unchanged on any other thread, so steering attached for a call or a ``with`` block
            never leaks into another thread's use of the same model. ``"global"``: they act on every thread
            (persistent patches such as :meth:`SteeringVector.patch`).

    If a registration fails half-way, the hooks already added are removed before the error propagates (Ctrl-C
    waits until registration is complete). Use as ``with attach(specs): ...`` or call ``.remove()``.
    """
    if scope not in HOOK_SCOPES:
        raise ValueError(f"`scope` must be one of {HOOK_SCOPES}, got {scope!r}")
    specs = list(hooks)
    for i, spec in enumerate(specs):
        if not isinstance(spec, tuple) or len(spec) != 3:
            raise TypeError(f"hook spec {i} must be a (module, fn, kind) tuple, got {spec!r:.80}")
        module, fn, kind = spec
        if not isinstance(module, nn.Module):
            raise TypeError(f"hook spec {i}: expected a torch.nn.Module, got {type(module).__name__}")
        if not callable(fn):
            raise TypeError(f"hook spec {i}: the hook must be callable, got {type(fn).__name__}")
        if kind not in HOOK_KINDS:
            raise ValueError(f"hook spec {i}: kind must be one of {HOOK_KINDS}, got {kind!r}")
    thread = threading.get_ident() if scope == "thread" else None
    fns = [fn if thread is None else _for_thread(fn, thread) for _, fn, _ in specs]
    handle = HookHandle(thread=thread)

    def register_rest() -> None:  # resumable: picks up after the last registered spec
        while len(handle._handles) < len(specs):
            i = len(handle._handles)
            module, kind = specs[i][0], specs[i][2]
            handle._handles.append(module.register_forward_pre_hook(fns[i], with_kwargs=True) if kind == "pre"
                                   else module.register_forward_hook(fns[i]))

    try:
        uninterruptible(register_rest)
        return handle
    except BaseException:
        handle.remove()
        raise


#: ``fn(activation (b, s, d), position_ids (b, s) or None) -> new activation, or None to leave it``.
SiteFn = Callable[[torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]


def layer_hook_specs(model: nn.Module, hook_infos: Any, *, site: str = "decoder_block",
                     layer_config: arch.LayerConfig = None, name: str = "hooks") -> list[HookSpec]:
    """Pre-hook specs for ``[(layer, hook_fn), ...]`` at each layer's ``site`` (nothing registered; pass
    them to :func:`attach`). Hooks taking ``(module, args, kwargs)`` are used as they are; plain
    ``hook(module, args)`` hooks (returning the new hidden states, or new args) are adapted. Every layer
    is located, and the width of a hook's ``steering_vector`` attribute checked, here."""
    if isinstance(hook_infos, (str, bytes)) or not isinstance(hook_infos, Iterable):
        raise TypeError(f"`{name}` must be a list of (layer, hook) pairs, got {type(hook_infos).__name__}")
    pairs = list(hook_infos)
    d = arch.hidden_size(model)
    for i, item in enumerate(pairs):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"`{name}[{i}]` must be a (layer, hook) pair, got {item!r:.60}")
        if not callable(item[1]):
            raise TypeError(f"`{name}[{i}]`: the hook must be callable, got {type(item[1]).__name__}")
        vec = getattr(item[1], "steering_vector", None)
        if isinstance(vec, torch.Tensor) and vec.shape[-1] != d:
            raise ValueError(f"`{name}[{i}]`: the hook's vector has size {vec.shape[-1]}, but the model's hidden "
                             f"size is {d}")
    return [(arch.get_site_module(model, layer, site, layer_config), _as_pre_hook(fn), "pre") for layer, fn in pairs]


def _as_pre_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    try:
        n_params = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_params = 3
    if n_params >= 3:
        return fn

    def adapter(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        out = fn(mod, args)
        if out is None:
            return None
        new_h = out[0] if isinstance(out, tuple) else out
        return arch.replace_hidden_states(args, kwargs, new_h)

    return adapter


def site_kind(layer_type: str) -> str:
    """The hook kind at which ``layer_type`` is read and steered: ``"pre"`` (block input) for
    ``decoder_block``, ``"post"`` (module output) for every other site."""
    return "pre" if layer_type == "decoder_block" else "post"


def site_hook(module: nn.Module, layer_type: str, fn: SiteFn) -> HookSpec:
    """The hook spec running ``fn`` on the activation of ``module`` at the site convention of ``layer_type``.

    ``decoder_block``: ``fn`` sees (and may replace) the residual stream *entering* the block and the
    block's ``position_ids``. Every other site: ``fn`` sees (and may replace) the module's output, with
    ``position_ids=None``. Used for steering and reading alike, so a vector read at a site is applied at
    the very same tensor.
    """
    if site_kind(layer_type) == "pre":

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            out = fn(arch.get_hidden_states(args, kwargs), kwargs.get("position_ids"))
            return None if out is None else arch.replace_hidden_states(args, kwargs, out)

        return module, pre_hook, "pre"

    def post_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        out = fn(arch.get_output_hidden_states(output), None)
        return None if out is None else arch.replace_output_hidden_states(output, out)

    return module, post_hook, "post"


# ------------------------------------------------------------------------------------------- capture

K = TypeVar("K", bound=Hashable)


class _StopForward(Exception):
    """Raised by :func:`capture`'s hooks once every requested activation is read (ends the forward)."""

    def __init__(self, owner: object) -> None:
        super().__init__("forward stopped after the last captured module")
        self.owner = owner


def capture(
    forward: Callable[[], Any],
    points: Mapping[K, tuple[nn.Module, str]],
    *,
    read: Callable[[K, torch.Tensor], Any] | None = None,
    hooks: Iterable[HookSpec] = (),
) -> dict[K, Any]:
    """Run ``forward()`` and capture activations; the forward stops once the last one is read.

    Args:
        forward: runs the model once, e.g. ``lambda: model(input_ids=ids, use_cache=False)``.
        points: ``{key: (module, kind)}``: ``"pre"`` reads the module's hidden-state *input* (the residual
            stream entering a block; the module itself does not run when it is the last point),
            ``"post"`` its hidden-state *output* (see :func:`site_kind` for a site's kind).
        read: ``read(key, activation (b, s, d)) -> value`` stored instead of the activation (e.g. select
            some rows/positions, ``.detach().cpu()``); default: the activation itself, not detached, so
            gradients flow when they are enabled.
        hooks: more hook specs (e.g. steering) attached for this forward only.

    Returns:
        ``{key: value}`` for the points that ran (the first time each ran); a point whose module never
        ran is missing — callers that need all of them check. All hooks are removed on return, also on
        errors; ``forward``'s result is discarded.
    """
    owner = object()
    out: dict[K, Any] = {}
    n = len(points)

    def store(key: K, h: torch.Tensor) -> None:
        if key not in out:
            out[key] = h if read is None else read(key, h)
        if len(out) == n:
            raise _StopForward(owner)

    def make(key: K, module: nn.Module, kind: str) -> HookSpec:
        if kind == "pre":
            return module, lambda m, args, kwargs: store(key, arch.get_hidden_states(args, kwargs)), "pre"
        if kind == "post":
            return module, lambda m, args, output: store(key, arch.get_output_hidden_states(output)), "post"
        raise ValueError(f"capture point {key!r}: kind must be one of {HOOK_KINDS}, got {kind!r}")

    specs = [*hooks, *(make(key, module, kind) for key, (module, kind) in points.items())]
    with attach(specs):
        try:
            forward()
        except _StopForward as e:
            if e.owner is not owner:  # another capture's stop, nested inside ours
                raise
    return out


#: ``(module, fn)`` with ``fn(h (b, s, d)) -> new h`` steering the hidden-state *input* of ``module``, or a
#: full :data:`HookSpec`.
SteerHook = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]] | HookSpec


def capture_inputs(
    model: nn.Module,
    modules: Sequence[nn.Module],
    forward: Callable[[], Any] | Mapping[str, Any],
    *,
    steer_hooks: Iterable[SteerHook] = (),
) -> list[torch.Tensor]:
    """The hidden-state input of each of ``modules`` (e.g. the residual stream entering some blocks) during
    one forward of ``model``, which stops before the last of them runs: :func:`capture` for block inputs.

    Args:
        model: the model.
        modules: the modules whose input to return (any order; each must run during the forward).
        forward: a zero-argument callable running ``model``, or a dict of keyword arguments for ``model``.
        steer_hooks: steering attached for this forward only: ``(module, fn)`` pairs, ``fn(h) -> new h`` on
            that module's hidden-state input, or :data:`HookSpec` s.

    Returns:
        One tensor ``(b, s, d)`` per module, in the order of ``modules`` (not detached: gradients flow
        through the steering when they are enabled).

    Raises:
        RuntimeError: a module did not run during the forward.
    """
    run = (lambda: model(**forward)) if isinstance(forward, Mapping) else forward
    specs: list[HookSpec] = []
    for item in steer_hooks:
        if len(item) == 3:
            specs.append(item)  # a full (module, fn, kind) spec
        else:
            module, fn = item

            def site_fn(h: torch.Tensor, _pos: torch.Tensor | None, fn: Callable = fn) -> torch.Tensor:
                return fn(h)

            specs.append(site_hook(module, "decoder_block", site_fn))
    got = capture(run, {i: (m, "pre") for i, m in enumerate(modules)}, hooks=specs)
    missing = [i for i in range(len(modules)) if i not in got]
    if missing:
        raise RuntimeError(f"capture_inputs: modules {missing} did not run during the forward pass")
    return [got[i] for i in range(len(modules))]


# ----------------------------------------------------------------------------------- token positions

#: Positions to steer: int(s) (negative: from the end of the prompt), a slice, or a 1-D bool/float mask.
TokenIndices = int | Sequence[int] | slice | torch.Tensor | None
INJECTION_MODES: tuple[str, ...] = ("all", "first", "last", "generated")


def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        try:
            return int(get())
        except Exception:  # caches of unusual layouts: assume nothing cached
            return 0
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        first = cache[0][0]
        return int(first.shape[-2]) if isinstance(first, torch.Tensor) else 0
    return 0


class SequenceTracker:
    """Forward pre-hook on the whole model: where the current forward's tokens sit in their sequence.

    For each forward it records ``positions`` ``(b, n)`` (the ``position_ids`` passed to the model, else
    ``past_length + arange(n)``, as the model computes them), ``real`` ``(b, n)`` (the attention mask's
    columns for these tokens, or None) and, per row, ``prompt_start`` / ``prompt_end`` (first position
    / one past the last position of the real tokens of the *prompt*).

    A forward is the next step of a generation (and keeps the prompt bounds) when it has a non-empty KV
    cache, or when its ``input_ids`` are longer than the prompt's and start with them (``generate`` with
    ``use_cache=False`` re-feeds the whole sequence; beam reordering keeps each row's prompt); any other
    forward starts a new prompt. Hence "last prompt token", "generated tokens" and negative indices
    select the same tokens with and without a KV cache. Attach it with ``(model, tracker, "pre")``.
    """

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None
        self.real: torch.Tensor | None = None
        self.prompt_start: torch.Tensor | None = None
        self.prompt_end: torch.Tensor | None = None
        self._prompt_ids: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if not isinstance(ref, torch.Tensor) or ref.dim() < 2:
            self.positions = self.real = self.prompt_start = self.prompt_end = self._prompt_ids = None
            return
        b, n = int(ref.shape[0]), int(ref.shape[1])
        past = _cache_len(kwargs.get("cache", kwargs.get("past_key_values")))
        pos = kwargs.get("position_ids")
        if not (isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == n and pos.shape[0] in (1, b)):
            pos = torch.arange(past, past + n, device=ref.device)[None]
        pos = pos.to(ref.device).long().expand(b, n)
        mask = kwargs.get("attention_mask")
        real = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= n:
            real = mask[:, mask.shape[1] - n:].to(ref.device).bool()
        prompt = self._prompt_ids
        continuation = past > 0 or (
            ids is not None and prompt is not None and prompt.shape[0] == b and n > prompt.shape[1]
            and torch.equal(ids[:, : prompt.shape[1]], prompt.to(ids.device)))
        if not continuation or self.prompt_end is None or self.prompt_end.shape[0] != b:
            self.prompt_start, self.prompt_end = _bounds(pos, real)
            self._prompt_ids = ids.detach().clone() if ids is not None and ids.dim() == 2 and past == 0 else None
        self.positions, self.real = pos, real


def _bounds(pos: torch.Tensor, real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: first position and one past the last position of the real tokens (all if none are real)."""
    if real is not None:
        real = real & real.any(dim=1, keepdim=True) | ~real.any(dim=1, keepdim=True)
        start = pos.masked_fill(~real, 2**62).min(dim=1).values
        end = pos.masked_fill(~real, -1).max(dim=1).values + 1
        return start, end
    return pos.min(dim=1).values, pos.max(dim=1).values + 1


def current_positions(h: torch.Tensor, position_ids: torch.Tensor | None,
                      tracker: SequenceTracker | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions (b, s), prompt_start (b,), prompt_end (b,))`` for activations ``h`` ``(b, s, d)``.

    Positions come from the block's ``position_ids``, else from the tracker, else ``arange(s)``; the
    prompt bounds from the tracker, else from these positions (the forward is taken as a whole prompt).
    """
    b, n = int(h.shape[0]), int(h.shape[1])
    candidates = (position_ids, tracker.positions if tracker is not None else None)
    pos = next((c for c in candidates if isinstance(c, torch.Tensor) and c.dim() == 2 and c.shape[-1] == n
                and c.shape[0] in (1, b)), None)
    pos = torch.arange(n, device=h.device)[None] if pos is None else pos
    pos = pos.to(h.device).long().expand(b, n)
    if tracker is not None and tracker.prompt_end is not None and tracker.prompt_end.shape[0] == b:
        assert tracker.prompt_start is not None
        return pos, tracker.prompt_start.to(h.device), tracker.prompt_end.to(h.device)
    start, end = _bounds(pos, None)
    return pos, start, end


class TokenSelection:
    """Which token positions to steer (validated once, evaluated at every forward by :meth:`mask`).

    Args:
        min_token_index: steer only positions ``>= min_token_index``.
        token_indices: ``None`` (no restriction); an int or a sequence of ints (negative ints count from
            the end of the prompt); a slice with step 1 (negative bounds likewise); a 1-D bool mask
            ``(seq,)`` indexed by position; or a 1-D float tensor ``(seq,)`` of per-position weights.
        injection_mode: ``"all"``, ``"first"`` (the prompt's first token), ``"last"`` (the prompt's last
            token and every later one) or ``"generated"`` (positions after the prompt).
        name: the argument name used for ``token_indices`` in error messages.

    All criteria combine with AND. Raises ``TypeError`` / ``ValueError`` on bad arguments.
    """

    def __init__(self, min_token_index: int = 0, token_indices: TokenIndices = None, injection_mode: str = "all",
                 *, name: str = "token_indices"):
        if isinstance(min_token_index, bool) or not isinstance(min_token_index, numbers.Integral) \
                or min_token_index < 0:
            raise ValueError(f"`min_token_index` must be an int >= 0, got {min_token_index!r}")
        if injection_mode not in INJECTION_MODES:
            raise ValueError(f"`injection_mode` must be one of {INJECTION_MODES}, got {injection_mode!r}")
        self.min_token_index: int = int(min_token_index)
        self.injection_mode: str = injection_mode
        self.indices: torch.Tensor | None = None
        self.slice: slice | None = None
        self.weights: torch.Tensor | None = None
        ti = token_indices
        if ti is None:
            pass
        elif isinstance(ti, slice):
            for part, bound in (("start", ti.start), ("stop", ti.stop)):
                if bound is not None and (isinstance(bound, bool) or not isinstance(bound, numbers.Integral)):
                    raise TypeError(f"`{name}` slice {part} must be an int or None, got {bound!r}")
            if ti.step not in (None, 1):
                raise ValueError(f"`{name}` slice step must be 1 (or None), got {ti.step!r}")
            if ti.start is not None and ti.stop is not None and (ti.start < 0) == (ti.stop < 0) \
                    and ti.start >= ti.stop:
                raise ValueError(f"`{name}` slice {ti} selects no position (start must be below stop)")
            self.slice = ti
        elif isinstance(ti, torch.Tensor) and (ti.dtype == torch.bool or ti.is_floating_point()):
            if ti.dim() != 1:
                raise ValueError(f"`{name}` as a mask must be 1-D (seq,), got shape {tuple(ti.shape)}")
            self.weights = ti.detach()
        elif isinstance(ti, str):
            raise TypeError(f"`{name}` must be an int, a sequence of ints, a slice or a 1-D tensor, not a str"
                            " (for token modes use injection_mode='first'/'last'/'generated')")
        else:
            items = [ti] if isinstance(ti, numbers.Integral) else ti
            try:
                idx = torch.as_tensor(items if isinstance(items, torch.Tensor) else list(items))
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"`{name}` must be an int, a sequence of ints, a slice or a 1-D tensor; "
                                f"got {type(ti).__name__}") from e
            if idx.numel() == 0:
                raise ValueError(f"`{name}` is empty: it would steer no position (None steers every position)")
            if idx.dim() > 1 or idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
                raise TypeError(f"`{name}` must hold ints, got {idx.dtype} of shape {tuple(idx.shape)}")
            self.indices = idx.reshape(-1).long()

    @property
    def selects_all(self) -> bool:
        """True when every position is selected (:meth:`mask` returns None)."""
        return (self.min_token_index == 0 and self.injection_mode == "all" and self.indices is None
                and self.slice is None and self.weights is None)

    def mask(self, pos: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor | None:
        """Bool ``(b, s)`` (or float weights) of the positions to steer; None means all of them.

        Args:
            pos: absolute token positions ``(b, s)``.
            start, end: per row ``(b,)``, the prompt's first position and one past its last one (negative
                indices and slice bounds count back from ``end``).
        """
        if self.selects_all:
            return None
        m = pos >= self.min_token_index
        mode = self.injection_mode
        if mode == "first":
            m &= pos == start[:, None]
        elif mode == "last":
            m &= pos >= end[:, None] - 1
        elif mode == "generated":
            m &= pos >= end[:, None]
        if self.slice is not None:
            def bound(x: int | None, default: int) -> torch.Tensor:
                if x is None:
                    return torch.full_like(end[:, None], default)
                return end[:, None] + x if x < 0 else torch.full_like(end[:, None], x)

            m &= (pos >= bound(self.slice.start, 0)) & (pos < bound(self.slice.stop, 2**62))
        if self.indices is not None:
            idx = self.indices.to(pos.device)[None, :]
            targets = torch.where(idx < 0, end[:, None] + idx, idx)  # (b, k)
            m &= (pos[..., None] == targets[:, None, :]).any(-1)
        if self.weights is not None:
            w = self.weights.to(pos.device)
            inside = pos < w.shape[0]
            vals = w[pos.clamp(0, w.shape[0] - 1)]
            if w.dtype == torch.bool:
                return m & inside & vals
            return torch.where(inside & m, vals, torch.zeros_like(vals))
        return m


# ------------------------------------------------------------------------------------------- padding


def pad_token_id(tokenizer: Any, model: nn.Module | None = None) -> int:
    """The id to pad with: the tokenizer's pad (else EOS) token, else the model's generation config's /
    config's, else 0. Padded positions are masked out, so the choice never changes a result."""
    for src in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            val = getattr(src, attr, None) if src is not None else None
            if isinstance(val, (list, tuple)):
                val = val[0] if val else None
            if isinstance(val, int):
                return val
    return 0


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right",
                  width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into one batch.

    Args:
        seqs: ``b`` lists of token ids (any lengths, at least one sequence).
        pad_id: the id written at padded positions.
        side: ``"right"`` (tokens first) or ``"left"`` (padding first, as for generation).
        width: the padded length (default: the longest sequence; must not be shorter).

    Returns:
        ``(input_ids, attention_mask)``, both ``(b, width)`` int64 on the CPU; the mask is 1 on real tokens.
        With left padding row ``r``'s tokens start at column ``width - len(seqs[r])``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"`side` must be 'left' or 'right', got {side!r}")
    lengths = [len(s) for s in seqs]
    longest = max(lengths, default=0)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"`width`={width} is shorter than the longest sequence ({longest} tokens)")
    ids = torch.full((len(lengths), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for r, (s, n) in enumerate(zip(seqs, lengths)):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[r, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, cols] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------- freezing


class _Frozen:
    """What :func:`frozen_model` saved of one model, and the calls (tokens) currently holding it frozen."""

    def __init__(self, model: nn.Module) -> None:
        self.flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.config: Any = getattr(model, "config", None)
        self.use_cache = getattr(self.config, "use_cache", None)
        self.holders: set[object] = set()

    def freeze(self) -> None:  # idempotent
        for p, _, _ in self.flags:
            p.requires_grad_(False)
        for m, _ in self.modes:
            m.training = False

    def restore(self) -> None:  # idempotent
        for p, flag, grad in self.flags:
            p.requires_grad_(flag)
            p.grad = grad
        for m, t in self.modes:
            m.training = t
        if self.use_cache is not None:
            self.config.use_cache = self.use_cache


_FROZEN: weakref.WeakKeyDictionary[nn.Module, _Frozen] = weakref.WeakKeyDictionary()
_FROZEN_LOCK = threading.Lock()


@contextlib.contextmanager
def frozen_model(model: nn.Module) -> Iterator[nn.Module]:
    """Freeze and eval the model for the duration; afterwards restore ``requires_grad``, ``.grad``, train mode
    and ``config.use_cache`` exactly, also on exceptions and ``KeyboardInterrupt`` (Ctrl-C pressed while
    freezing or restoring is raised once that is complete). Overlapping calls (nested, or in several threads)
    share one freeze: the first to enter saves the state, the last to leave restores it.
    """
    token = object()

    def enter() -> None:  # resumable: saves once, (re)freezes, registers the token
        with _FROZEN_LOCK:
            record = _FROZEN.get(model)
            if record is None:
                record = _FROZEN[model] = _Frozen(model)
            record.freeze()
            record.holders.add(token)

    def leave() -> None:  # resumable: the last holder restores
        with _FROZEN_LOCK:
            record = _FROZEN.get(model)
            if record is not None and not record.holders - {token}:
                record.restore()
                _FROZEN.pop(model, None)
            elif record is not None:
                record.holders.discard(token)

    try:
        uninterruptible(enter)
        yield model
    finally:
        try:
            uninterruptible(leave)
        except KeyboardInterrupt:  # Ctrl-C landed before `leave` could start deferring it
            uninterruptible(leave)
            raise
