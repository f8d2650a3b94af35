"""Other libraries' steering-vector formats: export to them, import from them.

* **GGUF control vectors** (llama.cpp ``--control-vector``, as repeng's ``export_gguf`` writes them):
  :func:`export_gguf` / :func:`import_gguf`. Tensors ``direction.{il}`` (float32, ``(d,)``); keys
  ``general.architecture = "controlvector"``, ``controlvector.model_hint``, ``controlvector.layer_count``.
  Layer numbering: our ``decoder_block`` layer ``L`` is the residual stream *entering* block ``L``; llama.cpp
  adds ``direction.{il}`` to the *output* of block ``il`` (``llama_adapter_cvec::apply_to(ctx, cur, il)`` at
  the end of each layer; ``llama_control_vector_load_one`` rejects ``direction.0`` and the adapter never holds
  a tensor for layer 0). So ours ``L`` is llama.cpp's ``L - 1``, and only layers ``L >= 2`` can be exported.
* **Plain tensors**: :func:`export_tensors` / :func:`import_tensors`: a ``{layer: (d,)}`` dict in a ``.pt``
  file (steering-vectors' ``layer_activations``), ``.npz`` arrays ``layer_{L}``, or one ``.npy`` array.
* **Legacy** ``.json`` + ``.pt`` (``rotalabs_steer``'s ``SteeringVector.save``): :func:`import_legacy`.

Safety: a ``.pt`` file is only ever read by :func:`safe_torch_load` (``torch.load(weights_only=True)``, which
refuses any pickle that would construct arbitrary objects or run code); ``.npz`` files with
``allow_pickle=False``. Every importer translates the file into the native (spec, tensors) pair and ends in
the one checked constructor, :func:`steering_opt.codec.vector_from_tensors`. Every export is atomic
(:func:`steering_opt.fsutil.atomic_write_file`). Only additive vectors can be exported: these formats cannot
express clamp or affine steering (use :func:`steering_opt.persist.save`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import arch
from .codec import (
    SteeringFileError,
    additive_document,
    check_savable,
    error_summary,
    read_json,
    vector_from_tensors,
)
from .fsutil import atomic_write_file
from .vector import SteeringVector

__all__ = [
    "GGUF_ARCH",
    "LEGACY_SET_FILE",
    "export_gguf",
    "export_tensors",
    "import_gguf",
    "import_legacy",
    "import_tensors",
    "safe_torch_load",
]

#: ``general.architecture`` of a control-vector GGUF file (and the prefix of its keys).
GGUF_ARCH = "controlvector"
#: The manifest of a legacy vector-set folder.
LEGACY_SET_FILE = "metadata.json"
#: GGUF keys ``steering_opt.model.<key>`` of the model fingerprint (:func:`steering_opt.arch.model_fingerprint`).
GGUF_FINGERPRINT_PREFIX = "steering_opt.model."
GGUF_FINGERPRINT_KEYS = ("name_or_path", "model_type", "architecture", "hidden_size", "num_layers")


# ------------------------------------------------------------------------------------------- helpers


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: the only way a ``.pt`` file is ever read. Any failure on the
    file's bytes (refused globals, truncation, ``struct.error`` deep in the unpickler, ...) is a
    :class:`SteeringFileError`; a missing file stays ``FileNotFoundError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise SteeringFileError(f"{path}: refused to load: not a file that torch.load(weights_only=True) "
                                f"accepts ({type(exc).__name__}: {error_summary(exc)}). .pt files are never "
                                "unpickled with arbitrary code.") from None


def _exportable_layers(vector: SteeringVector, multiplier: float, what: str) -> dict[int, torch.Tensor]:
    """``{layer: multiplier * vector (d,)}`` as float32 CPU copies, after the checks every export shares."""
    if not isinstance(vector, SteeringVector):
        raise TypeError(f"{what}: expected a SteeringVector, got {type(vector).__name__}")
    if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool) or not math.isfinite(multiplier):
        raise TypeError(f"{what}: `multiplier` must be a finite number, got {multiplier!r}")
    return {layer: (vector.layer_activations[layer].detach().float().cpu() * float(multiplier)).clone()
            for layer in vector.layers}


# --------------------------------------------------------------------------------------------- GGUF


def export_gguf(
    vector: SteeringVector,
    path: str | os.PathLike[str],
    *,
    multiplier: float = 1.0,
    model_hint: str | None = None,
    model: torch.nn.Module | None = None,
) -> Path:
    """Write a llama.cpp control vector (``llama-cli --control-vector FILE``), atomically.

    Tensors ``direction.{il}`` (float32, 1-D) with ``il = L - 1`` for each of our layers ``L``: llama.cpp
    adds ``direction.{il}`` to the output of block ``il``, which is the input of our block ``L = il + 1``.
    llama.cpp never steers the output of block 0 (``direction.0`` is rejected), so layers 0 and 1 cannot be
    exported. Only additive ``decoder_block`` vectors can be expressed. Keys: ``general.architecture =
    "controlvector"``, ``controlvector.model_hint`` (the model type), ``controlvector.layer_count`` (as
    repeng's ``export_gguf`` writes them), and the model fingerprint as ``steering_opt.model.*`` keys
    (``name_or_path``, ``model_type``, ``architecture``, ``hidden_size``, ``num_layers``), which
    :func:`import_gguf` reads back so that loading the file for another model is refused
    (:func:`steering_opt.persist.check_compatible`); llama.cpp ignores them.

    Args:
        multiplier: scale baked into the exported directions (llama.cpp can scale again with
            ``--control-vector-scaled FILE S``).
        model_hint: overrides the model type recorded in the metadata.
        model: the model the vector is for; its fingerprint is recorded (default: the one in
            ``vector.metadata["model"]``, if any).

    Returns:
        ``path``.

    Raises:
        TypeError: not a SteeringVector, or a non-numeric / non-finite ``multiplier``.
        ValueError: a site, kind or layer llama.cpp cannot express; a path not ending in ``.gguf``.
    """
    import gguf
    import numpy as np

    layers = _exportable_layers(vector, multiplier, "export_gguf")
    if vector.layer_type != "decoder_block":
        raise ValueError(f"export_gguf: llama.cpp control vectors steer the residual stream between blocks; this "
                         f"vector steers the {vector.layer_type!r} site and cannot be exported")
    if vector.kind != "additive":
        raise ValueError(f"export_gguf: llama.cpp control vectors are additive; a {vector.kind} vector cannot be "
                         "exported")
    bad = [layer for layer in vector.layers if layer < 2]
    if bad:
        raise ValueError(f"export_gguf: layer(s) {bad} cannot be exported: our layer L (input of block L) is "
                         "llama.cpp's direction.{L-1} (output of block L-1), and llama.cpp steers only the outputs "
                         "of blocks 1..n-1 (layer 0 is the embedding output, layer 1 the output of block 0)")
    check_savable(vector)
    stored = vector.metadata.get("model")
    fp: Mapping[str, Any] = arch.model_fingerprint(model) if model is not None else \
        stored if isinstance(stored, Mapping) else {}
    hint = model_hint or fp.get("model_type") or "unknown"

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", str(hint))
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(layers))
        writer.add_string("steering_opt.layer_convention",
                          "direction.{il} = steering_opt decoder_block layer il+1 (output of block il)")
        for key in GGUF_FINGERPRINT_KEYS:
            value = fp.get(key)
            if isinstance(value, str) and value:
                writer.add_string(f"{GGUF_FINGERPRINT_PREFIX}{key}", value)
            elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
                writer.add_uint32(f"{GGUF_FINGERPRINT_PREFIX}{key}", value)
        for layer, t in layers.items():
            writer.add_tensor(f"direction.{layer - 1}", np.ascontiguousarray(t.numpy(), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"export_gguf: the output file should end in '.gguf', got {str(path)!r}")
    return atomic_write_file(path, write)


def import_gguf(path: str | os.PathLike[str]) -> SteeringVector:
    """Read a llama.cpp / repeng control-vector GGUF file: ``direction.{il}`` becomes our layer ``il + 1``
    (an additive ``decoder_block`` vector; ``metadata["model"]`` records the file's model hint).

    Raises:
        FileNotFoundError: no file at ``path``.
        SteeringFileError: not a valid GGUF file, or not a valid control vector.
    """
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors/etc. for bad files
        raise SteeringFileError(f"{path}: not a valid GGUF file (truncated or corrupted?): "
                                f"{error_summary(exc)}") from None
    acts: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            continue
        try:
            il = int(t.name.split(".", 1)[1])
        except ValueError:
            raise SteeringFileError(f"{path}: invalid tensor name {t.name!r} (expected direction.<layer>)") from None
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len([s for s in t.shape if s != 1]) > 1:
            raise SteeringFileError(f"{path}: tensor {t.name} must be a 1-D float32 tensor")
        acts[il + 1] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1).copy())
    if not acts:
        raise SteeringFileError(f"{path}: no direction.<layer> tensors (not a control vector)")
    hint = _gguf_value(reader, f"{GGUF_ARCH}.model_hint")
    model: dict[str, Any] = {"model_type": hint if isinstance(hint, str) else None}
    for key in GGUF_FINGERPRINT_KEYS:  # written by export_gguf; absent from other tools' files (e.g. repeng's)
        value = _gguf_value(reader, f"{GGUF_FINGERPRINT_PREFIX}{key}")
        if isinstance(value, (str, int)) and (value != "" or key != "name_or_path"):
            model[key] = value
    meta = {"method": "import_gguf", "imported_from": str(path.name), "model": model}
    return vector_from_tensors(*additive_document(acts, str(path), metadata=meta), str(path))


def _gguf_value(reader: Any, key: str) -> str | int | None:
    """A string or integer key of a GGUF file (None if absent or of another type)."""
    import gguf

    field = reader.get_field(key)
    if field is None or not len(field.parts) or not field.types:
        return None
    kind = field.types[0]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    if kind in (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT64,
                gguf.GGUFValueType.INT64):
        return int(field.parts[-1][0])
    return None


# ------------------------------------------------------------------------------------ plain tensors


def export_tensors(
    vector: SteeringVector,
    path: str | os.PathLike[str],
    *,
    multiplier: float = 1.0,
) -> Path:
    """Export an additive vector as plain tensors for other tools, atomically.

    * ``.pt``: ``torch.save({layer: tensor (d,)})`` — int keys, float32, CPU (loads with
      ``torch.load(path, weights_only=True)``; the ``layer_activations`` of steering-vectors' object).
    * ``.npz``: ``numpy.savez`` with arrays ``layer_{L}`` (loads with ``np.load(path)``, no pickle).
    * ``.npy``: one ``(d,)`` array; only for single-layer vectors.

    Layer numbers are ours (input of block ``L``). Clamp and affine vectors are refused: plain tensors
    cannot express them (use :func:`steering_opt.persist.save`).

    Returns:
        ``path``.

    Raises:
        TypeError: not a SteeringVector, or a non-numeric / non-finite ``multiplier``.
        ValueError: a clamp / affine vector, several layers for ``.npy``, another suffix.
    """
    import numpy as np

    tensors = _exportable_layers(vector, multiplier, "export_tensors")
    if vector.kind != "additive":
        raise ValueError(f"export_tensors: only additive vectors can be exported as plain tensors (this one is "
                         f"{vector.kind}); use steering_opt.save to keep its {vector.kind} parameters")
    check_savable(vector)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return atomic_write_file(path, lambda tmp: torch.save(tensors, tmp))
    if suffix == ".npz":
        arrays = {f"layer_{layer}": t.numpy() for layer, t in tensors.items()}

        def write_npz(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle

        return atomic_write_file(path, write_npz)
    if suffix == ".npy":
        if len(tensors) != 1:
            raise ValueError(f"export_tensors: a .npy file holds one array, but this vector has {len(tensors)} "
                             f"layers {vector.layers}; use .npz or .pt")
        arr = next(iter(tensors.values())).numpy()

        def write_npy(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.save(f, arr, allow_pickle=False)

        return atomic_write_file(path, write_npy)
    raise ValueError(f"export_tensors: unknown file type {path.suffix!r} for {str(path)!r}; use .pt, .npz or .npy")


def import_tensors(path: str | os.PathLike[str]) -> SteeringVector:
    """Read what :func:`export_tensors` writes (an additive ``decoder_block`` vector, layers as stored).

    * ``.pt``: a ``{layer (int): tensor (d,)}`` dict, read with :func:`safe_torch_load` only (also the
      ``layer_activations`` of steering-vectors' objects saved with ``torch.save``).
    * ``.npz``: arrays named ``layer_{L}``, read with ``allow_pickle=False``.

    Raises:
        FileNotFoundError: no file at ``path``.
        SteeringFileError: unreadable, unsafe, or not a ``{layer: finite float vector (d,)}`` mapping.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tensor file at {str(path)!r}")
    acts: dict[int, torch.Tensor] = {}
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: np.array(npz[k]) for k in npz.files}
        except Exception as exc:  # zipfile / numpy format errors, and refused pickled object arrays
            raise SteeringFileError(f"{path}: not a readable .npz file of arrays ({error_summary(exc)})") from None
        for key, arr in arrays.items():
            m = re.fullmatch(r"layer_(-?\d{1,9})", key)
            if m is None:
                raise SteeringFileError(f"{path}: unexpected array {key!r} (expected layer_<L>)")
            acts[int(m.group(1))] = torch.from_numpy(arr)
    else:
        obj = safe_torch_load(path)
        if not isinstance(obj, dict) or not obj:
            raise SteeringFileError(f"{path}: expected a non-empty {{layer: tensor}} dict, found "
                                    f"{type(obj).__name__}")
        for key, t in obj.items():
            if isinstance(key, bool) or not isinstance(key, int) or not isinstance(t, torch.Tensor):
                raise SteeringFileError(f"{path}: expected {{int layer: tensor}} entries, found {key!r}: "
                                        f"{type(t).__name__}")
            acts[key] = t
    meta = {"method": "import_tensors", "imported_from": path.name, "model": {}}
    layer_vectors = {k: acts[k].clone() for k in sorted(acts)}
    return vector_from_tensors(*additive_document(layer_vectors, str(path), metadata=meta), str(path))


# ------------------------------------------------------------------------------------------- legacy


def _legacy_one(meta_path: Path, pt_path: Path) -> tuple[int, torch.Tensor, dict[str, Any]]:
    """One legacy ``name.json`` + ``name.pt`` pair: ``(layer_index, vector (d,), json document)``."""
    doc = read_json(meta_path)
    if not isinstance(doc, dict) or not isinstance(doc.get("layer_index"), int):
        raise SteeringFileError(f"{meta_path}: not a legacy steering-vector metadata file (no integer "
                                "'layer_index')")
    if not pt_path.is_file():
        raise FileNotFoundError(f"{pt_path}: the tensor file of {meta_path} is missing")
    t = safe_torch_load(pt_path)
    if not isinstance(t, torch.Tensor):
        raise SteeringFileError(f"{pt_path}: expected a single tensor, found a {type(t).__name__}")
    shape = doc.get("vector_shape")
    if shape is not None and (not isinstance(shape, list) or list(t.shape) != shape):
        raise SteeringFileError(f"{pt_path}: tensor shape {list(t.shape)} does not match vector_shape {shape} "
                                f"in {meta_path.name}")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise SteeringFileError(f"{pt_path}: expected a vector of shape (d,), got {tuple(t.shape)}")
    return doc["layer_index"], t.clone(), doc


def import_legacy(path: str | os.PathLike[str]) -> SteeringVector:
    """Import the seed-001 (``rotalabs_steer``) layout: ``name.json`` + ``name.pt``, or a set folder with
    ``metadata.json`` and ``layer_{i}.json``/``.pt`` files (becomes one multi-layer vector).

    Tensors are read with ``torch.load(weights_only=True)`` only. Layer convention: the legacy
    ``layer_index`` ``i`` steers the *output* of block ``i`` (a forward hook), which is the residual
    stream *entering* block ``i + 1``: the imported vector steers ``decoder_block`` layer ``i + 1``
    (the original index is kept as ``metadata["legacy_layer_index"]``).

    Raises:
        FileNotFoundError: a metadata or tensor file is missing.
        SteeringFileError: unreadable, unsafe or inconsistent files.
    """
    path = Path(path)
    pairs: list[tuple[Path, Path]] = []
    set_doc: dict[str, Any] = {}
    if path.is_dir():
        set_path = path / LEGACY_SET_FILE
        doc = read_json(set_path)
        if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list) or not doc["layers"]:
            raise SteeringFileError(f"{set_path}: not a legacy vector-set manifest (no 'layers' list)")
        set_doc = doc
        for layer in doc["layers"]:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise SteeringFileError(f"{set_path}: layer {layer!r} is not an int")
            pairs.append((path / f"layer_{layer}.json", path / f"layer_{layer}.pt"))
    else:
        stem = path.with_suffix("") if path.suffix.lower() in (".json", ".pt", ".pth") else path
        pt = path if path.suffix.lower() in (".pt", ".pth") else stem.with_suffix(".pt")
        pairs.append((stem.with_suffix(".json"), pt))
    acts: dict[int, torch.Tensor] = {}
    legacy_layers: list[int] = []
    first: dict[str, Any] = {}
    for meta_path, pt_path in pairs:
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: legacy metadata file is missing")
        layer, t, doc = _legacy_one(meta_path, pt_path)
        first = first or doc
        if layer < 0:
            raise SteeringFileError(f"{meta_path}: negative layer_index {layer} cannot be converted without "
                                    "the model; re-save it with a non-negative index")
        if layer + 1 in acts:
            raise SteeringFileError(f"{meta_path}: layer_index {layer} appears twice")
        acts[layer + 1] = t
        legacy_layers.append(layer)
    meta: dict[str, Any] = {
        "method": first.get("extraction_method", "caa"),
        "behavior": set_doc.get("behavior", first.get("behavior")),
        "model": {"name_or_path": set_doc.get("model_name", first.get("model_name"))},
        "legacy_layer_index": legacy_layers if len(legacy_layers) > 1 else legacy_layers[0],
        "imported_from": "legacy .json + .pt (rotalabs_steer layout; layer_index = output of block i)",
    }
    if isinstance(first.get("metadata"), dict):
        meta["legacy_metadata"] = first["metadata"]
        if "created_at" in first["metadata"]:
            meta["created_at"] = first["metadata"]["created_at"]
    return vector_from_tensors(*additive_document(acts, str(path), metadata=meta), str(path))
