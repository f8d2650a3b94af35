"""What a saved vector says about where it came from: Python and command-line saves record the same provenance,
derived vectors (scaled, negated, summed) say so, GGUF exports carry the model fingerprint and loading them for
another model is refused, and clamp / affine runs keep their kind through a save and load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

import steering_opt as so
from steering_opt import arch, persist
from steering_opt.cli import main
from steering_opt.vector import SteeringVector

DATAPOINTS = [
    {"prompt": "The capital of France is", "dst_completions": [" Paris"], "src_completions": [" London"]},
    {"prompt": "Hello, how are", "dst_completions": [" you"]},
]
#: What every save made from an optimisation records (``steering-opt optimize`` and ``save_pretrained``).
PROVENANCE = ("options", "final_loss", "loss_units", "iters", "status", "datapoints", "model", "library_version",
              "created_at", "saved_at")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    make_tiny_model("llama", len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    return so.load_model(str(model_dir))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "dps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DATAPOINTS), encoding="utf-8")
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


# ------------------------------------------------------------------------------ Python vs CLI saves


def test_python_and_cli_saves_record_the_same_provenance(capsys, model_dir: Path, loaded, data_file: Path,
                                                         tmp_path: Path) -> None:
    model, tok = loaded
    cli(capsys, "optimize", "--model", model_dir, "--datapoints", data_file, "--layer", "1", "--max-iters", "3",
        "--lr", "0.1", "--seed", "0", "--out", tmp_path / "cli", "--no-plot")
    dps = so.load_datapoints(data_file)
    result = so.optimize(model, tok, dps, 1, so.OptimizeOptions(lr=0.1, max_iters=3, seed=0))
    result.to_steering_vector().save_pretrained(tmp_path / "py")  # nothing passed: optimize() recorded it
    from_cli, from_py = so.load(tmp_path / "cli"), so.load(tmp_path / "py")
    for vec in (from_cli, from_py):
        missing = [key for key in PROVENANCE if key not in vec.metadata]
        assert not missing, missing
        assert vec.metadata["library_version"] == so.__version__
    a, b = from_cli.metadata, from_py.metadata
    assert a["model"] == b["model"]  # fingerprint and the name the user gave (the folder)
    assert a["model"]["name_or_path"] == str(model_dir) and a["model"]["num_layers"] == 4
    assert a["datapoints"] == b["datapoints"] and len(a["datapoints"]["sha256"]) == 64
    display = {"progress", "return_on_interrupt"}  # whether a bar was shown; what Ctrl-C does (the CLI saves)
    assert {k: v for k, v in a["options"].items() if k not in display} == \
        {k: v for k, v in b["options"].items() if k not in display}
    assert a["options"]["lr"] == 0.1 and a["options"]["max_iters"] == 3
    assert a["final_loss"] == pytest.approx(b["final_loss"]) and a["iters"] == b["iters"] == 3
    torch.testing.assert_close(from_cli.layer_activations[1], from_py.layer_activations[1])


def test_datapoint_hash_tells_datasets_apart() -> None:
    dps = [so.TrainingDatapoint("a", dst_completions=[" b"])]
    same = [so.TrainingDatapoint("a", dst_completions=[" b"])]
    other = [so.TrainingDatapoint("a", dst_completions=[" c"])]
    assert persist.datapoints_sha256(dps) == persist.datapoints_sha256(same) != persist.datapoints_sha256(other)
    with pytest.raises(TypeError, match="datapoints"):
        so.save(SteeringVector({1: torch.ones(4)}), "unused", datapoints="not a list")  # type: ignore[arg-type]


@pytest.mark.embedded
def test_embedded_model_is_named_not_by_its_cache_path(embedded_model) -> None:
    assert arch.model_fingerprint(embedded_model)["name_or_path"] == "SmolLM2-135M-Instruct"


# ------------------------------------------------------------------------------------ derived vectors


def _optimised(tmp: Path) -> SteeringVector:
    return SteeringVector({1: torch.arange(4.0) + 1}, metadata={
        "method": "optimize", "loss": 1.25, "final_loss": 1.25, "iters": 7, "options": {"lr": 0.1},
        "model": {"model_type": "llama", "hidden_size": 4, "num_layers": 4, "name_or_path": "org/a"}})


@pytest.mark.parametrize("op,method,multiplier", [
    (lambda v: v * 2, "scaled", 2.0), (lambda v: 3 * v, "scaled", 3.0), (lambda v: -v, "negated", -1.0),
    (lambda v: v / 4, "scaled", 0.25), (lambda v: (v * 2) * -0.5, "negated", -1.0)])
def test_scaled_vectors_say_so(tmp_path: Path, op, method: str, multiplier: float) -> None:
    v = _optimised(tmp_path)
    d = op(v)
    m = d.metadata
    assert m["method"] == method and m["multiplier"] == multiplier
    assert not {"loss", "final_loss", "iters", "options"} & set(m)  # the source's, not this vector's
    assert m["derived_from"] == [{k: x for k, x in v.metadata.items() if k != "model"}]
    assert m["model"] == v.metadata["model"]  # still checked against the model it was made for
    assert v.metadata["final_loss"] == 1.25  # the source is untouched
    so.save(d, tmp_path / "d")
    again = so.load(tmp_path / "d")
    assert "final_loss" not in again.metadata and again.metadata["derived_from"][0]["final_loss"] == 1.25
    text = "\n".join(persist.describe(again))
    assert f"multiplier: {multiplier:g}" in text and "derived from: optimize (its final loss: 1.25 nats)" in text
    assert "final loss:" not in text.replace("its final loss", "")


def test_sums_say_so(tmp_path: Path) -> None:
    v = _optimised(tmp_path)
    w = SteeringVector({1: torch.ones(4)}, metadata={"method": "caa", "model": {"hidden_size": 4}})
    s = v + w
    assert s.metadata["method"] == "sum" and "final_loss" not in s.metadata and "model" not in s.metadata
    assert [o["method"] for o in s.metadata["derived_from"]] == ["optimize", "caa"]
    assert s.metadata["derived_from"][0]["model"]["name_or_path"] == "org/a"  # models differ: kept per source
    assert (v - v).metadata["method"] == "sum" and (v - v).metadata["model"] == v.metadata["model"]
    assert sum([v]).metadata == v.metadata  # sum() of one vector is that vector
    torch.testing.assert_close((v + w).layer_activations[1], v.layer_activations[1] + 1)


# ------------------------------------------------------------------------------------ GGUF fingerprint


def _fp(model: torch.nn.Module, name: str) -> dict:
    return {**arch.model_fingerprint(model), "name_or_path": name}


def test_gguf_carries_the_fingerprint_and_import_checks_it(tmp_path: Path, caplog) -> None:
    a = make_tiny_model("llama", 300, seed=0)
    b = make_tiny_model("llama", 300, seed=0, num_hidden_layers=6)  # same width, another model
    vec = SteeringVector({2: torch.randn(64, generator=torch.Generator().manual_seed(0))},
                         metadata={"model": _fp(a, "org/model-a")})
    so.export_gguf(vec, tmp_path / "a.gguf")
    imported = so.load(tmp_path / "a.gguf", model=a)  # for the model it was made for: fine
    assert imported.metadata["model"] == {**_fp(a, "org/model-a")}
    torch.testing.assert_close(imported.layer_activations[2], vec.layer_activations[2])
    with pytest.raises(ValueError, match=r"org/model-a.*different num_layers.*allow_mismatch"):
        so.load(tmp_path / "a.gguf", model=b)
    with caplog.at_level(logging.WARNING, logger="steering_opt.persist"):
        so.load(tmp_path / "a.gguf", model=b, allow_mismatch=True)
    assert "applying it anyway" in caplog.text
    # a model passed to the export wins over the vector's own record
    so.export_gguf(SteeringVector({2: torch.ones(64)}), tmp_path / "b.gguf", model=b)
    assert so.load(tmp_path / "b.gguf").metadata["model"]["num_layers"] == 6
    with pytest.raises(ValueError, match="different num_layers"):
        so.load(tmp_path / "b.gguf", model=a)


def test_gguf_without_fingerprint_still_imports(tmp_path: Path) -> None:
    """A control vector as repeng writes it: only model_hint and layer_count."""
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "repeng.gguf"), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor("direction.1", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = make_tiny_model("llama", 300, seed=0)
    vec = so.load(tmp_path / "repeng.gguf", model=model)
    assert vec.layers == [2] and vec.metadata["model"]["model_type"] == "llama"
    assert not {"architecture", "num_layers", "name_or_path"} & set(vec.metadata["model"])


def test_cli_export_then_generate_for_another_model_is_refused(capsys, model_dir: Path, loaded,
                                                               tokenizer, tmp_path: Path) -> None:
    model = loaded[0]
    so.save(SteeringVector({2: torch.randn(64)}), tmp_path / "v", model=model)
    cli(capsys, "export", tmp_path / "v", "--out", tmp_path / "v.gguf")
    assert so.load(tmp_path / "v.gguf").metadata["model"]["num_layers"] == 4
    other = tmp_path / "other_model"
    make_tiny_model("llama", len(tokenizer), seed=3, num_hidden_layers=3).save_pretrained(other)
    tokenizer.save_pretrained(other)
    code = main(["generate", "--model", str(other), "--prompt", "Hi", "--vector", str(tmp_path / "v.gguf"),
                 "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "different num_layers" in err and "--allow-model-mismatch" in err
    cli(capsys, "generate", "--model", model_dir, "--prompt", "Hi", "--vector", tmp_path / "v.gguf",
        "--max-new-tokens", "2")


# ------------------------------------------------------------------------------- clamp / affine kinds


@pytest.mark.parametrize("options,kind", [({"vector_clamp": 1.5}, "clamp"), ({"affine_rank": 2}, "affine")])
@pytest.mark.parametrize("suffix", ["", ".safetensors"])
def test_clamp_and_affine_runs_survive_save_and_load(loaded, tmp_path: Path, options: dict, kind: str,
                                                     suffix: str) -> None:
    model, tok = loaded
    dps = [so.TrainingDatapoint("Hello, how are", dst_completions=[" you"])]
    vec = so.optimize(model, tok, dps, 2, so.OptimizeOptions(lr=0.1, max_iters=2, seed=0, **options)) \
        .to_steering_vector()
    assert vec.kind == kind
    vec.save_pretrained(tmp_path / f"v{suffix}", model=model, datapoints=dps)
    again = SteeringVector.from_pretrained(tmp_path / f"v{suffix}", model=model)
    assert again.kind == kind and again.clamp == vec.clamp
    ids = tok("The weather is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with vec.apply(model):
            before = model(ids).logits
        with again.apply(model):
            after = model(ids).logits
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("flags,kind", [(["--vector-clamp", "1.5"], "clamp"), (["--affine-rank", "2"], "affine")])
def test_cli_clamp_and_affine_runs_keep_their_kind(capsys, model_dir: Path, loaded, tmp_path: Path, flags: list,
                                                   kind: str) -> None:
    cli(capsys, "optimize", "--model", model_dir, "--prompt", "Hello, how are", "--dst", " you", "--layer", "2",
        "--max-iters", "2", "--seed", "0", "--no-plot", "--out", tmp_path / "v", *flags)
    vec = so.load(tmp_path / "v", model=loaded[0])
    assert vec.kind == kind and vec.metadata["options"][flags[0][2:].replace("-", "_")] is not None
    out = cli(capsys, "info", tmp_path / "v")
    assert f"kind: {kind}" in out and "final loss:" in out
    scaled = tmp_path / "scaled"
    (vec * 2).save_pretrained(scaled)
    assert so.load(scaled).kind == kind
