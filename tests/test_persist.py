"""Saving, loading, legacy import and GGUF / plain-tensor export of steering vectors (steering_opt.persist)."""

from __future__ import annotations

import builtins
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_HIDDEN, make_tiny_model
from safetensors.torch import save_file

import steering_opt as so
from steering_opt import persist
from steering_opt.fsutil import sha256_file
from steering_opt.persist import SteeringFileError
from steering_opt.vector import SteeringVector

D = TINY_HIDDEN
VOCAB = 300  # tiny models only need a small vocabulary here


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return make_tiny_model("llama", VOCAB, seed=1)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, ids: torch.Tensor, vec: SteeringVector | None = None,
            multiplier: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        if vec is None:
            return model(ids).logits
        with vec.apply(model, multiplier=multiplier):
            return model(ids).logits


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def make_vector(kind: str) -> SteeringVector:
    """Vectors of every kind (large enough that steering visibly changes the logits)."""
    if kind == "additive":
        return SteeringVector({1: _rand(D, seed=1, scale=3.0)}, metadata={"method": "test", "loss": 1.25})
    if kind == "clamp":
        return SteeringVector({2: _rand(D, seed=2, scale=2.0)}, clamp=1.5)
    if kind == "affine":
        return SteeringVector({1: _rand(D, seed=3)}, affine={1: (_rand(2, D, seed=4), _rand(2, D, seed=5))})
    if kind == "multi_layer":
        return SteeringVector({0: _rand(D, seed=6), 2: _rand(D, seed=7), 3: _rand(D, seed=8)})
    if kind == "multi_layer_affine":
        left, right = _rand(3, D, seed=9), _rand(3, D, seed=10)
        return SteeringVector({1: _rand(D, seed=11), 3: _rand(D, seed=12)},
                              affine={1: (left, right), 3: (left * 0.5, right)})
    if kind == "mlp_site":
        return SteeringVector({2: _rand(D, seed=13, scale=2.0)}, layer_type="mlp")
    if kind == "bfloat16":
        return SteeringVector({1: _rand(D, seed=14, scale=3.0).to(torch.bfloat16)})
    raise ValueError(kind)


