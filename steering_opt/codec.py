"""SteeringVector <-> named tensors + a JSON description: the one (de)serialisation seam.

Every file format goes through the two functions here:

* :func:`vector_to_tensors`: a :class:`~steering_opt.vector.SteeringVector` becomes flat named tensors and a
  *spec* (``site``, ``layers``, ``hidden_size``, ``kind``, ``clamp``, ``affine_rank``, ``tensors``: name ->
  shape and dtype). The native format (:mod:`steering_opt.persist`) stores exactly these.
* :func:`vector_from_tensors`: the inverse, and the **one checked constructor**: the native loader and every
  importer (:mod:`steering_opt.interop`) end in it. It checks the spec, that the tensors are exactly the ones
  the spec implies with the declared shapes and dtypes, that every value is finite and the kind's parameters
  are valid, and raises :class:`SteeringFileError` naming the file otherwise.

Tensor names, per steered layer ``L`` (``d`` = hidden size, ``r`` = affine rank): ``layer.{L}.vector`` ``(d,)``
for every kind; affine adds ``layer.{L}.affine_left`` and ``layer.{L}.affine_right`` ``(r, d)`` (the map is
``h -> h + v + h (LᵀR)ᵀ``); clamp stores its coefficient in the spec (``clamp``). Adding a kind of steering
means teaching these two functions (and :func:`check_savable`) its parts.

Also here, shared by the loaders: :class:`SteeringFileError`, :func:`read_json` / :func:`parse_json` (every
failure a ``SteeringFileError``; metadata over :data:`MAX_METADATA_BYTES` or nested deeper than
:data:`MAX_METADATA_DEPTH` is refused, because such a document could be read but not written back) and
:func:`error_summary`.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import arch
from .parameterization import Steering
from .vector import SteeringVector

__all__ = [
    "KINDS",
    "MAX_METADATA_BYTES",
    "MAX_METADATA_DEPTH",
    "SteeringFileError",
    "additive_document",
    "check_savable",
    "check_spec",
    "error_summary",
    "json_depth",
    "parse_json",
    "read_json",
    "vector_from_tensors",
    "vector_to_tensors",
]

#: The kinds of steering a file can hold (``SteeringVector.kind``).
KINDS = ("additive", "clamp", "affine")
#: Largest metadata document (a JSON file, or the JSON in a safetensors header) a loader reads: 16 MiB.
MAX_METADATA_BYTES = 16 << 20
#: Deepest nesting of lists / objects in metadata (ours is at most ~6 deep); deeper documents are refused on
#: load and on save (Python's JSON writer recurses, so ~1,000 levels load but cannot be saved again).
MAX_METADATA_DEPTH = 64

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class SteeringFileError(ValueError):
    """A saved steering file or folder is missing, corrupt, unsafe or does not match its metadata."""


# ------------------------------------------------------------------------------------------- helpers


def error_summary(exc: BaseException, limit: int | None = 300) -> str:
    """The first line of ``str(exc)`` (or the exception's type name), cut to ``limit`` characters."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first if limit is None else first[:limit]


def json_depth(value: Any, limit: int = MAX_METADATA_DEPTH) -> int:
    """The nesting depth of lists / dicts in ``value`` (a scalar is 0), counted without recursion and stopping
    at ``limit + 1``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            depth += 1
            if depth > limit:
                return depth
            deepest = max(deepest, depth)
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose every failure is a :class:`SteeringFileError` naming ``where``; documents over
    :data:`MAX_METADATA_BYTES` or nested deeper than :data:`MAX_METADATA_DEPTH` are refused."""
    if len(text) > MAX_METADATA_BYTES:
        raise SteeringFileError(f"{where}: the metadata is {len(text):,} characters, over the limit of "
                                f"{MAX_METADATA_BYTES:,}; refusing to read it")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SteeringFileError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg} "
                                "(truncated or corrupted?)") from None
    except (ValueError, RecursionError) as exc:  # integers over Python's digit limit, absurd nesting
        raise SteeringFileError(f"{where}: unreadable JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if json_depth(doc) > MAX_METADATA_DEPTH:
        raise SteeringFileError(f"{where}: the metadata is nested more than {MAX_METADATA_DEPTH} levels deep; "
                                "refusing to read it")
    return doc


def read_json(path: Path) -> Any:
    """Read a UTF-8 JSON file; bad bytes, bad JSON, a file over :data:`MAX_METADATA_BYTES` or nested deeper than
    :data:`MAX_METADATA_DEPTH` are a :class:`SteeringFileError`, a missing file a ``FileNotFoundError``."""
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise SteeringFileError(f"{path}: {size:,} bytes, over the metadata limit of {MAX_METADATA_BYTES:,}; "
                                "refusing to read it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SteeringFileError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_json(text, str(path))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_name(layer: int, part: str) -> str:
    return f"layer.{layer}.{part}"


def _table(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for k, t in tensors.items()}


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with its own storage (safetensors refuses shared storage)."""
    return t.detach().to("cpu").clone().contiguous()


# ------------------------------------------------------------------------------------------- encode


def check_savable(vector: SteeringVector) -> None:
    """Refuse to write a vector that would not load back: non-int layers, non-float or non-finite values,
    a non-finite clamp coefficient, inconsistent affine factors.

    Raises:
        TypeError: ``vector`` is not a :class:`SteeringVector`.
        ValueError: naming the layer and the problem.
    """
    if not isinstance(vector, SteeringVector):
        raise TypeError(f"expected a SteeringVector, got {type(vector).__name__}")
    d = vector.hidden_size
    for layer, t in vector.layer_activations.items():
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer keys must be ints, got {layer!r}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"layer {layer}: the vector must be floating point, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"layer {layer}: the vector contains NaN or infinite values; refusing to save it")
    if vector.clamp is not None and not math.isfinite(float(vector.clamp)):
        raise ValueError(f"clamp coefficient must be finite, got {vector.clamp!r}")
    if vector.affine:
        ranks = set()
        for layer, (left, right) in vector.affine.items():
            if layer not in vector.layer_activations:
                raise ValueError(f"affine factors for layer {layer}, which has no vector")
            if left.dim() != 2 or left.shape != right.shape or left.shape[1] != d:
                raise ValueError(f"layer {layer}: affine factors must both be (r, {d}), got "
                                 f"{tuple(left.shape)} and {tuple(right.shape)}")
            if not (bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())):
                raise ValueError(f"layer {layer}: the affine factors contain NaN or infinite values")
            ranks.add(int(left.shape[0]))
        if len(ranks) != 1:
            raise ValueError(f"every layer's affine factors must have the same rank, got {sorted(ranks)}")


def vector_to_tensors(vector: SteeringVector) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Named tensors (contiguous CPU copies, dtypes kept) and the JSON-able spec of ``vector``.

    Call :func:`check_savable` first. The spec's keys, in order: ``site``, ``layers`` (sorted),
    ``hidden_size``, ``kind``, ``clamp`` (float or None), ``affine_rank`` (int or None), ``tensors``
    (name -> ``{"shape": [...], "dtype": "float32"}``).
    """
    tensors: dict[str, torch.Tensor] = {}
    if vector.custom is not None:  # a user parameterisation: its own named tensors and JSON config per layer
        for layer in vector.layers:
            for part, t in vector.custom[layer].tensors().items():
                tensors[_tensor_name(layer, part)] = _cpu_copy(t)
        return tensors, {"site": vector.layer_type, "layers": vector.layers, "hidden_size": vector.hidden_size,
                         "kind": vector.kind, "clamp": None, "affine_rank": None,
                         "config": {str(k): p.config() for k, p in vector.custom.items()}, "tensors": _table(tensors)}
    for layer in vector.layers:
        tensors[_tensor_name(layer, "vector")] = _cpu_copy(vector.layer_activations[layer])
        if vector.affine:
            if layer not in vector.affine:
                raise ValueError(f"affine steering vector has no affine factors for layer {layer}")
            left, right = vector.affine[layer]
            tensors[_tensor_name(layer, "affine_left")] = _cpu_copy(left)
            tensors[_tensor_name(layer, "affine_right")] = _cpu_copy(right)
    rank = int(next(iter(vector.affine.values()))[0].shape[0]) if vector.affine else None
    spec = {
        "site": vector.layer_type,
        "layers": vector.layers,
        "hidden_size": vector.hidden_size,
        "kind": vector.kind,
        "clamp": None if vector.clamp is None else float(vector.clamp),
        "affine_rank": rank,
        "tensors": _table(tensors),
    }
    return tensors, spec


# ------------------------------------------------------------------------------------------- decode


def check_spec(doc: Any, where: str) -> dict[str, Any]:
    """Check the fields of a spec read from a file (types, known site and kind, non-empty int layers) and
    return it; otherwise raise :class:`SteeringFileError` naming ``where``."""
    if not isinstance(doc, dict):
        raise SteeringFileError(f"{where}: the metadata is not a JSON object")
    for key, typ in (("site", str), ("layers", list), ("hidden_size", int), ("kind", str), ("tensors", dict)):
        if not isinstance(doc.get(key), typ):
            raise SteeringFileError(f"{where}: metadata field {key!r} is missing or not a {typ.__name__}")
    if doc["site"] not in arch.SITES:
        raise SteeringFileError(f"{where}: unknown site {doc['site']!r}; expected one of {arch.SITES}")
    if doc["kind"] not in KINDS and doc["kind"] not in Steering.registry:
        raise SteeringFileError(f"{where}: unknown kind {doc['kind']!r}; built in: {', '.join(KINDS)} (a custom "
                                "parameterisation loads once the module defining its Steering subclass is imported)")
    if not doc["layers"] or not all(isinstance(x, int) and not isinstance(x, bool) for x in doc["layers"]):
        raise SteeringFileError(f"{where}: 'layers' must be a non-empty list of ints, got {doc['layers']!r:.200}")
    if len(set(doc["layers"])) != len(doc["layers"]):
        counts: collections.Counter[int] = collections.Counter(doc["layers"])
        dup = sorted(x for x, n in counts.items() if n > 1)[:10]
        raise SteeringFileError(f"{where}: 'layers' names layer(s) {dup} more than once")
    return doc


def vector_from_tensors(doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str) -> SteeringVector:
    """The checked constructor: build a :class:`SteeringVector` from decoded tensors and their description.

    Args:
        doc: a spec as :func:`vector_to_tensors` writes it (the declared ``tensors`` table included), plus
            optionally ``metadata`` (the vector's metadata dict). Read from an untrusted file: every field is
            checked (:func:`check_spec`).
        tensors: name -> tensor, on any device; used as they are (not copied).
        where: the file or folder, for messages.

    Raises:
        SteeringFileError: bad spec; missing or unexpected tensors; a shape or dtype other than the spec's;
            a non-float dtype; NaN or infinite values; an invalid clamp coefficient or affine rank.
    """
    doc = check_spec(doc, where)
    d = doc["hidden_size"]
    layers = doc["layers"]
    kind = doc["kind"]
    if kind not in KINDS:
        return _custom_from_tensors(doc, tensors, where)
    rank = doc.get("affine_rank")
    if kind == "affine" and (not isinstance(rank, int) or rank < 1):
        raise SteeringFileError(f"{where}: affine vector without a valid 'affine_rank' ({rank!r})")
    r = int(rank) if isinstance(rank, int) else 0
    expected: dict[str, tuple[int, ...]] = {}
    for layer in layers:
        expected[_tensor_name(layer, "vector")] = (d,)
        if kind == "affine":
            expected[_tensor_name(layer, "affine_left")] = (r, d)
            expected[_tensor_name(layer, "affine_right")] = (r, d)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise SteeringFileError(f"{where}: tensors do not match the metadata (missing: {missing or 'none'}; "
                                f"unexpected: {extra or 'none'})")
    declared = doc["tensors"]
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise SteeringFileError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, the metadata says "
                                    f"{shape} (hidden_size {d}{f', affine_rank {rank}' if kind == 'affine' else ''})")
        info = declared.get(name)
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or info["shape"] != list(shape):
            raise SteeringFileError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, the metadata's tensor "
                                    f"table says {info.get('shape') if isinstance(info, dict) else None}")
        if _dtype_name(t.dtype) not in _FLOAT_DTYPES:
            raise SteeringFileError(f"{where}: tensor {name!r} has dtype {t.dtype}; expected a floating-point "
                                    f"dtype ({', '.join(_FLOAT_DTYPES)})")
        if info.get("dtype") != _dtype_name(t.dtype):
            raise SteeringFileError(f"{where}: tensor {name!r} has dtype {_dtype_name(t.dtype)}, the metadata "
                                    f"says {info.get('dtype')!r}")
        if not bool(torch.isfinite(t).all()):
            raise SteeringFileError(f"{where}: tensor {name!r} contains NaN or infinite values")
    clamp = doc.get("clamp")
    if kind == "clamp":
        if not isinstance(clamp, (int, float)) or isinstance(clamp, bool) or abs(clamp) > 1e300 \
                or not math.isfinite(clamp):
            raise SteeringFileError(f"{where}: clamp vector without a finite 'clamp' coefficient ({clamp!r})")
    elif clamp is not None:
        raise SteeringFileError(f"{where}: kind {kind!r} but a clamp coefficient is set")
    affine = None
    if kind == "affine":
        affine = {layer: (tensors[_tensor_name(layer, "affine_left")], tensors[_tensor_name(layer, "affine_right")])
                  for layer in layers}
    meta = doc.get("metadata")
    return SteeringVector(
        layer_activations={layer: tensors[_tensor_name(layer, "vector")] for layer in layers},
        layer_type=doc["site"],
        clamp=None if clamp is None else float(clamp),
        affine=affine,
        metadata=dict(meta) if isinstance(meta, dict) else {},
    )


