"""Untrusted files: fuzzed JSONL and metadata never raise anything but the documented errors, truncated or
corrupted files are refused (or, where a format has no checksum, load as finite vectors of the right
shape), and a malicious pickle in any load path never executes its payload.

Documented errors: ``load``/``load_vector``/``read_metadata``/``import_*`` raise ``SteeringFileError`` (a
``ValueError``) or ``FileNotFoundError``; ``load_datapoints``/``load_contrast_pairs`` raise ``JSONLError``
(a ``ValueError`` naming ``file:line``) or ``FileNotFoundError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import steering_opt as so
from steering_opt import persist
from steering_opt.jsonl import CONTRAST_PAIR_KEYS, DATAPOINT_KEYS, JSONLError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
D = 8


@contextmanager
def tmpdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# --------------------------------------------------------------------------------- strategies

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**6), max_value=10**6), st.integers(),
    st.sampled_from([10**400, -(10**400), 2**63]), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "\x00", "layer.1.vector", "float32", "additive", "decoder_block"]),
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(list(DATAPOINT_KEYS) + ["start", "stop",
                                                                                               "role", "content"])),
                        children, max_size=4)),
    max_leaves=12,
)


def dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


# -------------------------------------------------------------------------------------- JSONL


def _check_jsonl(path: Path, n_lines: int) -> None:
    for loader, cls in ((so.load_datapoints, so.TrainingDatapoint), (so.load_contrast_pairs, so.ContrastPair)):
        try:
            items = loader(path)
        except JSONLError as e:
            assert e.path == str(path)
            assert str(e).startswith(str(path))
            assert e.line is None or 1 <= e.line <= n_lines
            assert e.line is not None or "empty" in str(e)
        else:
            assert items and all(isinstance(x, cls) for x in items)


@FUZZ
@given(st.lists(st.binary(max_size=60), min_size=0, max_size=4))
def test_jsonl_random_bytes(lines: list[bytes]) -> None:
    with tmpdir() as d:
        p = d / "f.jsonl"
        p.write_bytes(b"\n".join(lines))
        _check_jsonl(p, max(1, len(b"\n".join(lines).split(b"\n"))))


@FUZZ
@given(st.lists(JSON, min_size=1, max_size=4))
def test_jsonl_random_json(values: list[Any]) -> None:
    with tmpdir() as d:
        p = d / "f.jsonl"
        p.write_text("\n".join(dumps(v) for v in values), encoding="utf-8")
        _check_jsonl(p, len(values))


VALID_DP = {"prompt": "Hi", "dst_completions": ["yes", "sure"], "src_completions": ["no"],
            "dst_completions_target_losses": [1.0, 2.0], "token": {"start": 0, "stop": None}, "is_negative": False}
VALID_PAIR = {"positive": [{"role": "user", "content": "a"}], "negative": "b"}


@FUZZ
@given(st.sampled_from([VALID_DP, VALID_PAIR]), st.sampled_from(list(DATAPOINT_KEYS) + list(CONTRAST_PAIR_KEYS)),
       JSON, st.booleans())
def test_jsonl_mutated_lines(base: dict, key: str, value: Any, delete: bool) -> None:
    obj = dict(base)
    if delete:
        obj.pop(key, None)
    else:
        obj[key] = value
    with tmpdir() as d:
        p = d / "f.jsonl"
        p.write_text(dumps(base) + "\n\n" + dumps(obj) + "\n", encoding="utf-8")
        _check_jsonl(p, 3)


def test_jsonl_pathological_lines() -> None:
    """Integers over Python's digit limit, absurd nesting, UTF-16, a NUL byte, a lone surrogate: file:line."""
    cases = ["1" * 5000, "[" * 100_000, '{"prompt": "\\ud800", "dst_completions": ["a"]}', '{"prompt": "a\x00"}',
             '{"prompt": "a", "dst_completions": ["b"], "dst_completions_target_losses": [1e400]}']
    with tmpdir() as d:
        for i, text in enumerate(cases):
            p = d / f"{i}.jsonl"
            p.write_text('{"prompt": "ok", "dst_completions": ["b"]}\n' + text + "\n", encoding="utf-8",
                         errors="surrogatepass")
            _check_jsonl(p, 2)
        p = d / "utf16.jsonl"
        p.write_bytes('{"prompt": "ok", "dst_completions": ["b"]}\n'.encode("utf-16"))
        with pytest.raises(JSONLError, match=r"utf16\.jsonl:1: not UTF-8"):
            so.load_datapoints(p)


