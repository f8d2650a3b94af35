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
``allow_pickle=False``. Sizes are checked before anything is decompressed or allocated: the uncompressed sizes
of a ``.pt`` / ``.npz`` zip's entries and the shapes in each ``.npy`` header (read from the zip member without
extracting it), and the tensor infos of a GGUF file, must describe at most :data:`MAX_LAYERS` vectors of at most
:data:`MAX_HIDDEN_SIZE` values, so a small compressed file cannot expand to gigabytes. Two tensors naming the
same layer (``direction.1`` and ``direction.01``; ``layer_1`` and ``layer_01``) are refused. Every importer
translates the file into the native (spec, tensors) pair and ends in
the one checked constructor, :func:`steering_opt.codec.vector_from_tensors`. Every export is atomic
(:func:`steering_opt.fsutil.atomic_write_file`). Only additive vectors can be exported: these formats cannot
express clamp or affine steering (use :func:`steering_opt.persist.save`).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
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
from .fsutil import atomic_write_file, check_path
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
#: Largest hidden size an imported vector may have (the largest models have ~2**14; files declaring more are
#: refused before their data is read).
MAX_HIDDEN_SIZE = 1 << 18
#: Most layers (tensors) an imported file may hold.
MAX_LAYERS = 4096
#: Largest pickle (the object structure, not the tensor data) of a ``.pt`` file.
MAX_PICKLE_BYTES = 16 << 20


# ------------------------------------------------------------------------------------------- helpers


def _check_zip_sizes(path: Path, what: str) -> zipfile.ZipFile | None:
    """Open ``path`` as a zip (None if it is not one) after checking its directory: at most :data:`MAX_LAYERS`
    (+ a few) entries, none decompressing to more than a vector of :data:`MAX_HIDDEN_SIZE` float64 values (a
    ``.pt``'s pickle: :data:`MAX_PICKLE_BYTES`). Nothing is decompressed here."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        return None
    except (OSError, ValueError) as exc:
        raise SteeringFileError(f"{path}: not a readable {what} ({error_summary(exc)})") from None
    infos = zf.infolist()
    if len(infos) > MAX_LAYERS + 16:
        zf.close()
        raise SteeringFileError(f"{path}: {len(infos)} entries in the archive, more than the {MAX_LAYERS} layers "
                                "a steering vector can have")
    limit = MAX_HIDDEN_SIZE * 8 + 4096  # one (d,) float64 vector plus its .npy header
    for info in infos:
        cap = MAX_PICKLE_BYTES if info.filename.endswith(".pkl") else limit
        if info.file_size > cap:
            zf.close()
            raise SteeringFileError(f"{path}: archive entry {info.filename[:80]!r} expands to {info.file_size:,} "
                                    f"bytes ({info.compress_size:,} stored), more than a steering vector of at "
                                    f"most {MAX_HIDDEN_SIZE:,} values can need; refusing to read it (a tensor "
                                    "saved as a view of a larger one stores the whole: save a .clone())")
    return zf


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: the only way a ``.pt`` file is ever read, after its zip directory
    passed :func:`_check_zip_sizes` (so no entry can decompress to more than one vector's worth of bytes).
    Any failure on the file's bytes (refused globals, truncation, ``struct.error`` deep in the unpickler, ...)
    is a :class:`SteeringFileError`; a missing file stays ``FileNotFoundError``."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    zf = _check_zip_sizes(path, ".pt file")
    if zf is not None:
        zf.close()
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

    path = check_path(path)
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

    path = check_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors/etc. for bad files
        raise SteeringFileError(f"{path}: not a valid GGUF file (truncated or corrupted?): "
                                f"{error_summary(exc)}") from None
    acts: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    directions = [t for t in reader.tensors if t.name.startswith("direction.")]
    if len(directions) > MAX_LAYERS:
        raise SteeringFileError(f"{path}: {len(directions)} direction tensors, more than {MAX_LAYERS} layers")
    for t in directions:
        m = re.fullmatch(r"direction\.(\d{1,9})", t.name)
        if m is None:
            raise SteeringFileError(f"{path}: invalid tensor name {t.name[:80]!r} (expected direction.<layer>)")
        il = int(m.group(1))
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len([s for s in t.shape if s != 1]) > 1:
            raise SteeringFileError(f"{path}: tensor {t.name} must be a 1-D float32 tensor")
        if int(np.prod([int(s) for s in t.shape])) > MAX_HIDDEN_SIZE:
            raise SteeringFileError(f"{path}: tensor {t.name} declares {int(np.prod(t.shape)):,} values, more than "
                                    f"a hidden size can be ({MAX_HIDDEN_SIZE:,})")
        if il in names:
            raise SteeringFileError(f"{path}: tensors {names[il]!r} and {t.name!r} both name llama.cpp layer {il}")
        names[il] = t.name
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
    path = check_path(path)
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

    path = check_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tensor file at {str(path)!r}")
    acts: dict[int, torch.Tensor] = {}
    if path.suffix.lower() == ".npz":
        for key, arr in _read_npz(path).items():
            m = re.fullmatch(r"layer_(-?\d{1,9})", key)
            if m is None:
                raise SteeringFileError(f"{path}: unexpected array {key[:80]!r} (expected layer_<L>)")
            layer = int(m.group(1))
            if layer in acts:
                raise SteeringFileError(f"{path}: two arrays name layer {layer} ({key!r} and another spelling)")
            acts[layer] = torch.from_numpy(arr)
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


def _read_npz(path: Path) -> dict[str, Any]:
    """The arrays of an ``.npz`` file, read with ``allow_pickle=False`` after each member's ``.npy`` header
    (read from the zip stream, nothing else decompressed) declared a float vector of at most
    :data:`MAX_HIDDEN_SIZE` values, and the zip directory passed :func:`_check_zip_sizes`."""
    from numpy.lib import format as npy_format

    try:
        zf = _check_zip_sizes(path, ".npz file")
        if zf is None:
            raise SteeringFileError(f"{path}: not a readable .npz file of arrays (not a zip archive)")
        arrays: dict[str, Any] = {}
        with zf:
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                with zf.open(info) as f:
                    version = npy_format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise SteeringFileError(f"{path}: array {key[:80]!r} uses .npy format {version}; "
                                                "expected 1.0 or 2.0")
                    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else \
                        npy_format.read_array_header_2_0
                    shape, _fortran, dtype = read_header(f)
                    if dtype.kind != "f" or dtype.itemsize > 8 or len([s for s in shape if s != 1]) > 1 or \
                            math.prod(shape) > MAX_HIDDEN_SIZE:
                        raise SteeringFileError(f"{path}: not a readable .npz file of vectors: array {key[:80]!r} is "
                                                f"declared as {dtype} {shape}; "
                                                f"expected a float vector of at most {MAX_HIDDEN_SIZE:,} values")
                    arrays[key] = _read_rest(f, shape, dtype)
    except SteeringFileError:
        raise
    except Exception as exc:  # zipfile / numpy format errors
        raise SteeringFileError(f"{path}: not a readable .npz file of arrays ({error_summary(exc)})") from None
    return arrays


def _read_rest(f: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """The data of a ``.npy`` stream whose header was read: ``prod(shape)`` items of ``dtype``."""
    import numpy as np

    count = math.prod(shape)
    data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError("the array data is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))  # a native-order copy


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
    path = check_path(path)
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
