"""Saving, loading, importing and exporting steering vectors.

Format (``format_version`` 1). A :class:`~steering_opt.vector.SteeringVector` saves as either

* a **folder** (the default)::

      my_vector/
        steering_vector.json          # metadata (below); authoritative
        steering_vector.safetensors   # the tensors

* or a **single file** (a path ending in ``.safetensors``): the same tensors, with the same metadata
  JSON stored in the safetensors header under the key ``"steering_opt"``.

Tensor names: ``layer.{L}.vector`` ``(d,)`` for every steered layer ``L``; affine vectors add
``layer.{L}.affine_left`` and ``layer.{L}.affine_right`` ``(r, d)`` (the map is ``h -> h + v + h (LᵀR)ᵀ``).
Tensors keep their dtype (float32 from the optimiser).

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

* Loading never unpickles: tensors are read with ``safetensors``; the legacy ``.json`` + ``.pt`` layout
  (``rotalabs_steer``'s ``SteeringVector.save``) is imported with ``torch.load(weights_only=True)``,
  which refuses any pickle that would construct arbitrary objects or run code.
* Writes are atomic: everything is written to a temporary sibling and renamed into place as the last
  step, so an interrupted save leaves either the old save or nothing, never a file that loads.
* Loading checks the format version, the file checksum (folder form), tensor names, shapes and dtypes
  against the metadata, and that every value is finite. With ``model=...`` it also checks the model
  fingerprint (:func:`check_compatible`): a vector for another hidden size is always refused; another
  architecture / layer count is refused unless ``allow_mismatch=True``.

Interop: :func:`export_gguf` / :func:`import_gguf` (llama.cpp ``--control-vector`` files, repeng's
format) and :func:`export_tensors` (``.pt`` dict, ``.npy``, ``.npz``). Layer numbering: our
``decoder_block`` layer ``L`` is the residual stream *entering* block ``L``; llama.cpp adds
``direction.{il}`` to the *output* of block ``il`` (``llama_adapter_cvec::apply_to(ctx, cur, il)`` at the
end of each layer; ``llama_control_vector_load_one`` rejects ``direction.0`` and the adapter never holds a
tensor for layer 0). So ours ``L`` is llama.cpp's ``L - 1``, and only layers ``L >= 2`` can be exported.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import arch
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
GGUF_ARCH = "controlvector"
LEGACY_SET_FILE = "metadata.json"

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


class SteeringFileError(ValueError):
    """A saved steering file or folder is missing, corrupt, unsafe or does not match its metadata."""


# ------------------------------------------------------------------------------------------- helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _library_version() -> str:
    from . import __version__

    return __version__


def _jsonable(value: Any, where: str) -> Any:
    """A JSON-safe copy of ``value``: tuples become lists, non-finite floats strings, tensors refused."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item(), where)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    try:  # numpy scalars
        import numpy as np

        if isinstance(value, np.generic):
            return _jsonable(value.item(), where)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    raise TypeError(f"metadata value {where} of type {type(value).__name__} is not JSON-serialisable; "
                    "store numbers, strings, lists or dicts in SteeringVector.metadata")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _is_our_save(path: Path) -> bool:
    if path.is_dir():
        return (path / VECTOR_FILE).is_file() or (path / SET_FILE).is_file()
    return False


def check_save_target(path: str | os.PathLike[str]) -> None:
    """Raise FileExistsError if :func:`save` would refuse to write ``path`` (checked before expensive work).

    A folder path may be new, an empty folder or an earlier steering_opt save; a ``.safetensors`` path
    must not be a folder.
    """
    target = Path(path)
    if target.suffix == ".safetensors":
        if target.is_dir():
            raise FileExistsError(f"cannot save to {str(target)!r}: it is a folder")
        return
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"cannot save to {str(target)!r}: it exists and is a file, not a folder")
        if not _is_our_save(target) and any(target.iterdir()):
            raise FileExistsError(f"cannot save to {str(target)!r}: the folder exists, is not empty and is not "
                                  "a steering_opt save; choose another path or remove it")


