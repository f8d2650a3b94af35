"""The native steering-vector format: save, load, inspect, and check a vector against a model.

Format (``format_version`` 1). A :class:`~steering_opt.vector.SteeringVector` saves as either

* a **folder** (the default)::

      my_vector/
        steering_vector.json          # metadata (below); authoritative
        steering_vector.safetensors   # the tensors

* or a **single file** (a path ending in ``.safetensors``): the same tensors, with the same metadata
  JSON stored in the safetensors header under the key ``"steering_opt"``.

Tensors and the structural fields of the metadata (``site``, ``layers``, ``hidden_size``, ``kind``,
``clamp``, ``affine_rank``, ``tensors``) are what :func:`steering_opt.codec.vector_to_tensors` produces (tensor
names ``layer.{L}.vector`` ``(d,)``, plus ``layer.{L}.affine_left`` / ``affine_right`` ``(r, d)`` for affine
vectors; dtypes kept, float32 from the optimiser), and loading ends in its inverse, the checked constructor
:func:`steering_opt.codec.vector_from_tensors`.

Metadata JSON: ``format`` (``"steering_opt.vector"``), ``format_version``, ``site`` (the ``layer_type``),
``layers``, ``hidden_size``, ``kind`` (``additive`` / ``clamp`` / ``affine``), ``clamp`` (the clamp
coefficient or null), ``affine_rank``, ``tensors`` (name -> shape and dtype), ``sha256`` of the
safetensors file (folder form), and ``metadata``: the vector's own metadata dict, enriched on save with
``library_version``, ``created_at`` (UTC, ISO 8601), ``saved_at``, ``model`` (name/path and fingerprint:
``model_type``, ``architecture``, ``hidden_size``, ``num_layers``) and whatever the producer recorded
(``method``, ``hyperparameters``, ``datapoints`` summary, ``iters``, ``final_loss``, ``loss_units`` = nats).

A **named set** (``{name: SteeringVector}``, e.g. for ``MultiVectorInjector``) saves as one folder with a
``steering_set.json`` manifest and one vector folder per name.

Safety:

* Loading never unpickles: tensors are read with ``safetensors``; other formats are read by
  :mod:`steering_opt.interop` (``.pt`` files only with ``torch.load(weights_only=True)``).
* Writes are atomic (:mod:`steering_opt.fsutil`): everything is written to a temporary sibling and renamed
  into place as the last step, so an interrupted save leaves either the old save or nothing, never a file
  that loads. Temporaries of killed writers are deleted by the next save next to them; a folder whose
  replacement was killed between its two renames is put back by the next load or save. A full disk or any
  other file-system failure is an ``OSError`` naming the path. An existing ``.safetensors`` file that is not a
  steering_opt save is replaced only with ``overwrite=True``; paths that are not valid UTF-8 are refused.
* Metadata over 16 MiB or nested more than 64 levels deep is refused (on load and on save); a set manifest
  may not name a member or a folder twice.
* Loading checks the format version, the file checksum (folder form), tensor names, shapes and dtypes
  against the metadata, and that every value is finite. With ``model=...`` it also checks the model
  fingerprint (:func:`check_compatible`): a vector for another hidden size is always refused; another
  architecture / layer count is refused unless ``allow_mismatch=True``.

Other libraries' formats (GGUF control vectors, plain ``.pt`` / ``.npy`` / ``.npz`` tensors, the legacy
``.json`` + ``.pt`` layout) live in :mod:`steering_opt.interop`; :func:`load` recognises them, and their
functions are re-exported here for compatibility.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import arch, validate
from .codec import (
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    SteeringFileError,
    check_savable,
    check_spec,
    error_summary,
    parse_json,
    read_json,
    vector_from_tensors,
    vector_to_tensors,
)
from .data import datapoints_sha256, describe_datapoints
from .fsutil import (
    atomic_write_dir,
    atomic_write_file,
    check_path,
    fsync_file,
    recover_replaced,
    sha256_file,
    write_text_synced,
)
from .interop import (
    GGUF_ARCH,
    LEGACY_SET_FILE,
    export_gguf,
    export_tensors,
    import_gguf,
    import_legacy,
    import_tensors,
)
from .vector import SteeringVector

__all__ = [
    "FORMAT_VERSION",
    "GGUF_ARCH",
    "SET_FILE",
    "TENSORS_FILE",
    "VECTOR_FILE",
    "SteeringFileError",
    "atomic_write_file",
    "check_compatible",
    "check_save_target",
    "datapoints_sha256",
    "describe",
    "describe_datapoints",
    "export_gguf",
    "export_tensors",
    "import_gguf",
    "import_legacy",
    "import_tensors",
    "load",
    "load_vector",
    "read_metadata",
    "save",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
VECTOR_FORMAT = "steering_opt.vector"
SET_FORMAT = "steering_opt.vector_set"
VECTOR_FILE = "steering_vector.json"
TENSORS_FILE = "steering_vector.safetensors"
SET_FILE = "steering_set.json"
HEADER_KEY = "steering_opt"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


# ------------------------------------------------------------------------------------------- helpers

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _library_version() -> str:
    from . import __version__

    return __version__


def _jsonable(value: Any, where: str, depth: int = 0) -> Any:
    """A JSON-safe copy of ``value``: tuples become lists, non-finite floats strings, tensors refused; nesting
    deeper than :data:`~steering_opt.codec.MAX_METADATA_DEPTH` refused."""
    if depth > MAX_METADATA_DEPTH:
        raise ValueError(f"metadata value {where[:200]} is nested more than {MAX_METADATA_DEPTH} levels deep; "
                         "flatten it (deeper metadata cannot be read back)")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item(), where)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r:.40}]", depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    import numpy as np  # a dependency; imported here to keep `import steering_opt.persist` light

    if isinstance(value, np.generic):  # numpy scalars
        return _jsonable(value.item(), where)
    raise TypeError(f"metadata value {where} of type {type(value).__name__} is not JSON-serialisable; "
                    "store numbers, strings, lists or dicts in SteeringVector.metadata")


def _is_our_save(path: Path) -> bool:
    if path.is_dir():
        return (path / VECTOR_FILE).is_file() or (path / SET_FILE).is_file()
    return False


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, read without its tensors (None if it is not one, or the header
    is over :data:`~steering_opt.codec.MAX_METADATA_BYTES`)."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= MAX_METADATA_BYTES:
                return None
            doc = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _is_steering_file(path: Path) -> bool:
    header = _safetensors_header(path)
    meta = header.get("__metadata__") if header is not None else None
    return isinstance(meta, dict) and HEADER_KEY in meta


def check_save_target(path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Raise FileExistsError if :func:`save` would refuse to write ``path`` (checked before expensive work).

    A folder path may be new, an empty folder or an earlier steering_opt save; a ``.safetensors`` path
    must not be a folder, and an existing file there must be a steering_opt save unless ``overwrite``.
    """
    target = check_path(path)
    if target.suffix == ".safetensors":
        if target.is_dir():
            raise FileExistsError(f"cannot save to {str(target)!r}: it is a folder")
        if target.exists() and not overwrite and not _is_steering_file(target):
            raise FileExistsError(f"cannot save to {str(target)!r}: the file exists and is not a steering_opt "
                                  "save (e.g. model weights); choose another path, or pass overwrite=True to "
                                  "replace it")
        return
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"cannot save to {str(target)!r}: it exists and is a file, not a folder")
        if not _is_our_save(target) and any(target.iterdir()):
            raise FileExistsError(f"cannot save to {str(target)!r}: the folder exists, is not empty and is not "
                                  "a steering_opt save; choose another path or remove it")