def additive_document(
    layer_vectors: Mapping[int, torch.Tensor],
    where: str,
    *,
    metadata: Mapping[str, Any],
    site: str = "decoder_block",
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What an importer hands to :func:`vector_from_tensors`: the spec (with ``metadata``) and named tensors
    of an additive vector decoded from another format as ``{layer: vector (d,)}`` (layer order kept).
    ``metadata["model"]["hidden_size"]`` is set to ``d`` (the fingerprint every importer records).

    Raises:
        SteeringFileError: no layers, a tensor that is not 1-D, or vectors of different sizes.
    """
    if not layer_vectors:
        raise SteeringFileError(f"{where}: no layer tensors")
    for layer, t in layer_vectors.items():
        if t.dim() != 1:
            raise SteeringFileError(f"{where}: layer {layer}: expected a vector of shape (d,), got "
                                    f"{tuple(t.shape)}")
    sizes = sorted({int(t.shape[0]) for t in layer_vectors.values()})
    if len(sizes) != 1:
        raise SteeringFileError(f"{where}: the layers' vectors have different sizes {sizes}")
    tensors = {_tensor_name(layer, "vector"): t for layer, t in layer_vectors.items()}
    meta = dict(metadata)
    model = meta.get("model")
    meta["model"] = {**(model if isinstance(model, Mapping) else {}), "hidden_size": sizes[0]}
    doc = {"site": site, "layers": list(layer_vectors), "hidden_size": sizes[0], "kind": "additive", "clamp": None,
           "affine_rank": None, "tensors": _table(tensors), "metadata": meta}
    return doc, tensors


def _custom_from_tensors(doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str) -> SteeringVector:
    """:func:`vector_from_tensors` for a registered user parameterisation: every layer's tensors are
    ``layer.{L}.{part}`` as declared, ``vector`` among them with shape ``(d,)``; values finite."""
    cls = Steering.registry[doc["kind"]]
    declared, configs, d = doc["tensors"], doc.get("config"), doc["hidden_size"]
    if set(declared) != set(tensors):
        raise SteeringFileError(f"{where}: tensors do not match the metadata's table")
    if not isinstance(configs, dict):
        raise SteeringFileError(f"{where}: custom kind {doc['kind']!r} without a 'config' object")
    custom: dict[int, Steering] = {}
    for layer in doc["layers"]:
        prefix = _tensor_name(layer, "")
        parts = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        for part, t in parts.items():
            info = declared.get(prefix + part)
            if not isinstance(info, dict) or info.get("shape") != list(t.shape) or \
                    info.get("dtype") != _dtype_name(t.dtype) or _dtype_name(t.dtype) not in _FLOAT_DTYPES:
                raise SteeringFileError(f"{where}: tensor {prefix + part!r} does not match the metadata's table")
            if not bool(torch.isfinite(t).all()):
                raise SteeringFileError(f"{where}: tensor {prefix + part!r} contains NaN or infinite values")
        if tuple(parts.get("vector", torch.empty(0)).shape) != (d,):
            raise SteeringFileError(f"{where}: layer {layer} has no 'vector' tensor of shape ({d},)")
        cfg = configs.get(str(layer), {})
        try:
            custom[layer] = cls.from_state(parts, cfg if isinstance(cfg, dict) else {})
        except (KeyError, TypeError, ValueError) as exc:
            raise SteeringFileError(f"{where}: layer {layer}: cannot rebuild {cls.__name__}: {error_summary(exc)}") \
                from None
    meta = doc.get("metadata")
    return SteeringVector.from_steering(custom, layer_type=doc["site"], metadata=meta if isinstance(meta, dict) else {})