# ----------------------------------------------------------------------------------- metadata


def _vector() -> so.SteeringVector:
    return so.SteeringVector({1: torch.arange(D, dtype=torch.float32), 3: torch.ones(D)},
                             metadata={"method": "test"})


def _affine() -> so.SteeringVector:
    return so.SteeringVector({2: torch.ones(D)}, affine={2: (torch.ones(2, D), torch.ones(2, D))})


def _check_loaded(result: Any) -> None:
    vecs = result.values() if isinstance(result, dict) else [result]
    for v in vecs:
        assert isinstance(v, so.SteeringVector)
        for layer, t in v.layer_activations.items():
            assert isinstance(layer, int) and t.dim() == 1 and t.shape[0] == v.hidden_size
            assert torch.isfinite(t).all()


def _load_ok_or_refused(path: Path, **kw: Any) -> Any:
    try:
        result = so.load(path, **kw)
    except (persist.SteeringFileError, FileNotFoundError):
        return None
    _check_loaded(result)
    return result


def _metadata_ok_or_refused(path: Path) -> None:
    try:
        doc = persist.read_metadata(path)
    except (persist.SteeringFileError, FileNotFoundError):
        return
    assert isinstance(doc, dict)


def _mutate(doc: Any, path: list[Any], value: Any, delete: bool) -> Any:
    """A deep copy of ``doc`` with the entry at ``path`` (as far as it exists) replaced or deleted."""
    doc = json.loads(json.dumps(doc))
    node = doc
    for i, key in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, dict) and key in node:
            if last:
                if delete:
                    del node[key]
                else:
                    node[key] = value
                return doc
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and node:
            key = key % len(node)
            if last:
                node[key] = value
                return doc
            node = node[key]
        else:
            if isinstance(node, dict):
                node[str(key)] = value
            return doc
    return value


def _edit(data: st.DataObject, doc: Any) -> Any:
    """1-3 random edits of ``doc``, each at a random *existing* path (so deep fields such as
    ``tensors.layer.1.vector.shape`` are reached as often as top-level ones): replace by random JSON, delete, or
    add a key."""
    doc = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        path: list[Any] = []
        node = doc
        while isinstance(node, (dict, list)) and node and (not path or data.draw(st.booleans())):
            key = data.draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict) else range(len(node))))
            path.append(key)
            node = node[key]
        if not path:
            return data.draw(JSON)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(JSON)
        else:
            parent[path[-1]] = data.draw(JSON)
    return doc


PATHS = st.lists(st.sampled_from(["format", "format_version", "site", "layers", "hidden_size", "kind", "clamp",
                                  "affine_rank", "tensors", "metadata", "sha256", "layer.1.vector",
                                  "layer.2.affine_left", "shape", "dtype", "vectors", "name", "path", 0, 1]),
                 min_size=1, max_size=4)


def _rehash(folder: Path) -> None:
    doc_path = folder / persist.VECTOR_FILE
    try:
        doc = json.loads(doc_path.read_text())
    except ValueError:
        return
    if isinstance(doc, dict):
        doc["sha256"] = hashlib.sha256((folder / persist.TENSORS_FILE).read_bytes()).hexdigest()
        doc_path.write_text(json.dumps(doc, allow_nan=True))


@FUZZ
@given(st.sampled_from(["additive", "affine", "clamp"]), st.data(), st.booleans())
def test_folder_metadata_fuzz(kind: str, data: st.DataObject, keep_checksum: bool) -> None:
    """A folder whose steering_vector.json is edited (checksum kept valid, so the edit reaches every check)."""
    vec = {"additive": _vector(), "affine": _affine(), "clamp": so.SteeringVector({1: torch.ones(D)}, clamp=2.0)}
    with tmpdir() as d:
        folder = so.save(vec[kind], d / "v")
        doc = json.loads((folder / persist.VECTOR_FILE).read_text())
        (folder / persist.VECTOR_FILE).write_text(dumps(_edit(data, doc)))
        if keep_checksum:
            _rehash(folder)
        _load_ok_or_refused(folder)
        _metadata_ok_or_refused(folder)