def _save_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a save folder in a temporary sibling and rename it onto ``target`` (:func:`atomic_write_dir`).

    An existing ``target`` is replaced only if it is a steering_opt save or an empty folder, and never if it
    is (or contains) the current working folder.
    """
    target = Path(os.path.abspath(target))  # "." or "x/.." must name a real parent for the final rename
    check_save_target(target)
    cwd = Path.cwd().resolve()
    if target.exists() and (cwd == target.resolve() or target.resolve() in cwd.parents):
        raise ValueError(f"cannot save to {str(target)!r}: it is (or contains) the current working folder, which "
                         "a save replaces as a whole; save to a sub-folder instead")
    return atomic_write_dir(target, build)


# ------------------------------------------------------------------------------------------- metadata


def _fingerprint_of(model: nn.Module | None, vector: SteeringVector) -> dict[str, Any]:
    if model is not None:
        return _jsonable(arch.model_fingerprint(model), "model")
    stored = vector.metadata.get("model")
    if isinstance(stored, Mapping):
        return _jsonable(dict(stored), "model")
    return {"hidden_size": vector.hidden_size}


def _document(vector: SteeringVector, model: nn.Module | None,
              extra: Mapping[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the metadata document of a save (without ``sha256``); see the module docstring."""
    tensors, spec = vector_to_tensors(vector)
    meta = _jsonable(dict(vector.metadata), "metadata")
    if extra:
        meta.update(_jsonable(dict(extra), "metadata"))
    meta["model"] = _fingerprint_of(model, vector)
    meta["library_version"] = _library_version()
    now = _now()
    meta.setdefault("created_at", now)
    meta["saved_at"] = now
    loss = meta.get("loss")
    if "final_loss" not in meta and isinstance(loss, (int, float)) and not isinstance(loss, bool):
        meta["final_loss"] = float(loss)
    if "final_loss" in meta:
        meta.setdefault("loss_units", "nats")
    return tensors, {"format": VECTOR_FORMAT, "format_version": FORMAT_VERSION, **spec, "metadata": meta}