def atomic_write_file(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it onto ``path``.

    The rename is the last step, so ``path`` is either its old content or the complete new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _atomic_write_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temporary sibling and rename it onto ``target`` as the last step.

    An existing ``target`` is replaced only if it is a steering_opt save or an empty folder.
    """
    target = Path(os.path.abspath(target))  # "." or "x/.." must name a real parent for the final rename
    check_save_target(target)
    cwd = Path.cwd().resolve()
    if target.exists() and (cwd == target.resolve() or target.resolve() in cwd.parents):
        raise ValueError(f"cannot save to {str(target)!r}: it is (or contains) the current working folder, which "
                         "a save replaces as a whole; save to a sub-folder instead")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, backup)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ------------------------------------------------------------------------------------------- metadata


def describe_datapoints(datapoints: Sequence[Any], max_prompts: int = 3, max_chars: int = 200) -> dict[str, Any]:
    """A short JSON-able summary of training datapoints (``TrainingDatapoint`` or contrast pairs).

    ``{"count", "src_completions", "dst_completions", "examples": [first prompts, truncated]}``.
    """
    src = sum(len(getattr(d, "src_completions", []) or []) for d in datapoints)
    dst = sum(len(getattr(d, "dst_completions", []) or []) for d in datapoints)
    examples = []
    for d in list(datapoints)[:max_prompts]:
        text = getattr(d, "prompt", None)
        if text is None:
            text = getattr(d, "positive", None)
        if text is None and isinstance(d, (tuple, list)) and d:
            text = d[0]
        if isinstance(text, str):
            examples.append(text if len(text) <= max_chars else text[: max_chars - 1] + "…")
    out: dict[str, Any] = {"count": len(datapoints), "examples": examples}
    if src or dst:
        out.update(src_completions=src, dst_completions=dst)
    return out


def _fingerprint_of(model: nn.Module | None, vector: SteeringVector) -> dict[str, Any]:
    if model is not None:
        return _jsonable(arch.model_fingerprint(model), "model")
    stored = vector.metadata.get("model")
    if isinstance(stored, Mapping):
        return _jsonable(dict(stored), "model")
    return {"hidden_size": vector.hidden_size}


def _tensor_dict(vector: SteeringVector) -> dict[str, torch.Tensor]:
    """Flat name -> tensor dict (contiguous CPU copies; no shared storage, as safetensors requires)."""
    out: dict[str, torch.Tensor] = {}
    for layer in vector.layers:
        out[f"layer.{layer}.vector"] = vector.layer_activations[layer].detach().to("cpu").clone().contiguous()
        if vector.affine:
            if layer not in vector.affine:
                raise ValueError(f"affine steering vector has no affine factors for layer {layer}")
            left, right = vector.affine[layer]
            out[f"layer.{layer}.affine_left"] = left.detach().to("cpu").clone().contiguous()
            out[f"layer.{layer}.affine_right"] = right.detach().to("cpu").clone().contiguous()
    return out


def _validate_for_save(vector: SteeringVector) -> None:
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


def _build_metadata(vector: SteeringVector, tensors: dict[str, torch.Tensor], model: nn.Module | None,
                    extra: Mapping[str, Any] | None) -> dict[str, Any]:
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
    rank = None
    if vector.affine:
        rank = int(next(iter(vector.affine.values()))[0].shape[0])
    return {
        "format": VECTOR_FORMAT,
        "format_version": FORMAT_VERSION,
        "site": vector.layer_type,
        "layers": vector.layers,
        "hidden_size": vector.hidden_size,
        "kind": vector.kind,
        "clamp": None if vector.clamp is None else float(vector.clamp),
        "affine_rank": rank,
        "tensors": {k: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for k, t in tensors.items()},
        "metadata": meta,
    }


# ------------------------------------------------------------------------------------------------ save


def _write_vector_folder(folder: Path, vector: SteeringVector, model: nn.Module | None,
                         extra: Mapping[str, Any] | None) -> None:
    from safetensors.torch import save_file

    tensors = _tensor_dict(vector)
    doc = _build_metadata(vector, tensors, model, extra)
    tpath = folder / TENSORS_FILE
    save_file(tensors, str(tpath), metadata={"format": VECTOR_FORMAT})
    _fsync_file(tpath)
    doc["sha256"] = _sha256(tpath)
    _write_text(folder / VECTOR_FILE, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def save(
    obj: SteeringVector | Mapping[str, SteeringVector],
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save a steering vector (or a ``{name: SteeringVector}`` set) atomically.

    Args:
        obj: a :class:`SteeringVector`, or a dict of them (saved as one set folder).
        path: a folder (created or replaced), or for a single vector a file ending in ``.safetensors``.
            An existing path is replaced only if it is a steering_opt save (or an empty folder).
        model: the model the vector was made for; its fingerprint is recorded (otherwise the one in
            ``vector.metadata["model"]``, if any).
        metadata: extra JSON-able entries merged into the saved metadata (e.g. ``hyperparameters``).

    Returns:
        The path written.

    Raises:
        TypeError: ``obj`` is not a SteeringVector or a dict of them; metadata is not JSON-able.
        ValueError: non-finite values, inconsistent affine factors, bad set names.
        FileExistsError: ``path`` exists and is not a steering_opt save.
    """
    path = Path(path)
    if isinstance(obj, Mapping):
        return _save_set(obj, path, model=model, metadata=metadata)
    _validate_for_save(obj)
    if path.suffix == ".safetensors":
        return _save_single_file(obj, path, model=model, metadata=metadata)
    if path.suffix in (".pt", ".pth", ".bin", ".gguf", ".npy", ".npz", ".json"):
        raise ValueError(f"save(): {str(path)!r} has the suffix {path.suffix!r}; pass a folder or a "
                         "'.safetensors' file (use export_gguf / export_tensors for other formats)")
    return _atomic_write_dir(path, lambda tmp: _write_vector_folder(tmp, obj, model, metadata))


def _save_single_file(vector: SteeringVector, path: Path, *, model: nn.Module | None,
                      metadata: Mapping[str, Any] | None) -> Path:
    from safetensors.torch import save_file

    if path.is_dir():
        raise FileExistsError(f"cannot save to {str(path)!r}: it is a folder")
    tensors = _tensor_dict(vector)
    doc = _build_metadata(vector, tensors, model, metadata)
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
        _validate_for_save(vec)
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
        _write_text(tmp / SET_FILE, json.dumps(doc, indent=2) + "\n")

    return _atomic_write_dir(path, build)


# ------------------------------------------------------------------------------------------------ load


def _parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose every failure is a :class:`SteeringFileError` naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SteeringFileError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg} "
                                "(truncated or corrupted?)") from None
    except (ValueError, RecursionError) as exc:  # integers over Python's digit limit, absurd nesting
        raise SteeringFileError(f"{where}: unreadable JSON ({type(exc).__name__}: {str(exc)[:100]})") from None


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SteeringFileError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return _parse_json(text, str(path))