@FUZZ
@given(st.sampled_from(["additive", "affine"]), PATHS, JSON, st.booleans())
def test_folder_metadata_named_fields(kind: str, path: list[Any], value: Any, delete: bool) -> None:
    """The same, editing fields by name (also ones the file does not have)."""
    with tmpdir() as d:
        folder = so.save(_vector() if kind == "additive" else _affine(), d / "v")
        doc = json.loads((folder / persist.VECTOR_FILE).read_text())
        (folder / persist.VECTOR_FILE).write_text(dumps(_mutate(doc, path, value, delete)))
        if path[0] != "sha256":
            _rehash(folder)
        _load_ok_or_refused(folder)
        _metadata_ok_or_refused(folder)


@FUZZ
@given(st.sampled_from(["affine", "clamp"]), st.data())
def test_single_file_header_fuzz(kind: str, data: st.DataObject) -> None:
    """A .safetensors file whose steering_opt header entry is edited."""
    from safetensors.torch import load_file, save_file

    vec = _affine() if kind == "affine" else so.SteeringVector({1: torch.ones(D)}, clamp=2.0)
    with tmpdir() as d:
        f = so.save(vec, d / "v.safetensors")
        doc = persist.read_metadata(f)
        save_file(load_file(str(f)), str(f), metadata={persist.HEADER_KEY: dumps(_edit(data, doc))})
        _load_ok_or_refused(f)
        _metadata_ok_or_refused(f)


@FUZZ
@given(st.data())
def test_set_manifest_fuzz(data: st.DataObject) -> None:
    with tmpdir() as d:
        folder = so.save({"a": _vector(), "b": _vector() * 2}, d / "set")
        doc = json.loads((folder / persist.SET_FILE).read_text())
        (folder / persist.SET_FILE).write_text(dumps(_edit(data, doc)))
        result = _load_ok_or_refused(folder)
        assert result is None or isinstance(result, dict)
        _metadata_ok_or_refused(folder)


def test_set_manifest_entries_cannot_escape_or_crash(tmp_path: Path) -> None:
    """Folder names with a NUL byte, '..', absolute paths or absurd lengths are refused; a name that is not
    there is a FileNotFoundError."""
    folder = so.save({"a": _vector()}, tmp_path / "set")
    doc = json.loads((folder / persist.SET_FILE).read_text())
    for bad in ["a\x00b", "../set", "/etc", "a/../../x", "", ".", "..", "a" * 5000, 7, None, "a\\b", "zz"]:
        doc["vectors"][0]["path"] = bad
        (folder / persist.SET_FILE).write_text(json.dumps(doc))
        with pytest.raises(FileNotFoundError if bad in ("a\\b", "zz") else persist.SteeringFileError):
            so.load(folder)


@FUZZ
@given(st.sampled_from(["layer_index", "vector_shape", "metadata", "layers", "model_name"]), JSON, st.booleans())
def test_legacy_metadata_fuzz(key: str, value: Any, set_form: bool) -> None:
    with tmpdir() as d:
        torch.save(torch.ones(D), d / "layer_2.pt")
        doc = {"layer_index": 2, "vector_shape": [D], "metadata": {"created_at": "x"}, "model_name": "m"}
        doc[key] = value
        (d / "layer_2.json").write_text(dumps(doc))
        if set_form:
            (d / "metadata.json").write_text(dumps({"layers": [2] if key != "layers" else value, "behavior": "b"}))
            _load_ok_or_refused(d)
        else:
            _load_ok_or_refused(d / "layer_2.json")


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".safetensors", ".gguf", ".pt", ".pth", ".npz", ".json", ".bin"]))
@example(b"j", ".pt")  # found on a fresh machine: the unpickler raised struct.error (LONG_BINGET, 0 bytes left)
def test_random_bytes_in_every_format(data: bytes, suffix: str) -> None:
    with tmpdir() as d:
        f = d / f"v{suffix}"
        f.write_bytes(data)
        _load_ok_or_refused(f)
        _metadata_ok_or_refused(f)
        folder = so.save(_vector(), d / "folder")
        (folder / persist.VECTOR_FILE).write_bytes(data)
        _load_ok_or_refused(folder)
        _metadata_ok_or_refused(folder)
        try:
            so.import_gguf(f)
        except (persist.SteeringFileError, FileNotFoundError):
            pass


# ------------------------------------------------------------------------- truncation, corruption