# ------------------------------------------------------------------------------------------------ save


def _write_vector_folder(folder: Path, vector: SteeringVector, model: nn.Module | None,
                         extra: Mapping[str, Any] | None) -> None:
    from safetensors.torch import save_file

    tensors, doc = _document(vector, model, extra)
    tpath = folder / TENSORS_FILE
    save_file(tensors, str(tpath), metadata={"format": VECTOR_FORMAT})
    fsync_file(tpath)
    doc["sha256"] = sha256_file(tpath)
    write_text_synced(folder / VECTOR_FILE, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def save(
    obj: SteeringVector | Mapping[str, SteeringVector],
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
    datapoints: Sequence[Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a steering vector (or a ``{name: SteeringVector}`` set) atomically.

    The saved metadata is the vector's own (for an optimised vector: ``method``, ``options``, ``iters``,
    ``status``, ``loss``), plus ``final_loss`` / ``loss_units``, ``model`` (the fingerprint of ``model``, or
    the one the vector records), ``datapoints`` (with ``datapoints=``), ``library_version``, ``created_at``
    and ``saved_at``: the same entries ``steering-opt optimize`` records.

    Args:
        obj: a :class:`SteeringVector`, or a dict of them (saved as one set folder).
        path: a folder (created or replaced), or for a single vector a file ending in ``.safetensors``.
            An existing path is replaced only if it is a steering_opt save (or an empty folder).
        model: the model the vector was made for; its fingerprint is recorded (otherwise the one in
            ``vector.metadata["model"]``, if any).
        metadata: extra JSON-able entries merged into the saved metadata (e.g. ``hyperparameters``).
        datapoints: the training datapoints (or contrast pairs); recorded as :func:`describe_datapoints`
            (count, sha256 of the contents, first prompts), not in full.
        overwrite: replace an existing ``.safetensors`` file even if it is not a steering_opt save (folders
            that are not steering_opt saves are never replaced).

    Returns:
        The path written.

    Raises:
        TypeError: ``obj`` is not a SteeringVector or a dict of them; metadata is not JSON-able.
        ValueError: non-finite values, inconsistent affine factors, bad set names, metadata nested more than
            64 levels, a path that is not valid UTF-8.
        FileExistsError: ``path`` exists and is not a steering_opt save.
        OSError: the file system failed (e.g. the disk is full), naming the path; the previous save is kept.
    """
    path = check_path(path, "path")
    if not isinstance(overwrite, bool):
        raise TypeError(f"save(): `overwrite` must be a bool, got {overwrite!r:.60}")
    if datapoints is not None:
        if isinstance(datapoints, (str, bytes)) or not isinstance(datapoints, Sequence):
            raise TypeError(f"save(): `datapoints` must be a list of datapoints or contrast pairs, got "
                            f"{type(datapoints).__name__}")
        metadata = {**(metadata or {}), "datapoints": describe_datapoints(datapoints)}
    if isinstance(obj, Mapping):
        return _save_set(obj, path, model=model, metadata=metadata)
    check_savable(obj)
    if path.suffix == ".safetensors":
        return _save_single_file(obj, path, model=model, metadata=metadata, overwrite=overwrite)
    if path.suffix in (".pt", ".pth", ".bin", ".gguf", ".npy", ".npz", ".json"):
        raise ValueError(f"save(): {str(path)!r} has the suffix {path.suffix!r}; pass a folder or a "
                         "'.safetensors' file (use export_gguf / export_tensors for other formats)")
    return _save_dir(path, lambda tmp: _write_vector_folder(tmp, obj, model, metadata))


def _save_single_file(vector: SteeringVector, path: Path, *, model: nn.Module | None,
                      metadata: Mapping[str, Any] | None, overwrite: bool) -> Path:
    from safetensors.torch import save_file

    check_save_target(path, overwrite=overwrite)
    tensors, doc = _document(vector, model, metadata)
    header = {HEADER_KEY: json.dumps(doc, allow_nan=False)}
    return atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def _folder_name(name: str, index: int, used: set[str]) -> str:
    folder = name if _SAFE_NAME.match(name) and name not in (".", "..") else f"vector_{index}"
    while folder.lower() in used or folder == SET_FILE:
        folder = f"{folder}_{index}"
    used.add(folder.lower())
    return folder


def _save_set(vectors: Mapping[str, SteeringVector], path: Path, *, model: nn.Module | None,
              metadata: Mapping[str, Any] | None) -> Path:
    if not vectors:
        raise ValueError("save(): the vector set is empty; pass at least one {name: SteeringVector}")
    for name, vec in vectors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"save(): set names must be non-empty strings, got {name!r}")
        if not isinstance(vec, SteeringVector):
            raise TypeError(f"save(): set entry {name!r} is a {type(vec).__name__}, not a SteeringVector")
        check_savable(vec)
    if path.suffix:
        if path.suffix == ".safetensors":
            raise ValueError(f"save(): a named set saves as a folder, not a single file ({str(path)!r})")

    def build(tmp: Path) -> None:
        used: set[str] = set()
        entries = []
        for i, (name, vec) in enumerate(vectors.items()):
            folder = _folder_name(name, i, used)
            (tmp / folder).mkdir()
            _write_vector_folder(tmp / folder, vec, model, metadata)
            entries.append({"name": name, "path": folder})
        doc = {"format": SET_FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
               "saved_at": _now(), "vectors": entries}
        write_text_synced(tmp / SET_FILE, json.dumps(doc, indent=2) + "\n")

    return _save_dir(path, build)


# ------------------------------------------------------------------------------------------------ load


def _check_doc(doc: Any, where: str) -> dict[str, Any]:
    """The native framing (``format``, ``format_version``), then the spec fields (:func:`check_spec`), checked
    before any tensor is read."""
    if not isinstance(doc, dict) or doc.get("format") != VECTOR_FORMAT:
        raise SteeringFileError(f"{where}: not a steering_opt vector (missing format {VECTOR_FORMAT!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise SteeringFileError(f"{where}: format_version {version!r} is not supported by steering_opt "
                                f"{_library_version()} (supports 1..{FORMAT_VERSION}); upgrade steering_opt")
    return check_spec(doc, where)


def _load_safetensors(path: Path, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise SteeringFileError(f"{path}: unreadable ({error_summary(exc)})") from None
    if n > MAX_METADATA_BYTES:
        raise SteeringFileError(f"{path}: not a valid safetensors file of a steering vector: its header would be "
                                f"{n:,} bytes, over the limit of {MAX_METADATA_BYTES:,}; refusing to read it")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError subclasses for bad files
        raise SteeringFileError(f"{path}: not a valid safetensors file (truncated or corrupted?): "
                                f"{error_summary(exc, limit=None)}") from None
    return tensors, header


def _load_vector_folder(folder: Path, device: str | torch.device) -> SteeringVector:
    meta_path, tpath = folder / VECTOR_FILE, folder / TENSORS_FILE
    doc = _check_doc(read_json(meta_path), str(meta_path))
    if not tpath.is_file():
        raise SteeringFileError(f"{folder}: {TENSORS_FILE} is missing")
    sha = doc.get("sha256")
    if not isinstance(sha, str) or sha256_file(tpath) != sha:
        raise SteeringFileError(f"{tpath}: the file does not match the checksum in {VECTOR_FILE} "
                                "(truncated, corrupted or modified after saving)")
    tensors, _ = _load_safetensors(tpath, device)
    return vector_from_tensors(doc, tensors, str(folder))


def _load_single_file(path: Path, device: str | torch.device) -> SteeringVector:
    tensors, header = _load_safetensors(path, device)
    raw = header.get(HEADER_KEY)
    if raw is None:
        raise SteeringFileError(f"{path}: a safetensors file without steering_opt metadata (no {HEADER_KEY!r} "
                                "key in its header); it was not written by steering_opt.save")
    doc = parse_json(raw, f"{path}: the metadata in the header")
    return vector_from_tensors(_check_doc(doc, str(path)), tensors, str(path))


def _load_set(folder: Path, device: str | torch.device) -> dict[str, SteeringVector]:
    doc = read_json(folder / SET_FILE)
    if not isinstance(doc, dict) or doc.get("format") != SET_FORMAT or not isinstance(doc.get("vectors"), list):
        raise SteeringFileError(f"{folder / SET_FILE}: not a steering_opt vector-set manifest")
    version = doc.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise SteeringFileError(f"{folder / SET_FILE}: format_version {version!r} is not supported")
    out: dict[str, SteeringVector] = {}
    seen_paths: set[str] = set()
    for entry in doc["vectors"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                not isinstance(entry.get("path"), str):
            raise SteeringFileError(f"{folder / SET_FILE}: bad entry {entry!r}")
        name = entry["path"]
        if entry["name"] in out or name in seen_paths:
            which = f"name {entry['name'][:80]!r}" if entry["name"] in out else f"folder {name[:80]!r}"
            raise SteeringFileError(f"{folder / SET_FILE}: the manifest lists the {which} more than once")
        seen_paths.add(name)
        if len(name) > 255 or "\x00" in name:  # the OS would raise ValueError / OSError on these
            raise SteeringFileError(f"{folder / SET_FILE}: entry {entry['name']!r} has an invalid folder name "
                                    f"{name[:80]!r}")
        sub = (folder / name).resolve()
        if sub.parent != folder.resolve():  # never follow a manifest outside the set folder
            raise SteeringFileError(f"{folder / SET_FILE}: entry {entry['name']!r} points outside the folder")
        out[entry["name"]] = _load_vector_folder(sub, device)
    if not out:
        raise SteeringFileError(f"{folder / SET_FILE}: the set lists no vectors")
    return out


def load(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    allow_mismatch: bool = False,
    device: str | torch.device = "cpu",
) -> SteeringVector | dict[str, SteeringVector]:
    """Load what :func:`save` wrote (or import a legacy / GGUF file); never unpickles.

    Recognised paths: a vector folder (``steering_vector.json``), a set folder (``steering_set.json``,
    returns ``{name: SteeringVector}``), a ``.safetensors`` single file, a llama.cpp ``.gguf`` control
    vector (:func:`import_gguf`), the legacy ``.json`` + ``.pt`` layout (:func:`import_legacy`) and a plain
    ``{layer: tensor}`` ``.pt`` / ``.npz`` file (:func:`import_tensors`).

    Args:
        model: if given, every vector is checked against it (:func:`check_compatible`).
        allow_mismatch: accept a model whose architecture / layer count differs from the one recorded
            (the hidden size must still match).
        device: where to put the tensors.

    Raises:
        FileNotFoundError: nothing at ``path``.
        SteeringFileError (a ValueError): corrupt, truncated, unsafe or inconsistent files.
        ValueError: the model is incompatible (including values that overflow the model's dtype); a path
            that is not valid UTF-8.
    """
    path = check_path(path, "path")
    if not os.path.lexists(path):
        recover_replaced(path)  # a save killed between the two renames of a folder replacement: put it back
    result: SteeringVector | dict[str, SteeringVector]
    if path.is_dir():
        if (path / SET_FILE).is_file():
            result = _load_set(path, device)
        elif (path / VECTOR_FILE).is_file():
            result = _load_vector_folder(path, device)
        elif (path / LEGACY_SET_FILE).is_file():
            result = import_legacy(path)
        else:
            raise SteeringFileError(f"{path}: not a steering_opt save (no {VECTOR_FILE} or {SET_FILE} in the "
                                    "folder)")
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            result = _load_single_file(path, device)
        elif suffix == ".gguf":
            result = import_gguf(path)
        elif suffix == ".json" or (suffix in (".pt", ".pth") and path.with_suffix(".json").is_file()):
            result = import_legacy(path)
        elif suffix in (".pt", ".pth", ".npz"):
            result = import_tensors(path)
        else:
            raise SteeringFileError(f"{path}: unknown file type {path.suffix!r}; expected a steering_opt folder, "
                                    "a .safetensors file, a .gguf control vector, a .pt/.npz tensor dict or a "
                                    "legacy .json/.pt pair")
    elif path.with_suffix(".json").is_file() and path.with_suffix(".pt").is_file():
        result = import_legacy(path)
    else:
        raise FileNotFoundError(f"no steering vector at {str(path)!r} (no such file or folder)")
    if not isinstance(result, dict):
        result = result.to(device)
    else:
        result = {k: v.to(device) for k, v in result.items()}
    if model is not None:
        for name, vec in (result.items() if isinstance(result, dict) else [(None, result)]):
            where = f"{path}" if name is None else f"{path} [{name}]"
            check_compatible(vec, model, allow_mismatch=allow_mismatch, source=where)
    return result


def load_vector(path: str | os.PathLike[str], **kwargs: Any) -> SteeringVector:
    """:func:`load`, but the result must be a single vector (not a named set)."""
    result = load(path, **kwargs)
    if isinstance(result, dict):
        names = ", ".join(map(repr, result))
        raise SteeringFileError(f"{path} is a set of {len(result)} named vectors ({names}), not one vector; use "
                                f"steering_opt.load(), or pass one member's folder")
    return result


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata document of a saved vector (folder or single file) or set manifest, without tensors."""
    path = check_path(path, "path")
    if not os.path.lexists(path):
        recover_replaced(path)
    if path.is_dir():
        for name in (SET_FILE, VECTOR_FILE):
            if (path / name).is_file():
                doc = read_json(path / name)
                if not isinstance(doc, dict):
                    raise SteeringFileError(f"{path / name}: expected a JSON object, found {type(doc).__name__}")
                return doc
        raise SteeringFileError(f"{path}: not a steering_opt save (no {VECTOR_FILE} or {SET_FILE})")
    if path.is_file() and path.suffix == ".safetensors":
        _, header = _load_safetensors(path, "cpu")
        if HEADER_KEY not in header:
            raise SteeringFileError(f"{path}: no steering_opt metadata in the safetensors header")
        doc = parse_json(header[HEADER_KEY], f"{path}: the metadata in the header")
        if not isinstance(doc, dict):
            raise SteeringFileError(f"{path}: the header metadata is not a JSON object")
        return doc
    if not path.exists():
        raise FileNotFoundError(f"no steering vector at {str(path)!r} (no such file or folder)")
    raise SteeringFileError(f"{path}: not a steering_opt save")


def describe(vector: SteeringVector, indent: str = "") -> list[str]:
    """A readable description of ``vector``, one line per item (``steering-opt info``): kind, site, layers and
    norms, then what its metadata records (model, method, iterations, final loss, hyper-parameters, datapoints,
    creation time and library version); each line starts with ``indent``."""
    m = vector.metadata
    norms = ", ".join(f"{k}: {float(v.norm()):.4g}" for k, v in sorted(vector.layer_activations.items()))
    lines = [f"{indent}kind: {vector.kind}" + (f" (clamp {vector.clamp:g})" if vector.clamp is not None else "")
             + (f" (rank {next(iter(vector.affine.values()))[0].shape[0]})" if vector.affine else ""),
             f"{indent}site: {vector.layer_type}, layers: {vector.layers}, hidden size: {vector.hidden_size}",
             f"{indent}norms: {norms}"]
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    if model:
        parts = [str(model.get(k)) for k in ("architecture", "model_type") if model.get(k)]
        extra = [f"{model[k]} {label}" for k, label in (("hidden_size", "hidden"), ("num_layers", "layers"))
                 if model.get(k) is not None]
        lines.append(f"{indent}model: {model.get('name_or_path') or '?'} ({', '.join(parts + extra)})")
    for key, label in (("method", "method"), ("iters", "iterations"), ("status", "status"),
                       ("output_constr_iters", "norm-minimisation steps"),
                       ("constraints_satisfied", "constraints satisfied")):
        if m.get(key) is not None:
            lines.append(f"{indent}{label}: {m[key]}")
    if m.get("final_loss") is not None:
        lines.append(f"{indent}final loss: {m['final_loss']:.6g} {m.get('loss_units', 'nats')}")
    if isinstance(m.get("multiplier"), (int, float)) and m.get("derived_from"):
        lines.append(f"{indent}multiplier: {m['multiplier']:g} (baked into the vector)")
    for origin in m.get("derived_from") or []:
        if isinstance(origin, dict):
            loss = origin.get("final_loss", origin.get("loss"))
            lines.append(f"{indent}derived from: {origin.get('method') or 'a vector'}"
                         + (f" (its final loss: {loss:.6g} nats)" if isinstance(loss, (int, float)) else ""))
    settings = m.get("hyperparameters") or m.get("options")  # the CLI's flags, else the OptimizeOptions
    if isinstance(settings, dict) and settings:
        hp = ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
        lines.append(f"{indent}hyper-parameters: {hp}")
    if m.get("datapoints"):
        lines.append(f"{indent}datapoints: {json.dumps(m['datapoints'], ensure_ascii=False)}")
    for key in ("created_at", "library_version"):
        if m.get(key):
            lines.append(f"{indent}{key.replace('_', ' ')}: {m[key]}")
    return lines


# ------------------------------------------------------------------------------------ compatibility


def _describe_model(fp: Mapping[str, Any]) -> str:
    name = fp.get("name_or_path") or "<unnamed>"
    parts = [str(fp.get("architecture") or fp.get("model_type") or "unknown architecture")]
    if fp.get("hidden_size") is not None:
        parts.append(f"hidden size {fp['hidden_size']}")
    if fp.get("num_layers") is not None:
        parts.append(f"{fp['num_layers']} layers")
    return f"{name!r} ({', '.join(parts)})"


def check_compatible(vector: SteeringVector, model: nn.Module, *, allow_mismatch: bool = False,
                     source: str | None = None, model_name: str | None = None) -> None:
    """Refuse to apply ``vector`` to a model it was not made for.

    Always refused: a different hidden size, or a steered layer the model does not have. Refused
    unless ``allow_mismatch``: a different architecture, model type or number of layers than the
    fingerprint recorded in ``vector.metadata["model"]`` (a different name alone is fine).

    ``source`` (where the vector came from) and ``model_name`` (how to call the model, default its
    ``config._name_or_path``) only change the messages.

    Raises:
        ValueError: naming both models; or the vector's values are not finite in the model's dtype (e.g.
            ``1e300`` stored as float64, for a float32 model).
    """
    fp_model = arch.model_fingerprint(model)
    if model_name:
        fp_model["name_or_path"] = model_name
    stored = vector.metadata.get("model")
    fp_vec: dict[str, Any] = dict(stored) if isinstance(stored, Mapping) else {}
    fp_vec.setdefault("hidden_size", vector.hidden_size)
    what = f"the steering vector{f' from {source}' if source else ''}"
    made_for = f"was made for {_describe_model(fp_vec)}"
    if vector.hidden_size != fp_model["hidden_size"]:
        raise ValueError(f"{what} {made_for}, but the model is {_describe_model(fp_model)}: a vector of hidden "
                         f"size {vector.hidden_size} cannot be applied to a model of hidden size "
                         f"{fp_model['hidden_size']}")
    n = fp_model.get("num_layers")
    if n is not None:
        bad = [layer for layer in vector.layers if not -n <= layer < n]
        if bad:
            raise ValueError(f"{what} steers layer(s) {bad}, but the model {_describe_model(fp_model)} has only "
                             f"{n} layers (0..{n - 1})")
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)
    if dtype is not None:
        for layer in vector.layers:
            tensors = (vector.layer_activations[layer], *(vector.affine.get(layer, ()) if vector.affine else ()))
            for t in tensors:
                validate.finite_in_dtype(f"{what}: layer {layer}", t, dtype)
    diffs = [key for key in ("model_type", "architecture", "num_layers")
             if fp_vec.get(key) is not None and fp_model.get(key) is not None and fp_vec[key] != fp_model[key]]
    if diffs:
        msg = (f"{what} {made_for}, but the model is {_describe_model(fp_model)} (different "
               f"{', '.join(diffs)})")
        if not allow_mismatch:
            raise ValueError(f"{msg}; refusing to apply it (pass allow_mismatch=True, or "
                             "--allow-model-mismatch on the command line, to override)")
        logger.warning("%s; applying it anyway (allow_mismatch=True)", msg)
    elif fp_vec.get("name_or_path") and fp_model.get("name_or_path") and \
            fp_vec["name_or_path"] != fp_model["name_or_path"]:
        logger.info("%s %s; the model is %s (same fingerprint)", what, made_for, _describe_model(fp_model))