def _check_doc(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("format") != VECTOR_FORMAT:
        raise SteeringFileError(f"{where}: not a steering_opt vector (missing format {VECTOR_FORMAT!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise SteeringFileError(f"{where}: format_version {version!r} is not supported by steering_opt "
                                f"{_library_version()} (supports 1..{FORMAT_VERSION}); upgrade steering_opt")
    for key, typ in (("site", str), ("layers", list), ("hidden_size", int), ("kind", str), ("tensors", dict)):
        if not isinstance(doc.get(key), typ):
            raise SteeringFileError(f"{where}: metadata field {key!r} is missing or not a {typ.__name__}")
    if doc["site"] not in arch.SITES:
        raise SteeringFileError(f"{where}: unknown site {doc['site']!r}; expected one of {arch.SITES}")
    if doc["kind"] not in ("additive", "clamp", "affine"):
        raise SteeringFileError(f"{where}: unknown kind {doc['kind']!r}")
    if not doc["layers"] or not all(isinstance(x, int) and not isinstance(x, bool) for x in doc["layers"]):
        raise SteeringFileError(f"{where}: 'layers' must be a non-empty list of ints, got {doc['layers']!r}")
    return doc


def _load_safetensors(path: Path, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError subclasses for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SteeringFileError(f"{path}: not a valid safetensors file (truncated or corrupted?): {first}") from None
    return tensors, header


def _vector_from(doc: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> SteeringVector:
    d = doc["hidden_size"]
    layers = doc["layers"]
    kind = doc["kind"]
    rank = doc.get("affine_rank")
    if kind == "affine" and (not isinstance(rank, int) or rank < 1):
        raise SteeringFileError(f"{where}: affine vector without a valid 'affine_rank' ({rank!r})")
    expected: dict[str, tuple[int, ...]] = {}
    for layer in layers:
        expected[f"layer.{layer}.vector"] = (d,)
        if kind == "affine":
            expected[f"layer.{layer}.affine_left"] = (rank, d)
            expected[f"layer.{layer}.affine_right"] = (rank, d)
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
        affine = {layer: (tensors[f"layer.{layer}.affine_left"], tensors[f"layer.{layer}.affine_right"])
                  for layer in layers}
    meta = doc.get("metadata")
    return SteeringVector(
        layer_activations={layer: tensors[f"layer.{layer}.vector"] for layer in layers},
        layer_type=doc["site"],
        clamp=None if clamp is None else float(clamp),
        affine=affine,
        metadata=dict(meta) if isinstance(meta, dict) else {},
    )


def _load_vector_folder(folder: Path, device: str | torch.device) -> SteeringVector:
    meta_path, tpath = folder / VECTOR_FILE, folder / TENSORS_FILE
    doc = _check_doc(_read_json(meta_path), str(meta_path))
    if not tpath.is_file():
        raise SteeringFileError(f"{folder}: {TENSORS_FILE} is missing")
    sha = doc.get("sha256")
    if not isinstance(sha, str) or _sha256(tpath) != sha:
        raise SteeringFileError(f"{tpath}: the file does not match the checksum in {VECTOR_FILE} "
                                "(truncated, corrupted or modified after saving)")
    tensors, _ = _load_safetensors(tpath, device)
    return _vector_from(doc, tensors, str(folder))


def _load_single_file(path: Path, device: str | torch.device) -> SteeringVector:
    tensors, header = _load_safetensors(path, device)
    raw = header.get(HEADER_KEY)
    if raw is None:
        raise SteeringFileError(f"{path}: a safetensors file without steering_opt metadata (no {HEADER_KEY!r} "
                                "key in its header); it was not written by steering_opt.save")
    doc = _parse_json(raw, f"{path}: the metadata in the header")
    return _vector_from(_check_doc(doc, str(path)), tensors, str(path))


def _load_set(folder: Path, device: str | torch.device) -> dict[str, SteeringVector]:
    doc = _read_json(folder / SET_FILE)
    if not isinstance(doc, dict) or doc.get("format") != SET_FORMAT or not isinstance(doc.get("vectors"), list):
        raise SteeringFileError(f"{folder / SET_FILE}: not a steering_opt vector-set manifest")
    version = doc.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise SteeringFileError(f"{folder / SET_FILE}: format_version {version!r} is not supported")
    out: dict[str, SteeringVector] = {}
    for entry in doc["vectors"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                not isinstance(entry.get("path"), str):
            raise SteeringFileError(f"{folder / SET_FILE}: bad entry {entry!r}")
        name = entry["path"]
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
        ValueError: the model is incompatible.
    """
    path = Path(path)
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
    path = Path(path)
    if path.is_dir():
        for name in (SET_FILE, VECTOR_FILE):
            if (path / name).is_file():
                doc = _read_json(path / name)
                if not isinstance(doc, dict):
                    raise SteeringFileError(f"{path / name}: expected a JSON object, found {type(doc).__name__}")
                return doc
        raise SteeringFileError(f"{path}: not a steering_opt save (no {VECTOR_FILE} or {SET_FILE})")
    if path.is_file() and path.suffix == ".safetensors":
        _, header = _load_safetensors(path, "cpu")
        if HEADER_KEY not in header:
            raise SteeringFileError(f"{path}: no steering_opt metadata in the safetensors header")
        doc = _parse_json(header[HEADER_KEY], f"{path}: the metadata in the header")
        if not isinstance(doc, dict):
            raise SteeringFileError(f"{path}: the header metadata is not a JSON object")
        return doc
    if not path.exists():
        raise FileNotFoundError(f"no steering vector at {str(path)!r} (no such file or folder)")
    raise SteeringFileError(f"{path}: not a steering_opt save")


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
        ValueError: naming both models.
    """
    fp_model = arch.model_fingerprint(model)
    if model_name:
        fp_model["name_or_path"] = model_name
    stored = vector.metadata.get("model") if isinstance(vector.metadata.get("model"), Mapping) else {}
    fp_vec = dict(stored)
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


# ------------------------------------------------------------------------------------------- legacy


def _safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: the only way a ``.pt`` file is ever read. Any failure on the
    file's bytes (refused globals, truncation, ``struct.error`` deep in the unpickler, ...) is a
    :class:`SteeringFileError`; a missing file stays ``FileNotFoundError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SteeringFileError(f"{path}: refused to load: not a file that torch.load(weights_only=True) "
                                f"accepts ({type(exc).__name__}: {first}). .pt files are never unpickled "
                                "with arbitrary code.") from None


def _torch_load_tensor(path: Path) -> torch.Tensor:
    """A ``.pt`` file that must hold one plain tensor (read with :func:`_safe_torch_load`)."""
    obj = _safe_torch_load(path)
    if not isinstance(obj, torch.Tensor):
        raise SteeringFileError(f"{path}: expected a single tensor, found a {type(obj).__name__}")
    return obj


def _legacy_one(meta_path: Path, pt_path: Path) -> tuple[int, torch.Tensor, dict[str, Any]]:
    doc = _read_json(meta_path)
    if not isinstance(doc, dict) or not isinstance(doc.get("layer_index"), int):
        raise SteeringFileError(f"{meta_path}: not a legacy steering-vector metadata file (no integer "
                                "'layer_index')")
    if not pt_path.is_file():
        raise FileNotFoundError(f"{pt_path}: the tensor file of {meta_path} is missing")
    t = _torch_load_tensor(pt_path)
    shape = doc.get("vector_shape")
    if shape is not None and (not isinstance(shape, list) or list(t.shape) != shape):
        raise SteeringFileError(f"{pt_path}: tensor shape {list(t.shape)} does not match vector_shape {shape} "
                                f"in {meta_path.name}")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise SteeringFileError(f"{pt_path}: expected a vector of shape (d,), got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise SteeringFileError(f"{pt_path}: expected a floating-point tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise SteeringFileError(f"{pt_path}: the tensor contains NaN or infinite values")
    return doc["layer_index"], t.clone(), doc


def import_legacy(path: str | os.PathLike[str]) -> SteeringVector:
    """Import the seed-001 (``rotalabs_steer``) layout: ``name.json`` + ``name.pt``, or a set folder with
    ``metadata.json`` and ``layer_{i}.json``/``.pt`` files (becomes one multi-layer vector).

    Tensors are read with ``torch.load(weights_only=True)`` only. Layer convention: the legacy
    ``layer_index`` ``i`` steers the *output* of block ``i`` (a forward hook), which is the residual
    stream *entering* block ``i + 1``: the imported vector steers ``decoder_block`` layer ``i + 1``
    (the original index is kept as ``metadata["legacy_layer_index"]``).
    """
    path = Path(path)
    pairs: list[tuple[Path, Path]] = []
    set_doc: dict[str, Any] = {}
    if path.is_dir():
        set_path = path / LEGACY_SET_FILE
        doc = _read_json(set_path)
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
    shapes = {tuple(t.shape) for t in acts.values()}
    if len(shapes) != 1:
        raise SteeringFileError(f"{path}: legacy vectors have different shapes {sorted(shapes)}")
    meta: dict[str, Any] = {
        "method": first.get("extraction_method", "caa"),
        "behavior": set_doc.get("behavior", first.get("behavior")),
        "model": {"name_or_path": set_doc.get("model_name", first.get("model_name")),
                  "hidden_size": int(next(iter(shapes))[0])},
        "legacy_layer_index": legacy_layers if len(legacy_layers) > 1 else legacy_layers[0],
        "imported_from": "legacy .json + .pt (rotalabs_steer layout; layer_index = output of block i)",
    }
    if isinstance(first.get("metadata"), dict):
        meta["legacy_metadata"] = first["metadata"]
        if "created_at" in first["metadata"]:
            meta["created_at"] = first["metadata"]["created_at"]
    return SteeringVector(layer_activations=acts, layer_type="decoder_block", metadata=meta)


# --------------------------------------------------------------------------------------------- GGUF


def export_gguf(
    vector: SteeringVector,
    path: str | os.PathLike[str],
    *,
    multiplier: float = 1.0,
    model_hint: str | None = None,
) -> Path:
    """Write a llama.cpp control vector (``llama-cli --control-vector FILE``), atomically.

    Tensors ``direction.{il}`` (float32, 1-D) with ``il = L - 1`` for each of our layers ``L``: llama.cpp
    adds ``direction.{il}`` to the output of block ``il``, which is the input of our block ``L = il + 1``.
    llama.cpp never steers the output of block 0 (``direction.0`` is rejected), so layers 0 and 1 cannot be
    exported. Only additive ``decoder_block`` vectors can be expressed. Keys: ``general.architecture =
    "controlvector"``, ``controlvector.model_hint`` (the model type), ``controlvector.layer_count`` (as
    repeng's ``export_gguf`` writes them).

    Args:
        multiplier: scale baked into the exported directions (llama.cpp can scale again with
            ``--control-vector-scaled FILE S``).
        model_hint: overrides the model type recorded in the metadata.
    """
    import gguf
    import numpy as np

    if not isinstance(vector, SteeringVector):
        raise TypeError(f"export_gguf: expected a SteeringVector, got {type(vector).__name__}")
    if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool) or not math.isfinite(multiplier):
        raise TypeError(f"export_gguf: `multiplier` must be a finite number, got {multiplier!r}")
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
    _validate_for_save(vector)
    fp = vector.metadata.get("model") if isinstance(vector.metadata.get("model"), Mapping) else {}
    hint = model_hint or fp.get("model_type") or "unknown"

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", str(hint))
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(vector.layers))
        writer.add_string("steering_opt.layer_convention",
                          "direction.{il} = steering_opt decoder_block layer il+1 (output of block il)")
        for layer in vector.layers:
            arr = (vector.layer_activations[layer].detach().float().cpu() * float(multiplier)).numpy()
            writer.add_tensor(f"direction.{layer - 1}", np.ascontiguousarray(arr, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"export_gguf: the output file should end in '.gguf', got {str(path)!r}")
    return atomic_write_file(path, write)


def import_gguf(path: str | os.PathLike[str]) -> SteeringVector:
    """Read a llama.cpp / repeng control-vector GGUF file: ``direction.{il}`` becomes our layer ``il + 1``."""
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors/etc. for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SteeringFileError(f"{path}: not a valid GGUF file (truncated or corrupted?): {first}") from None
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
        arr = np.array(t.data, dtype=np.float32).reshape(-1)
        if not np.isfinite(arr).all():
            raise SteeringFileError(f"{path}: tensor {t.name} contains NaN or infinite values")
        acts[il + 1] = torch.from_numpy(arr.copy())
    if not acts:
        raise SteeringFileError(f"{path}: no direction.<layer> tensors (not a control vector)")
    hint_field = reader.get_field(f"{GGUF_ARCH}.model_hint")
    hint = None
    if hint_field is not None and len(hint_field.parts):
        hint = bytes(hint_field.parts[-1]).decode("utf-8", errors="replace")
    sizes = {int(v.shape[0]) for v in acts.values()}
    if len(sizes) != 1:
        raise SteeringFileError(f"{path}: direction tensors have different sizes {sorted(sizes)}")
    meta = {"method": "import_gguf", "imported_from": str(path.name),
            "model": {"model_type": hint, "hidden_size": sizes.pop()}}
    return SteeringVector(layer_activations=acts, layer_type="decoder_block", metadata=meta)


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
    cannot express them (use :func:`save`).
    """
    import numpy as np

    if not isinstance(vector, SteeringVector):
        raise TypeError(f"export_tensors: expected a SteeringVector, got {type(vector).__name__}")
    if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool) or not math.isfinite(multiplier):
        raise TypeError(f"export_tensors: `multiplier` must be a finite number, got {multiplier!r}")
    if vector.kind != "additive":
        raise ValueError(f"export_tensors: only additive vectors can be exported as plain tensors (this one is "
                         f"{vector.kind}); use steering_opt.save to keep its {vector.kind} parameters")
    _validate_for_save(vector)
    path = Path(path)
    suffix = path.suffix.lower()
    tensors = {layer: (vector.layer_activations[layer].detach().float().cpu() * float(multiplier)).clone()
               for layer in vector.layers}
    if suffix == ".pt":
        return atomic_write_file(path, lambda tmp: torch.save(tensors, tmp))
    if suffix == ".npz":
        arrays = {f"layer_{layer}": t.numpy() for layer, t in tensors.items()}

        def write_npz(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, **arrays)

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

    * ``.pt``: a ``{layer (int): tensor (d,)}`` dict, read with ``torch.load(weights_only=True)`` only (also
      the ``layer_activations`` of steering-vectors' objects saved with ``torch.save``).
    * ``.npz``: arrays named ``layer_{L}``, read with ``allow_pickle=False``.
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
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise SteeringFileError(f"{path}: not a readable .npz file of arrays ({first})") from None
        for key, arr in arrays.items():
            m = re.fullmatch(r"layer_(-?\d{1,9})", key)
            if m is None:
                raise SteeringFileError(f"{path}: unexpected array {key!r} (expected layer_<L>)")
            acts[int(m.group(1))] = torch.from_numpy(arr)
    else:
        obj = _safe_torch_load(path)
        if not isinstance(obj, dict) or not obj:
            raise SteeringFileError(f"{path}: expected a non-empty {{layer: tensor}} dict, found "
                                    f"{type(obj).__name__}")
        for key, t in obj.items():
            if isinstance(key, bool) or not isinstance(key, int) or not isinstance(t, torch.Tensor):
                raise SteeringFileError(f"{path}: expected {{int layer: tensor}} entries, found {key!r}: "
                                        f"{type(t).__name__}")
            acts[key] = t
    for layer, t in acts.items():
        if t.dim() != 1 or not t.dtype.is_floating_point:
            raise SteeringFileError(f"{path}: layer {layer}: expected a floating-point vector (d,), got "
                                    f"{tuple(t.shape)} {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise SteeringFileError(f"{path}: layer {layer} contains NaN or infinite values")
    if not acts:
        raise SteeringFileError(f"{path}: no layer tensors")
    if len({int(t.shape[0]) for t in acts.values()}) != 1:
        raise SteeringFileError(f"{path}: the layers' vectors have different sizes")
    d = int(next(iter(acts.values())).shape[0])
    return SteeringVector(layer_activations={k: acts[k].clone() for k in sorted(acts)}, layer_type="decoder_block",
                          metadata={"method": "import_tensors", "imported_from": path.name,
                                    "model": {"hidden_size": d}})