def _writers() -> dict[str, Callable[[Path], Path]]:
    v = so.SteeringVector({2: torch.linspace(-1, 1, D), 3: torch.ones(D)})

    def legacy(d: Path) -> Path:
        torch.save(torch.ones(D), d / "legacy.pt")
        (d / "legacy.json").write_text(json.dumps({"layer_index": 1, "vector_shape": [D]}))
        return d / "legacy.pt"

    return {
        "folder": lambda d: so.save(v, d / "v") / persist.TENSORS_FILE,
        "folder-json": lambda d: so.save(v, d / "v") / persist.VECTOR_FILE,
        "single": lambda d: so.save(_affine(), d / "v.safetensors"),
        "gguf": lambda d: so.export_gguf(v, d / "v.gguf"),
        "pt": lambda d: so.export_tensors(v, d / "v.pt"),
        "npz": lambda d: so.export_tensors(v, d / "v.npz"),
        "legacy": legacy,
    }


def _load_target(written: Path) -> Path:
    return written.parent if written.name in (persist.TENSORS_FILE, persist.VECTOR_FILE) else written


@pytest.mark.parametrize("fmt", list(_writers()))
@FUZZ
@given(cut=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_truncated_files_are_refused(fmt: str, cut: float) -> None:
    with tmpdir() as d:
        f = _writers()[fmt](d)
        data = f.read_bytes().rstrip()  # (a JSON file's trailing newline is not content)
        f.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises((persist.SteeringFileError, FileNotFoundError)):
            so.load(_load_target(f))


@pytest.mark.parametrize("fmt", list(_writers()))
@FUZZ
@given(data=st.data())
def test_corrupted_files_are_refused_or_load_finite(fmt: str, data: st.DataObject) -> None:
    """Flipped bytes: refused, except where a format has no checksum and the flip lands in tensor data or
    a harmless place; then the result is still a finite vector of the right shape. The folder form (with its
    checksum) always refuses."""
    with tmpdir() as d:
        f = _writers()[fmt](d)
        raw = bytearray(f.read_bytes())
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=3, unique=True)):
            raw[i] ^= data.draw(st.integers(1, 255))
        f.write_bytes(bytes(raw))
        if fmt == "folder":
            with pytest.raises(persist.SteeringFileError, match="checksum"):
                so.load(_load_target(f))
        else:
            _load_ok_or_refused(_load_target(f))


def test_nan_and_wrong_shape_files_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = so.save(so.SteeringVector({2: torch.ones(D)}), tmp_path / "v")
    tensors = load_file(str(folder / persist.TENSORS_FILE))
    for name, bad in (("nan", {"layer.2.vector": torch.full((D,), math.nan)}),
                      ("shape", {"layer.2.vector": torch.ones(D + 1)}),
                      ("dtype", {"layer.2.vector": torch.ones(D, dtype=torch.int32)}),
                      ("extra", {**tensors, "layer.3.vector": torch.ones(D)})):
        save_file(bad, str(folder / persist.TENSORS_FILE))
        _rehash(folder)
        with pytest.raises(persist.SteeringFileError, match="NaN|shape|dtype|unexpected"):
            so.load(folder)
        assert name
    torch.save({2: torch.full((D,), math.inf)}, tmp_path / "inf.pt")
    np.savez(tmp_path / "nan.npz", layer_2=np.full(D, np.nan))
    for f in (tmp_path / "inf.pt", tmp_path / "nan.npz"):
        with pytest.raises(persist.SteeringFileError, match="NaN or infinite"):
            so.load(f)


# --------------------------------------------------------------------------------- malicious pickles