KINDS = ["additive", "clamp", "affine", "multi_layer", "multi_layer_affine", "mlp_site", "bfloat16"]


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("form", ["folder", "file"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_bitwise_identical_logits(kind: str, form: str, llama: torch.nn.Module, ids: torch.Tensor,
                                             tmp_path: Path) -> None:
    vec = make_vector(kind)
    before = _logits(llama, ids, vec)
    assert not torch.equal(before, _logits(llama, ids)), "the test vector must actually steer"
    path = tmp_path / ("v" if form == "folder" else "v.safetensors")
    assert so.save(vec, path, model=llama) == path
    loaded = so.load(path, model=llama)
    assert isinstance(loaded, SteeringVector)
    assert (loaded.kind, loaded.layer_type, loaded.layers, loaded.clamp) == (vec.kind, vec.layer_type, vec.layers,
                                                                           vec.clamp)
    for layer in vec.layers:
        assert loaded.layer_activations[layer].dtype == vec.layer_activations[layer].dtype
        assert torch.equal(loaded.layer_activations[layer], vec.layer_activations[layer])
    assert torch.equal(_logits(llama, ids, loaded), before)
    assert torch.equal(_logits(llama, ids, loaded, multiplier=-0.5), _logits(llama, ids, vec, multiplier=-0.5))
    # the metadata records the model and the kind
    meta = persist.read_metadata(path)
    assert meta["kind"] == vec.kind and meta["site"] == vec.layer_type and meta["layers"] == vec.layers
    assert meta["metadata"]["model"]["hidden_size"] == D and meta["metadata"]["model"]["num_layers"] == 4
    assert meta["metadata"]["model"]["architecture"] == "LlamaForCausalLM"
    assert meta["metadata"]["library_version"] == so.__version__
    assert meta["affine_rank"] == (None if vec.affine is None else next(iter(vec.affine.values()))[0].shape[0])


def test_save_pretrained_from_pretrained_and_resave(llama: torch.nn.Module, ids: torch.Tensor, tmp_path: Path) -> None:
    vec = make_vector("affine")
    vec.save_pretrained(tmp_path / "a", model=llama, metadata={"hyperparameters": {"lr": 0.1}})
    loaded = SteeringVector.from_pretrained(tmp_path / "a", model=llama)
    assert loaded.metadata["hyperparameters"] == {"lr": 0.1}
    created = loaded.metadata["created_at"]
    loaded.save_pretrained(tmp_path / "b")  # keeps the recorded model and creation time
    again = SteeringVector.from_pretrained(tmp_path / "b", model=llama)
    assert again.metadata["created_at"] == created
    assert again.metadata["model"]["architecture"] == "LlamaForCausalLM"
    assert torch.equal(_logits(llama, ids, again), _logits(llama, ids, vec))


def test_optimised_vectors_round_trip(llama: torch.nn.Module, ids: torch.Tensor, tokenizer, tmp_path: Path) -> None:
    """The optimiser's own outputs (affine factors from info, a shared multi-layer vector, clamp, joint)."""
    tok = tokenizer
    dp = so.TrainingDatapoint("Hello there", dst_completions=[" friend"], src_completions=[" enemy"])
    model = make_tiny_model("llama", len(tok), seed=2)
    x = torch.randint(3, len(tok), (1, 6), generator=torch.Generator().manual_seed(1))
    v, m, info = so.optimize_vector(model, [dp], 1, tokenizer=tok, max_iters=2, lr=0.1, affine_rank=2, seed=0)
    affine = SteeringVector.from_optimization(v, info, 1)
    v2, info2 = so.optimize_vector(model, [dp], [1, 2], tokenizer=tok, max_iters=2, lr=0.1, seed=0)
    shared = SteeringVector.from_optimization(v2, info2, [1, 2])  # one tensor shared by two layers
    v3, info3 = so.optimize_vector(model, [dp], 2, tokenizer=tok, max_iters=2, lr=0.1, vector_clamp=1.0, seed=0)
    clamp = SteeringVector.from_optimization(v3, info3, 2, clamp=1.0)
    vs, info4 = so.optimize_vectors(model, [dp], [0, 3], tokenizer=tok, max_iters=2, lr=0.1, seed=0)
    joint = SteeringVector.from_optimization(vs, info4)
    for i, vec in enumerate([affine, shared, clamp, joint]):
        so.save(vec, tmp_path / f"v{i}", model=model)
        loaded = so.load(tmp_path / f"v{i}", model=model)
        assert torch.equal(_logits(model, x, loaded), _logits(model, x, vec))
        assert loaded.metadata["final_loss"] == pytest.approx(vec.metadata["loss"])
        assert loaded.metadata["loss_units"] == "nats"


def test_named_set_round_trip(llama: torch.nn.Module, ids: torch.Tensor, tmp_path: Path) -> None:
    vectors = {"refusal": make_vector("additive"), "my style/2": make_vector("clamp"),
               "affine": make_vector("affine")}
    path = so.save(vectors, tmp_path / "set", model=llama)
    assert (path / persist.SET_FILE).is_file()
    loaded = so.load(path, model=llama)
    assert isinstance(loaded, dict) and list(loaded) == list(vectors)  # names and order kept
    for name, vec in vectors.items():
        assert torch.equal(_logits(llama, ids, loaded[name]), _logits(llama, ids, vec))
    # applied together (as MultiVectorInjector would), identical too
    with torch.no_grad(), loaded["refusal"].apply(llama), loaded["affine"].apply(llama, multiplier=0.5):
        together_loaded = llama(ids).logits
    with torch.no_grad(), vectors["refusal"].apply(llama), vectors["affine"].apply(llama, multiplier=0.5):
        together = llama(ids).logits
    assert torch.equal(together_loaded, together)
    with pytest.raises(SteeringFileError, match="set of 3 named vectors"):
        SteeringVector.from_pretrained(path)
    # a member folder loads on its own
    entry = json.loads((path / persist.SET_FILE).read_text())["vectors"][0]
    assert torch.equal(so.load(path / entry["path"]).layer_activations[1], vectors["refusal"].layer_activations[1])


def test_load_to_device_and_repr(tmp_path: Path) -> None:
    vec = make_vector("multi_layer")
    so.save(vec, tmp_path / "v")
    loaded = so.load(tmp_path / "v", device="cpu")
    assert all(t.device.type == "cpu" for t in loaded.layer_activations.values())
    assert "additive" in repr(loaded)


# ----------------------------------------------------------------------------------------------- refusals


def _saved(tmp_path: Path, form: str = "folder") -> Path:
    path = tmp_path / ("v" if form == "folder" else "v.safetensors")
    return so.save(make_vector("multi_layer"), path)


@pytest.mark.parametrize("form", ["folder", "file"])
def test_truncated_file_refused(form: str, tmp_path: Path) -> None:
    path = _saved(tmp_path, form)
    tfile = path / persist.TENSORS_FILE if form == "folder" else path
    data = tfile.read_bytes()
    for cut in (len(data) // 2, 20, 5):
        tfile.write_bytes(data[:cut])
        with pytest.raises(SteeringFileError, match="truncated") as info:
            so.load(path)
        assert str(tfile) in str(info.value)


def test_truncated_metadata_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    meta = path / persist.VECTOR_FILE
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(SteeringFileError, match=r"invalid JSON.*truncated"):
        so.load(path)


def _rewrite_single_file(path: Path, tensors: dict[str, torch.Tensor], edit_doc=None) -> None:
    """Rewrite a single-file save with other tensors (and optionally edited metadata), as a tamperer would."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()[persist.HEADER_KEY])
    if edit_doc is not None:
        edit_doc(doc)
    save_file(tensors, str(path), metadata={persist.HEADER_KEY: json.dumps(doc)})


def test_nan_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path, "file")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["layer.2.vector"][5] = float("nan")
    _rewrite_single_file(path, tensors)
    with pytest.raises(SteeringFileError, match=r"layer\.2\.vector.*NaN"):
        so.load(path)
    # an infinite value in a folder save whose checksum was recomputed
    folder = _saved(tmp_path / "f")
    tensors = load_file(str(folder / persist.TENSORS_FILE))
    tensors["layer.0.vector"][0] = float("inf")
    save_file(tensors, str(folder / persist.TENSORS_FILE), metadata={"format": "steering_opt.vector"})
    doc = json.loads((folder / persist.VECTOR_FILE).read_text())
    doc["sha256"] = sha256_file(folder / persist.TENSORS_FILE)
    (folder / persist.VECTOR_FILE).write_text(json.dumps(doc))
    with pytest.raises(SteeringFileError, match="NaN or infinite"):
        so.load(folder)
    # and nothing non-finite is ever written
    bad = SteeringVector({1: torch.full((D,), float("nan"))})
    with pytest.raises(ValueError, match="NaN"):
        so.save(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_shapes_not_matching_metadata_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    meta = path / persist.VECTOR_FILE
    doc = json.loads(meta.read_text())
    doc["hidden_size"] = 32
    meta.write_text(json.dumps(doc))
    with pytest.raises(SteeringFileError, match=r"shape \(64,\).*metadata says \(32,\)"):
        so.load(path)
    # a layer listed in the metadata without its tensor
    doc["hidden_size"] = D
    doc["layers"] = [0, 1, 2, 3]
    meta.write_text(json.dumps(doc))
    with pytest.raises(SteeringFileError, match=r"missing: \['layer\.1\.vector'\]"):
        so.load(path)
    # single file: tensors of another shape than its header declares
    single = _saved(tmp_path, "file")
    _rewrite_single_file(single, {f"layer.{k}.vector": torch.zeros(D + 1) for k in (0, 2, 3)})
    with pytest.raises(SteeringFileError, match="shape"):
        so.load(single)
    # affine factors of the wrong rank
    so.save(make_vector("affine"), tmp_path / "aff.safetensors")
    _rewrite_single_file(tmp_path / "aff.safetensors", {"layer.1.vector": torch.zeros(D),
                                                         "layer.1.affine_left": torch.zeros(3, D),
                                                         "layer.1.affine_right": torch.zeros(3, D)})
    with pytest.raises(SteeringFileError, match="affine_rank 2"):
        so.load(tmp_path / "aff.safetensors")


def test_dtype_not_matching_metadata_refused(tmp_path: Path) -> None:
    single = _saved(tmp_path, "file")
    _rewrite_single_file(single, {f"layer.{k}.vector": torch.zeros(D, dtype=torch.float16) for k in (0, 2, 3)})
    with pytest.raises(SteeringFileError, match="dtype float16, the metadata says 'float32'"):
        so.load(single)
    _rewrite_single_file(single, {f"layer.{k}.vector": torch.zeros(D, dtype=torch.int32) for k in (0, 2, 3)})
    with pytest.raises(SteeringFileError, match="floating-point"):
        so.load(single)


def test_modified_tensor_file_refused_by_checksum(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    other = {f"layer.{k}.vector": torch.zeros(D) for k in (0, 2, 3)}
    save_file(other, str(path / persist.TENSORS_FILE))
    with pytest.raises(SteeringFileError, match="checksum"):
        so.load(path)


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # noqa: D105
        return (builtins.open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    # the payload is live: plain pickle would run it
    probe = tmp_path / "probe_ran"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    # 1. legacy .json + .pt whose .pt is a torch.save'd payload, and a raw pickle file
    legacy = tmp_path / "legacy" / "refusal_layer_3"
    legacy.parent.mkdir()
    legacy.with_suffix(".json").write_text(json.dumps({"behavior": "refusal", "layer_index": 3, "model_name": "m",
                                                       "vector_shape": [D]}))
    torch.save({"vector": _Payload(marker)}, legacy.with_suffix(".pt"))
    for p in (legacy, legacy.with_suffix(".pt"), legacy.with_suffix(".json")):
        with pytest.raises(SteeringFileError, match=r"weights_only=True"):
            so.load(p)
    with legacy.with_suffix(".pt").open("wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(SteeringFileError, match="refused"):
        so.load(legacy)
    # 2. a pickle disguised as a safetensors file (single file, and inside a vector folder)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(SteeringFileError, match="not a valid safetensors file"):
        so.load(fake)
    folder = _saved(tmp_path / "f")
    (folder / persist.TENSORS_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    doc = json.loads((folder / persist.VECTOR_FILE).read_text())
    doc["sha256"] = sha256_file(folder / persist.TENSORS_FILE)
    (folder / persist.VECTOR_FILE).write_text(json.dumps(doc))
    with pytest.raises(SteeringFileError, match="not a valid safetensors file"):
        so.load(folder)
    assert not marker.exists(), "the pickle payload ran"


def test_vector_for_another_hidden_size_refused(llama: torch.nn.Module, tmp_path: Path) -> None:
    other = make_tiny_model("llama", VOCAB, hidden_size=32, intermediate_size=64, head_dim=8)
    other.config._name_or_path = "org/small-llama"
    llama.config._name_or_path = "org/tiny-llama"
    try:
        vec = SteeringVector({1: _rand(32, seed=0)})
        so.save(vec, tmp_path / "v32", model=other)
        for allow in (False, True):  # never applicable, even with the override
            with pytest.raises(ValueError, match=r"'org/small-llama'.*hidden size 32.*'org/tiny-llama'.*hidden size "
                                                 r"64") as info:
                so.load(tmp_path / "v32", model=llama, allow_mismatch=allow)
            assert "cannot be applied" in str(info.value)
        with pytest.raises(ValueError, match="hidden size 32"):  # applying directly is refused too
            vec.apply(llama).__enter__()
    finally:
        llama.config._name_or_path = ""


def test_other_architecture_refused_unless_overridden(llama: torch.nn.Module, ids: torch.Tensor, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    gpt2 = make_tiny_model("gpt2", VOCAB)
    so.save(make_vector("additive"), tmp_path / "v", model=llama)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*GPT2LMHeadModel.*allow_mismatch=True"):
        so.load(tmp_path / "v", model=gpt2)
    with caplog.at_level(logging.WARNING, logger="steering_opt.persist"):
        vec = so.load(tmp_path / "v", model=gpt2, allow_mismatch=True)
    assert "applying it anyway" in caplog.text
    with torch.no_grad(), vec.apply(gpt2):
        assert torch.isfinite(gpt2(ids).logits).all()
    # fewer layers than the vector steers: never applicable
    deep = SteeringVector({5: _rand(D, seed=0)})
    so.save(deep, tmp_path / "deep")
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\].*only 4 layers"):
        so.load(tmp_path / "deep", model=llama, allow_mismatch=True)


def test_unknown_paths_and_versions(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no steering vector"):
        so.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SteeringFileError, match="not a steering_opt save"):
        so.load(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SteeringFileError, match="unknown file type"):
        so.load(tmp_path / "x.txt")
    path = _saved(tmp_path)
    doc = json.loads((path / persist.VECTOR_FILE).read_text())
    doc["format_version"] = persist.FORMAT_VERSION + 1
    (path / persist.VECTOR_FILE).write_text(json.dumps(doc))
    with pytest.raises(SteeringFileError, match="format_version 2 is not supported"):
        so.load(path)
    # a set manifest pointing outside its folder is refused
    s = so.save({"a": make_vector("additive")}, tmp_path / "set")
    manifest = json.loads((s / persist.SET_FILE).read_text())
    manifest["vectors"][0]["path"] = "../v"
    (s / persist.SET_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SteeringFileError, match="outside the folder"):
        so.load(s)


def test_save_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="SteeringVector"):
        so.save(torch.zeros(3), tmp_path / "v")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        so.save(SteeringVector({1: torch.ones(D)}, metadata={"obj": object()}), tmp_path / "v")
    with pytest.raises(ValueError, match="empty"):
        so.save({}, tmp_path / "v")
    with pytest.raises(ValueError, match="'.pt'"):
        so.save(make_vector("additive"), tmp_path / "v.pt")
    assert not any(tmp_path.iterdir()), "failed saves leave nothing behind"


# ----------------------------------------------------------------------------------------------- atomicity


def test_interrupted_save_leaves_nothing_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    llama: torch.nn.Module, ids: torch.Tensor) -> None:
    import safetensors.torch as st

    real_save = st.save_file

    def crash_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # half the bytes reached the disk...
        raise KeyboardInterrupt  # ...then the process was interrupted

    old = make_vector("additive")
    so.save(old, tmp_path / "v")
    so.save(old, tmp_path / "v.safetensors")
    new = make_vector("clamp")
    monkeypatch.setattr(st, "save_file", crash_midway)
    for target in ("v", "v.safetensors", "fresh", "fresh.safetensors"):
        with pytest.raises(KeyboardInterrupt):
            so.save(new, tmp_path / target)
    with pytest.raises(KeyboardInterrupt):
        so.save({"a": new, "b": old}, tmp_path / "set")
    monkeypatch.undo()
    # the earlier saves are intact; nothing new exists; no temporary files are left
    for target in ("v", "v.safetensors"):
        assert torch.equal(_logits(llama, ids, so.load(tmp_path / target)), _logits(llama, ids, old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v", "v.safetensors"]


def test_interrupted_rename_keeps_old_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = make_vector("additive")
    so.save(old, tmp_path / "v")
    real_rename = os.rename
    calls = []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old folder moved aside, new folder about to move in
            raise OSError("disk vanished")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="disk vanished"):
        so.save(make_vector("multi_layer"), tmp_path / "v")
    monkeypatch.undo()
    assert torch.equal(so.load(tmp_path / "v").layer_activations[1], old.layer_activations[1])
    assert [p.name for p in tmp_path.iterdir()] == ["v"]


def test_save_never_replaces_foreign_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "my_experiment"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a steering_opt save"):
        so.save(make_vector("additive"), folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        so.save(make_vector("additive"), tmp_path / "file")
    assert (folder / "notes.txt").read_text() == "precious"
    # an empty folder and an earlier save (vector or set) are fine to replace
    (tmp_path / "empty").mkdir()
    so.save(make_vector("additive"), tmp_path / "empty")
    so.save({"a": make_vector("additive")}, tmp_path / "empty")
    assert isinstance(so.load(tmp_path / "empty"), dict)
    # the current folder is never swapped out from under the process
    with monkeypatch.context() as m:
        m.chdir(tmp_path / "empty")
        with pytest.raises(ValueError, match="current working folder"):
            so.save(make_vector("additive"), ".")
        so.save(make_vector("additive"), "sub")
        assert so.load("sub").layers == [1]


# ------------------------------------------------------------------------------------------- legacy import


def _legacy_hook_logits(model: torch.nn.Module, ids: torch.Tensor, layer_index: int,
                        vector: torch.Tensor) -> torch.Tensor:
    """What rotalabs-steer's injector does: add the vector to the OUTPUT of block ``layer_index``."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vector,) + output[1:]
        return output + vector

    handle = so.get_blocks(model)[layer_index].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        handle.remove()


def test_legacy_json_pt_import(llama: torch.nn.Module, ids: torch.Tensor, tmp_path: Path) -> None:
    v = _rand(D, seed=3, scale=3.0)
    base = tmp_path / "vectors" / "refusal_layer_1"
    base.parent.mkdir()
    base.with_suffix(".json").write_text(json.dumps({
        "behavior": "refusal", "layer_index": 1, "model_name": "Qwen/Qwen2.5-0.5B", "extraction_method": "caa",
        "metadata": {"created_at": "2024-01-01T00:00:00"}, "vector_shape": [D]}))
    torch.save(v, base.with_suffix(".pt"))
    for p in (base, base.with_suffix(".pt"), base.with_suffix(".json")):
        vec = so.load(p)
        assert vec.layers == [2] and vec.layer_type == "decoder_block"  # output of block 1 = input of block 2
        assert vec.metadata["legacy_layer_index"] == 1 and vec.metadata["behavior"] == "refusal"
        assert vec.metadata["model"]["name_or_path"] == "Qwen/Qwen2.5-0.5B"
        assert torch.equal(vec.layer_activations[2], v)
    # steering with the import is exactly what the legacy injector did
    assert torch.equal(_logits(llama, ids, vec), _legacy_hook_logits(llama, ids, 1, v))
    # a legacy set folder becomes one multi-layer vector; it re-saves in the new format
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps({"behavior": "refusal", "layers": [0, 2], "model_name": "m"}))
    for i in (0, 2):
        (folder / f"layer_{i}.json").write_text(json.dumps({"behavior": "refusal", "layer_index": i,
                                                            "model_name": "m", "vector_shape": [D]}))
        torch.save(_rand(D, seed=i), folder / f"layer_{i}.pt")
    vec = so.load(folder)
    assert vec.layers == [1, 3]
    so.save(vec, tmp_path / "converted")
    assert torch.equal(so.load(tmp_path / "converted").layer_activations[3], _rand(D, seed=2))
    # a shape that disagrees with vector_shape is refused
    torch.save(_rand(D + 1, seed=0), base.with_suffix(".pt"))
    with pytest.raises(SteeringFileError, match="does not match vector_shape"):
        so.load(base)


# ------------------------------------------------------------------------------------------------ GGUF


def test_gguf_export_read_back_by_gguf_package(llama: torch.nn.Module, ids: torch.Tensor, tmp_path: Path) -> None:
    import gguf

    vec = SteeringVector({2: _rand(D, seed=1), 3: _rand(D, seed=2)})
    so.save(vec, tmp_path / "v", model=llama)
    vec = so.load(tmp_path / "v")
    out = persist.export_gguf(vec, tmp_path / "v.gguf", multiplier=2.0)
    reader = gguf.GGUFReader(str(out))
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.1", "direction.2"]  # ours L -> llama.cpp L-1
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        layer = int(t.name.split(".")[1]) + 1
        np.testing.assert_array_equal(np.asarray(t.data), (vec.layer_activations[layer] * 2.0).numpy())

    def field(name: str):
        f = reader.get_field(name)
        return f.contents() if hasattr(f, "contents") else bytes(f.parts[-1]).decode()

    assert field("general.architecture") == "controlvector"
    assert field("controlvector.model_hint") == "llama"
    assert int(field("controlvector.layer_count")) == 2
    # importing gives the same tensors back, at our layer numbers
    back = so.load(out)
    assert back.layers == [2, 3]
    for layer in (2, 3):
        assert torch.equal(back.layer_activations[layer], vec.layer_activations[layer] * 2.0)
    # semantics: direction.{il} added to the output of block il == our vector at layer il + 1
    assert torch.equal(_legacy_hook_logits(llama, ids, 1, back.layer_activations[2]),
                       _logits(llama, ids, SteeringVector({2: back.layer_activations[2]})))


def test_gguf_export_refusals(tmp_path: Path) -> None:
    for layers in ([0], [1], [1, 3]):
        with pytest.raises(ValueError, match=r"cannot be exported.*direction\.\{L-1\}"):
            persist.export_gguf(SteeringVector({k: torch.ones(D) for k in layers}), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="clamp"):
        persist.export_gguf(make_vector("clamp"), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="affine"):
        persist.export_gguf(make_vector("affine"), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="'mlp' site"):
        persist.export_gguf(make_vector("mlp_site"), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match=r"\.gguf"):
        persist.export_gguf(SteeringVector({2: torch.ones(D)}), tmp_path / "x.bin")
    with pytest.raises(TypeError, match="multiplier"):
        persist.export_gguf(SteeringVector({2: torch.ones(D)}), tmp_path / "x.gguf", multiplier="2")
    assert not any(tmp_path.iterdir())
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(SteeringFileError, match="not a valid GGUF file"):
        so.load(tmp_path / "bad.gguf")


# ---------------------------------------------------------------------------------------- plain tensors


def test_export_plain_tensors(tmp_path: Path) -> None:
    vec = make_vector("multi_layer")
    pt = persist.export_tensors(vec, tmp_path / "v.pt")
    data = torch.load(pt, weights_only=True)
    assert sorted(data) == [0, 2, 3]
    assert all(torch.equal(data[k], vec.layer_activations[k]) for k in data)
    npz = np.load(persist.export_tensors(vec, tmp_path / "v.npz", multiplier=-1.0))
    assert sorted(npz.files) == ["layer_0", "layer_2", "layer_3"]
    np.testing.assert_array_equal(npz["layer_2"], -vec.layer_activations[2].numpy())
    single = make_vector("additive")
    arr = np.load(persist.export_tensors(single, tmp_path / "v.npy"), allow_pickle=False)
    np.testing.assert_array_equal(arr, single.layer_activations[1].numpy())
    with pytest.raises(ValueError, match=r"3 layers.*\.npz"):
        persist.export_tensors(vec, tmp_path / "w.npy")
    with pytest.raises(ValueError, match="only additive"):
        persist.export_tensors(make_vector("affine"), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="unknown file type"):
        persist.export_tensors(vec, tmp_path / "w.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy", "v.npz", "v.pt"]
    # what export_tensors writes loads back (layers as stored)
    for name, sign in (("v.pt", 1.0), ("v.npz", -1.0)):
        back = so.load(tmp_path / name)
        assert back.layers == [0, 2, 3] and back.kind == "additive"
        assert all(torch.equal(back.layer_activations[k], sign * vec.layer_activations[k]) for k in back.layers)
    torch.save({"vector": torch.ones(D)}, tmp_path / "w.pt")
    with pytest.raises(SteeringFileError, match="int layer"):
        so.load(tmp_path / "w.pt")
    np.savez(tmp_path / "w.npz", layer_1=np.array([{"x": 1}], dtype=object))
    with pytest.raises(SteeringFileError, match="not a readable .npz"):
        so.load(tmp_path / "w.npz")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pt_pickle_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({1: _Payload(marker)}, tmp_path / "v.pt")
    with pytest.raises(SteeringFileError, match="weights_only=True"):
        so.load(tmp_path / "v.pt")
    assert not marker.exists()
