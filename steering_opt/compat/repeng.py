"""repeng (Theia Vogel) API: ``from steering_opt.compat.repeng import ControlVector, ControlModel, DatasetEntry``
replaces ``from repeng import ...`` and the code runs unchanged.

Thin adapters over the native core: activations are read by :func:`steering_opt.contrastive.extract_activations`,
the principal component is :func:`steering_opt.contrastive.pca_aggregator`'s, and :class:`ControlModel` steers
through hooks registered by :func:`steering_opt.hooks.attach` (activations changed by
:func:`steering_opt.hooks.steer`).

**Layer numbering is repeng's**: layer ``i`` is the *output* of decoder block ``i`` (repeng reads
``hidden_states[i + 1]`` and its ``ControlModel`` adds the control to the output of ``model.layers[i]``). That
is steering_opt's ``decoder_block`` layer ``i + 1`` (the input of the next block) and llama.cpp's / GGUF's
``direction.{i}``. :meth:`ControlVector.to_steering_opt` converts explicitly.

Differences from repeng, kept on purpose:

* :class:`ControlModel` does not replace the model's layers: it registers hooks while a control is set and
  removes them on :meth:`~ControlModel.reset` / :meth:`~ControlModel.unwrap`, so the model is never changed
  permanently (after ``reset()`` its logits are exactly the original ones) and ``model`` can still be used
  directly (it is then steered too while a control is set, as with repeng). Padding positions are steered like
  any other (their values never reach real tokens; repeng skips left padding).
* training reads every layer at the block output, the tensor :class:`ControlModel` steers. repeng reads
  ``hidden_states[i + 1]``, which for the *last* layer is after the model's final norm: directions for the
  last block differ (all others are the same).
* ``method="umap"`` raises ``NotImplementedError`` (it needs the ``umap-learn`` package and is experimental in
  repeng). ``max_batch_size`` (the name repeng's docstring uses) is accepted as ``batch_size``.
* ``export_gguf`` writes float32 directions (llama.cpp's type) atomically, with permissions from the umask.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .. import arch
from ..contrastive import extract_activations, pca_aggregator
from ..fsutil import atomic_write_file
from ..hooks import HookHandle, attach, site_hook, steer
from ..vector import SteeringVector
from .steering_vectors import core_site

__all__ = ["ComputeHiddens", "ControlModel", "ControlVector", "DatasetEntry", "read_representations"]

_METHODS = ("pca_diff", "pca_center", "umap")


@dataclasses.dataclass
class DatasetEntry:
    """One contrast pair: a text showing the behaviour and a matched text that does not."""

    positive: str
    negative: str


class ComputeHiddens(Protocol):
    """Override of the hidden-state computation: ``{layer: array (len(train_strs), d)}``, the last token of
    each string in ``train_strs`` (ordered positive, negative, positive, ...)."""

    def __call__(self, model: Any, tokenizer: Any, train_strs: list[str], hidden_layers: list[int],
                 batch_size: int) -> dict[int, np.ndarray]: ...


def _inner_model(model: Any) -> nn.Module:
    inner = model.model if isinstance(model, ControlModel) else model
    if not isinstance(inner, nn.Module):
        raise TypeError(f"`model` must be a HuggingFace model or a ControlModel, got {type(model).__name__}")
    return inner


def _check_dataset(dataset: Any) -> list[DatasetEntry]:
    if isinstance(dataset, (str, bytes, Mapping)) or not isinstance(dataset, Iterable):
        raise TypeError(f"`dataset` must be a list of DatasetEntry, got {type(dataset).__name__}")
    entries = list(dataset)
    if not entries:
        raise ValueError("`dataset` is empty; pass at least one DatasetEntry(positive=..., negative=...)")
    for i, e in enumerate(entries):
        if not (isinstance(getattr(e, "positive", None), str) and isinstance(getattr(e, "negative", None), str)):
            raise TypeError(f"`dataset[{i}]` must be a DatasetEntry with str positive/negative, got {e!r:.80}")
    return entries


def _block_output_hiddens(model: nn.Module, tokenizer: Any, train_strs: list[str], hidden_layers: list[int],
                          batch_size: int) -> dict[int, np.ndarray]:
    """The last token's block output at each layer for each string (core extraction, ``batch_size`` strings
    per forward); ``{layer: (len(train_strs), d)}`` float32, rows in ``train_strs`` order."""
    site, config = core_site("decoder_block")
    pairs = list(zip(train_strs[0::2], train_strs[1::2]))
    pos, neg = extract_activations(model, tokenizer, pairs, hidden_layers, site, config, -1, batch_size)
    out: dict[int, np.ndarray] = {}
    for layer in hidden_layers:
        rows = torch.empty(len(train_strs), pos[layer].shape[1])
        rows[0::2], rows[1::2] = pos[layer], neg[layer]
        out[layer] = rows.numpy()
    return out


def _direction(h: np.ndarray, method: str, layer: int) -> np.ndarray:
    """repeng's direction for one layer from ``h`` (rows positive, negative, positive, ...): the first principal
    component of the differences (``pca_diff``, centred as scikit-learn's PCA centres them) or of the pairs
    centred on their means (``pca_center``), signed so that most positives project above their negatives (on a
    tie, with its largest entry positive, as scikit-learn signs it)."""
    t = torch.from_numpy(np.asarray(h, dtype=np.float64))
    pos, neg = t[0::2], t[1::2]
    pca = pca_aggregator()
    try:
        if method == "pca_diff":
            diffs = pos - neg
            direction = pca(diffs - diffs.mean(0), torch.zeros_like(diffs))
        else:  # pca_center: rows ±(pos - neg)/2, already centred: the uncentred PCA of the differences
            direction = pca(pos, neg)
    except ValueError as e:
        raise ValueError(f"layer {layer}: {method} found no direction ({e}); use more (and distinct) pairs") from None
    if float(direction[direction.abs().argmax()]) < 0:  # scikit-learn's sign (svd_flip): largest entry positive,
        direction = -direction  # which repeng keeps when as many pairs project one way as the other
    proj_pos, proj_neg = pos @ direction, neg @ direction
    smaller = float((proj_pos < proj_neg).double().mean())
    larger = float((proj_pos > proj_neg).double().mean())
    if smaller > larger:
        direction = -direction
    return direction.numpy().astype(np.float32)


def read_representations(
    model: Any,
    tokenizer: Any,
    inputs: list[DatasetEntry],
    hidden_layers: Iterable[int] | None = None,
    batch_size: int = 32,
    method: str = "pca_diff",
    compute_hiddens: ComputeHiddens | None = None,
    transform_hiddens: Callable[[dict[int, np.ndarray]], dict[int, np.ndarray]] | None = None,
) -> dict[int, np.ndarray]:
    """repeng's ``read_representations``: ``{layer: unit direction (d,) float32}``.

    Args:
        hidden_layers: repeng layers (block outputs; negative count from the end). Default, as in repeng:
            ``-1, -2, ..., -(n_layers - 1)`` (every block but the first).
        batch_size: strings per forward pass.
        method: ``"pca_diff"`` or ``"pca_center"`` (``"umap"``: ``NotImplementedError``).
        compute_hiddens, transform_hiddens: repeng's overrides of the hidden-state computation / a transform
            applied to them (``{layer: (2 * len(inputs), d)}``).
    """
    inner = _inner_model(model)
    entries = _check_dataset(inputs)
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {list(_METHODS)}, got {method!r}")
    if method == "umap":
        raise NotImplementedError("method='umap' is not available in steering_opt (it needs the umap-learn package "
                                  "and is experimental in repeng); use 'pca_diff' or 'pca_center'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    n = arch.num_layers(inner)
    requested = list(range(-1, -n, -1)) if not hidden_layers else list(hidden_layers)
    layers = list(dict.fromkeys(arch.resolve_layer(inner, layer, name="hidden_layers") for layer in requested))
    train_strs = [s for e in entries for s in (e.positive, e.negative)]
    if compute_hiddens is None:
        hiddens = _block_output_hiddens(inner, tokenizer, train_strs, layers, int(batch_size))
    else:
        hiddens = compute_hiddens(model=model, tokenizer=tokenizer, train_strs=train_strs, hidden_layers=layers,
                                  batch_size=int(batch_size))
    if transform_hiddens is not None:
        hiddens = transform_hiddens(hiddens)
    directions: dict[int, np.ndarray] = {}
    for layer in layers:
        h = np.asarray(hiddens[layer])
        if h.ndim != 2 or h.shape[0] != len(train_strs):
            raise ValueError(f"hidden states of layer {layer} have shape {h.shape}; expected ({len(train_strs)}, d)")
        directions[layer] = _direction(h, method, layer)
    return directions


# ------------------------------------------------------------------------------------ the vector


@dataclasses.dataclass
class ControlVector:
    """repeng's control vector: ``directions`` ``{layer: array (d,)}`` in repeng's numbering (layer ``i``: the
    output of block ``i``) and the ``model_type`` it was trained on."""

    model_type: str
    directions: dict[int, np.ndarray]

    @classmethod
    def train(cls, model: Any, tokenizer: Any, dataset: list[DatasetEntry], **kwargs: Any) -> ControlVector:
        """Train on ``dataset`` (see :func:`read_representations` for the keyword arguments: ``hidden_layers``,
        ``batch_size`` (alias ``max_batch_size``), ``method``, ``compute_hiddens``, ``transform_hiddens``).
        ``model`` may be a :class:`ControlModel` (a control it has set stays active while reading, as in repeng).
        """
        if "max_batch_size" in kwargs:
            if "batch_size" in kwargs:
                raise TypeError("pass `batch_size` or `max_batch_size`, not both")
            kwargs["batch_size"] = kwargs.pop("max_batch_size")
        directions = read_representations(model, tokenizer, dataset, **kwargs)
        config = getattr(_inner_model(model), "config", None)
        return cls(model_type=str(getattr(config, "model_type", None) or "unknown"), directions=directions)

    # ------------------------------------------------------------------ files
    def export_gguf(self, path: os.PathLike[str] | str) -> None:
        """Write a llama.cpp control-vector GGUF file, as repeng does: ``general.architecture =
        "controlvector"``, ``controlvector.model_hint``, ``controlvector.layer_count``, tensors
        ``direction.{layer}`` (float32). Atomic: ``path`` is the old file or the complete new one."""
        import gguf

        directions = {int(k): np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(-1))
                      for k, v in self.directions.items()}

        def write(tmp: Path) -> None:
            writer = gguf.GGUFWriter(str(tmp), "controlvector")
            writer.add_string("controlvector.model_hint", str(self.model_type))
            writer.add_uint32("controlvector.layer_count", len(directions))
            for layer, v in directions.items():
                writer.add_tensor(f"direction.{layer}", v)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        atomic_write_file(path, write)

    @classmethod
    def import_gguf(cls, path: os.PathLike[str] | str) -> ControlVector:
        """Read a control-vector GGUF file (repeng's or llama.cpp's). Warns if the architecture is not
        ``controlvector``; raises ``ValueError`` if ``controlvector.model_hint`` is missing or a tensor name is
        not ``direction.<int>``, ``FileNotFoundError`` if there is no file."""
        import gguf

        if not Path(path).is_file():
            raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: not a valid GGUF file: {type(exc).__name__}: {exc}") from None

        def text(key: str) -> str | None:
            field = reader.get_field(key)
            if field is None or not len(field.parts):
                return None
            return bytes(field.parts[-1]).decode("utf-8", errors="replace")

        architecture = text("general.architecture")
        if architecture is None:
            warnings.warn(".gguf file missing architecture field", stacklevel=2)
        elif architecture != "controlvector":
            warnings.warn(f".gguf file with architecture {architecture!r} does not appear to be a control vector!",
                          stacklevel=2)
        hint = text("controlvector.model_hint")
        if hint is None:
            raise ValueError(".gguf file missing controlvector.model_hint field")
        directions: dict[int, np.ndarray] = {}
        for t in reader.tensors:
            if not t.name.startswith("direction."):
                continue
            try:
                layer = int(t.name.split(".")[1])
            except (IndexError, ValueError):
                raise ValueError(f".gguf file has invalid direction field name: {t.name}") from None
            directions[layer] = np.array(t.data).reshape(-1)
        return cls(model_type=hint, directions=directions)

    def to_steering_opt(self) -> SteeringVector:
        """The same steering as a native :class:`steering_opt.vector.SteeringVector`: repeng's layer ``i`` (output
        of block ``i``) is steering_opt's ``decoder_block`` layer ``i + 1``. (The last block's output has no
        steering_opt layer: applying such a vector raises a range error.)"""
        return SteeringVector({int(k) + 1: torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(-1).copy())
                               for k, v in self.directions.items()},
                              metadata={"method": "repeng", "model": {"model_type": self.model_type}})

    # ------------------------------------------------------------------ arithmetic (as in repeng)
    def _combine(self, other: ControlVector, other_coeff: float) -> ControlVector:
        if self.model_type != other.model_type:
            warnings.warn("Trying to add vectors with mismatched model_types together, this may produce unexpected "
                          "results.", stacklevel=3)
        directions = dict(self.directions)
        for layer, v in other.directions.items():
            scaled = other_coeff * v
            directions[layer] = directions[layer] + scaled if layer in directions else scaled
        return ControlVector(model_type=self.model_type, directions=directions)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, ControlVector):
            return NotImplemented
        return (self.model_type == other.model_type and self.directions.keys() == other.directions.keys()
                and all(np.array_equal(self.directions[k], other.directions[k]) for k in self.directions))

    def __add__(self, other: ControlVector) -> ControlVector:
        if not isinstance(other, ControlVector):
            raise TypeError(f"Unsupported operand type(s) for +: 'ControlVector' and '{type(other).__name__}'")
        return self._combine(other, 1)

    def __sub__(self, other: ControlVector) -> ControlVector:
        if not isinstance(other, ControlVector):
            raise TypeError(f"Unsupported operand type(s) for -: 'ControlVector' and '{type(other).__name__}'")
        return self._combine(other, -1)

    def __neg__(self) -> ControlVector:
        return ControlVector(model_type=self.model_type, directions={k: -v for k, v in self.directions.items()})

    def __mul__(self, other: float) -> ControlVector:
        if isinstance(other, bool) or not isinstance(other, (numbers.Real, np.number)):
            return NotImplemented
        return ControlVector(model_type=self.model_type, directions={k: other * v for k, v in self.directions.items()})

    def __rmul__(self, other: float) -> ControlVector:
        return self.__mul__(other)

    def __truediv__(self, other: float) -> ControlVector:
        if isinstance(other, bool) or not isinstance(other, (numbers.Real, np.number)):
            return NotImplemented
        return self.__mul__(1 / other)


# ------------------------------------------------------------------------------------ the model


class ControlModel(nn.Module):
    """repeng's ``ControlModel``: ``model`` with controls on the outputs of blocks ``layer_ids`` (repeng's
    numbering; negative count from the end).

    Unlike repeng's, it does not mutate ``model``: :meth:`set_control` registers hooks on the blocks,
    :meth:`reset` and :meth:`unwrap` remove them, after which the model behaves exactly as before.
    Calling it, :meth:`forward` and :meth:`generate` pass through to ``model``.
    """

    def __init__(self, model: nn.Module, layer_ids: Iterable[int]):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a HuggingFace model (torch.nn.Module), got {type(model).__name__}")
        if isinstance(model, ControlModel):
            warnings.warn("Trying to rewrap a wrapped model! Probably not what you want! Try calling .unwrap first.",
                          stacklevel=2)
            model = _inner_model(model)
        if isinstance(layer_ids, (str, bytes)) or not isinstance(layer_ids, Iterable):
            raise TypeError(f"`layer_ids` must be a list of ints, got {type(layer_ids).__name__}")
        self.model = model
        self.layer_ids: list[int] = list(dict.fromkeys(arch.resolve_layer(model, i, name="layer_ids")
                                                       for i in layer_ids))
        self._handle = HookHandle()
        self._unwrapped = False

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return arch.input_device(self.model)

    def unwrap(self) -> nn.Module:
        """Remove the controls and return the model (unchanged). ``set_control`` no longer works afterwards."""
        self._handle.remove()
        self._unwrapped = True
        return self.model

    def set_control(self, control: ControlVector, coeff: float = 1.0, **kwargs: Any) -> None:
        """Steer with ``coeff * control.directions[i]`` added to the output of each block ``i`` in ``layer_ids``
        (replacing any control set before). Keyword arguments: ``normalize`` (rescale each token's activation to
        its norm before the control) and ``operator`` (``(current, control) -> new activation``; default +)."""
        if not isinstance(control, ControlVector):
            raise TypeError(f"`control` must be a ControlVector, got {type(control).__name__}")
        if isinstance(coeff, bool) or not isinstance(coeff, (numbers.Real, np.number)):
            raise TypeError(f"`coeff` must be a number, got {coeff!r}")
        missing = [i for i in self.layer_ids if i not in control.directions]
        if missing:
            raise ValueError(f"the control vector has no direction for layer(s) {missing} of this ControlModel "
                             f"(it has {sorted(control.directions)})")
        raw = {i: torch.as_tensor(float(coeff) * np.asarray(control.directions[i], dtype=np.float32))
               for i in self.layer_ids}
        self.set_raw_control(raw, **kwargs)

    def reset(self) -> None:
        """Remove the control: the model behaves exactly as the original."""
        self.set_raw_control(None)

    def set_raw_control(self, control: dict[int, torch.Tensor] | None, normalize: bool = False,
                        operator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Set ``{layer: tensor (d,)}`` (a superset of ``layer_ids`` is fine) as the control, or remove it
        (``None``). ``normalize`` / ``operator`` as in :meth:`set_control`."""
        if self._unwrapped:
            raise RuntimeError("this ControlModel was unwrapped; wrap the model again to set a control")
        if control is None:
            self._handle.remove()
            return
        if not isinstance(control, Mapping):
            raise TypeError(f"`control` must be a dict {{layer: tensor (d,)}} or None, got {type(control).__name__}")
        if operator is not None and not callable(operator):
            raise TypeError(f"`operator` must be a callable (current, control) -> new, got {type(operator).__name__}")
        d = arch.hidden_size(self.model)
        tensors: dict[int, torch.Tensor] = {}
        for layer in self.layer_ids:
            if layer not in control:
                raise ValueError(f"`control` has no tensor for layer {layer} (layer_ids: {self.layer_ids})")
            t = torch.as_tensor(control[layer]).detach()
            if tuple(t.shape) != (d,) or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"`control[{layer}]` must be a finite float tensor of shape ({d},), got "
                                 f"{t.dtype} {tuple(t.shape)}")
            tensors[layer] = t
        site, config = core_site("decoder_block")
        specs = [site_hook(config[site](self.model, layer), site, _control_fn(t, bool(normalize), operator))
                 for layer, t in tensors.items()]
        self._handle.remove()
        self._handle = attach(specs, scope="global")  # persistent, like repeng: every thread until reset()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.forward(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        model: Any = self.model  # a HuggingFace model (``generate`` is not on nn.Module)
        return model.generate(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _control_fn(control: torch.Tensor, normalize: bool,
                operator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
                ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    delta: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    if operator is not None:
        combine = operator

        def delta(act: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:  # repeng's operator returns the new value
            return combine(act, vec.reshape(1, 1, -1)) - act

    def fn(h: torch.Tensor, _position_ids: torch.Tensor | None) -> torch.Tensor:
        c = control.to(h)
        new = steer(h, c) if delta is None else steer(h, c, operator=delta)
        if normalize:
            new = new / new.norm(dim=-1, keepdim=True) * h.norm(dim=-1, keepdim=True)
        return new

    return fn