class Payload:
    """Unpickling this runs ``exec``, which creates the marker file: proof that the payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({2: Payload(marker)}, protocol=2)


def _torch_zip(path: Path, marker: Path, obj: Callable[[Path], Any] = lambda m: {2: Payload(m)}) -> Path:
    torch.save(obj(marker), path)
    return path


def _plant(d: Path, marker: Path) -> dict[str, tuple[Callable[[], Any], ...]]:
    """Every load path, each fed a file whose unpickling would create ``marker``."""
    raw = _pickle_bytes(marker)
    paths: dict[str, tuple[Callable[[], Any], ...]] = {}

    pt = _torch_zip(d / "dict.pt", marker)
    (d / "raw.pt").write_bytes(raw)
    (d / "raw.pth").write_bytes(raw)
    paths["tensor-dict .pt (zip)"] = (lambda: so.load(pt), lambda: persist.import_tensors(pt))
    paths["tensor-dict .pt (raw pickle)"] = (lambda: so.load(d / "raw.pt"),
                                             lambda: persist.import_tensors(d / "raw.pt"))
    paths["tensor-dict .pth (raw pickle)"] = (lambda: so.load(d / "raw.pth"),)

    legacy = d / "legacy"
    legacy.mkdir()
    _torch_zip(legacy / "vec.pt", marker, lambda m: Payload(m))
    (legacy / "vec.json").write_text(json.dumps({"layer_index": 1}))
    paths["legacy .json + .pt"] = (lambda: so.load(legacy / "vec.json"), lambda: so.load(legacy / "vec.pt"),
                                   lambda: so.load(legacy / "vec"), lambda: persist.import_legacy(legacy / "vec.pt"))
    legacy_set = d / "legacy_set"
    legacy_set.mkdir()
    (legacy_set / "metadata.json").write_text(json.dumps({"layers": [0]}))
    (legacy_set / "layer_0.json").write_text(json.dumps({"layer_index": 0}))
    (legacy_set / "layer_0.pt").write_bytes(raw)
    paths["legacy set folder"] = (lambda: so.load(legacy_set), lambda: persist.import_legacy(legacy_set))

    npz = d / "obj.npz"
    np.savez(npz, layer_2=np.array([Payload(marker)], dtype=object))
    paths[".npz with an object array"] = (lambda: so.load(npz), lambda: persist.import_tensors(npz))

    folder = so.save(_vector(), d / "folder")
    (folder / persist.TENSORS_FILE).write_bytes(raw)
    _rehash(folder)
    paths["vector folder"] = (lambda: so.load(folder), lambda: so.SteeringVector.from_pretrained(folder),
                              lambda: persist.load_vector(folder))
    paths["metadata only (reads no tensors)"] = (lambda: persist.read_metadata(folder),)
    sset = so.save({"a": _vector()}, d / "set")
    sub = next(p for p in sset.iterdir() if p.is_dir())
    (sub / persist.TENSORS_FILE).write_bytes(raw)
    _rehash(sub)
    paths["set folder"] = (lambda: so.load(sset),)

    for suffix in (".safetensors", ".gguf", ".jsonl", ".json"):
        (d / f"p{suffix}").write_bytes(raw)
    paths[".safetensors"] = (lambda: so.load(d / "p.safetensors"), lambda: persist.read_metadata(d / "p.safetensors"))
    paths[".gguf"] = (lambda: so.load(d / "p.gguf"), lambda: so.import_gguf(d / "p.gguf"))
    paths["JSONL"] = (lambda: so.load_datapoints(d / "p.jsonl"), lambda: so.load_contrast_pairs(d / "p.jsonl"))
    paths[".json"] = (lambda: so.load(d / "p.json"),)

    from steering_opt.cli import main

    paths["CLI info / export"] = (lambda: main(["info", str(d / "raw.pt")]),
                                  lambda: main(["export", str(pt), "--out", str(d / "o.gguf")]))
    return paths


def test_malicious_pickle_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PWNED"
    pickle.loads(_pickle_bytes(marker))  # the payload works: unpickling it does create the marker
    assert marker.read_text() == "pwned"
    marker.unlink()
    paths = _plant(tmp_path, marker)
    tried = 0
    for name, calls in paths.items():
        for call in calls:
            try:
                result = call()
            except (persist.SteeringFileError, JSONLError) as e:
                assert "pwned" not in str(e)
            except SystemExit as e:
                assert e.code == 2, name
            else:
                assert (name.startswith("CLI") and result == 2) or (name.startswith("metadata only") and
                                                                    isinstance(result, dict)), f"{name}: {result!r}"
            tried += 1
            assert not marker.exists(), f"the pickle payload ran via {name}"
    assert tried >= 20


def test_malicious_pickle_in_a_model_folder_never_runs(tmp_path: Path, tokenizer: Any) -> None:
    """load_model on a folder whose weights file is a malicious pickle: refused, payload never run."""
    from transformers import AutoConfig

    marker = tmp_path / "PWNED"
    folder = tmp_path / "model"
    AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _torch_zip(folder / "pytorch_model.bin", marker, lambda m: {"model.embed_tokens.weight": Payload(m)})
    with pytest.raises(Exception) as info:  # transformers' own error type
        so.load_model(str(folder))
    assert not marker.exists(), "the pickle payload ran via load_model"
    assert "weights_only" in str(info.value) or "Unpickl" in repr(info.value) or "unsafe" in str(info.value).lower()
