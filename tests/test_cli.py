"""The ``steering-opt`` subcommands end to end (optimize, train, generate, evaluate, sweep, auto-steer, export,
info), their error paths and suggestions, and the JSONL schemas they read (steering_opt.jsonl).

Most tests run ``main([...])`` in-process on a tiny random Llama saved (with the SmolLM2 tokenizer) to a
temporary folder and passed as ``--model``; two run on the embedded model (marked ``embedded``), and one
runs ``python -m steering_opt`` in a subprocess to check that a user error prints no traceback.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

import steering_opt as so
from steering_opt import jsonl, persist
from steering_opt.cli import main
from steering_opt.jsonl import JSONLError

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

DATAPOINTS = [
    {"prompt": "The capital of France is", "dst_completions": [" Paris"], "src_completions": [" London"]},
    {"prompt": "Hello, how are", "dst_completions": [" you"]},
]
PAIRS = [
    {"positive": "I love this, it is wonderful", "negative": "I hate this, it is awful"},
    {"positive": "What a great day", "negative": "What a terrible day"},
    {"positive": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Lovely to see you!"}],
     "negative": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny random Llama + the SmolLM2 tokenizer, saved the way a user's model folder is."""
    folder = tmp_path_factory.mktemp("tiny_model")
    make_tiny_model("llama", len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    return so.load_model(str(model_dir))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    _write_jsonl(folder / "dps.jsonl", DATAPOINTS)
    _write_jsonl(folder / "pairs.jsonl", PAIRS)
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "Traceback" not in err
    return out


def error_lines(err: str) -> list[str]:
    """stderr without the ``loading MODEL ...`` announcement that precedes loading a model."""
    return [line for line in err.strip().splitlines() if not line.startswith("loading ")]


def run_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """A user error: exit 2, exactly one line on stderr (besides the model announcement), no traceback; returns
    that line."""
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- optimize


def test_optimize_from_jsonl_writes_vector_and_loss_curve(capsys, model_dir: Path, data_dir: Path, loaded,
                                                          tmp_path: Path) -> None:
    out_dir = tmp_path / "vec"
    out = run_ok(capsys, "optimize", "--model", model_dir, "--datapoints", data_dir / "dps.jsonl", "--layer", "1",
                 "--max-iters", "3", "--lr", "0.1", "--seed", "0", "--max-norm", "5", "--out", out_dir)
    assert f"Saved to {out_dir}" in out and "3 steps" in out
    assert (out_dir / "loss_curve.png").read_bytes().startswith(PNG_MAGIC)
    model, tok = loaded
    vec = so.load(out_dir, model=model)
    assert vec.layers == [1] and vec.kind == "additive" and float(vec.layer_activations[1].norm()) <= 5 + 1e-4
    m = vec.metadata
    assert m["method"] == "optimize_vector" and m["iters"] == 3 and m["loss_units"] == "nats"
    assert m["hyperparameters"]["lr"] == 0.1 and m["hyperparameters"]["max_norm"] == 5.0
    assert m["datapoints"]["count"] == 2 and m["datapoints"]["dst_completions"] == 2
    assert m["model"]["name_or_path"] == str(model_dir) and m["model"]["num_layers"] == 4
    # the command computes exactly what the library computes
    dps = so.load_datapoints(data_dir / "dps.jsonl")
    v, info = so.optimize_vector(model, dps, 1, tokenizer=tok, max_iters=3, lr=0.1, seed=0, max_norm=5.0)
    assert torch.equal(vec.layer_activations[1], v)
    assert m["final_loss"] == pytest.approx(info["loss"])
    assert f"{info['loss']:.4g} nats" in out


@pytest.mark.parametrize("extra,kind,layers", [
    (["--affine-rank", "2"], "affine", [2]),
    (["--vector-clamp", "2"], "clamp", [2]),
    (["--joint", "--sparsity-weight", "0.1", "--entropy-weight", "1"], "additive", [1, 2]),
    (["--per-completion-target", "--target-loss", "0.5", "--normalize-token-length"], "additive", [1, 2]),
    (["--target-loss", "100", "--output-constr", "--max-output-constr-iters", "2", "--noise-scale", "0.1"],
     "additive", [2]),
])
def test_optimize_kinds_and_options(capsys, model_dir: Path, data_dir: Path, loaded, tmp_path: Path, extra: list,
                                    kind: str, layers: list) -> None:
    layer_args = [str(x) for x in layers]
    out_file = tmp_path / "v.safetensors"
    run_ok(capsys, "optimize", "--model", model_dir, "--prompt", "Hello, how are", "--dst", " you", " we",
           "--src", " they", "--layer", *layer_args, "--max-iters", "2", "--lr", "0.05", "--seed", "1",
           "--out", out_file, *extra)
    vec = so.load(out_file, model=loaded[0])
    assert vec.kind == kind and vec.layers == layers
    assert (tmp_path / "v.loss_curve.png").read_bytes().startswith(PNG_MAGIC)
    if "--joint" in extra:
        assert not torch.equal(vec.layer_activations[1], vec.layer_activations[2])
        assert vec.metadata["method"] == "optimize_vectors"
    elif len(layers) > 1:  # several layers share one vector
        assert torch.equal(vec.layer_activations[1], vec.layer_activations[2])
    assert isinstance(vec.metadata["final_loss"], float)
    if "--output-constr" in extra:
        assert vec.metadata["output_constr_iters"] >= 1 and vec.metadata["constraints_satisfied"] is True


# --------------------------------------------------------------------------------------------------- train


@pytest.mark.parametrize("aggregator", ["mean", "pca", "logistic"])
def test_train_from_pairs(capsys, model_dir: Path, data_dir: Path, loaded, tmp_path: Path, aggregator: str) -> None:
    from steering_opt import contrastive

    out = run_ok(capsys, "train", "--model", model_dir, "--pairs", data_dir / "pairs.jsonl", "--layer", "1", "3",
                 "--aggregator", aggregator, "--out", tmp_path / "t")
    assert "from 3 pairs" in out
    model, tok = loaded
    vec = so.load(tmp_path / "t", model=model)
    assert vec.layers == [1, 3]
    assert vec.metadata["hyperparameters"]["aggregator"] == aggregator
    agg = getattr(contrastive, f"{aggregator}_aggregator")()
    # the command is the native contrastive_vector (steering_opt's layer numbering)
    ref = contrastive.contrastive_vector(model, tok, so.load_contrast_pairs(data_dir / "pairs.jsonl"), [1, 3],
                                        aggregator=agg)
    for layer in (1, 3):
        assert torch.equal(vec.layer_activations[layer], ref.layer_activations[layer])


# ------------------------------------------------------------------------------------------------ generate


def test_generate_with_two_vectors_and_multipliers(capsys, model_dir: Path, loaded, tmp_path: Path) -> None:
    model, tok = loaded
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    a = so.SteeringVector({1: torch.randn(d, generator=g) * 4})
    b = so.SteeringVector({2: torch.randn(d, generator=g) * 4}, clamp=1.0)
    so.save(a, tmp_path / "a", model=model)
    so.save({"b": b}, tmp_path / "set", model=model)
    out = run_ok(capsys, "generate", "--model", model_dir, "--prompt", "Hello", "--prompt", "The capital of",
                 "--vector", tmp_path / "a", "2", "--vector", tmp_path / "set", "--compare", "--max-new-tokens", "6",
                 "--output", tmp_path / "gen.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "The capital of"]

    def greedy(prompt: str) -> str:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    for row in rows:  # what produced each line
        assert row["steering"] == [{"vector": str(tmp_path / "a"), "multiplier": 2.0, "method": None},
                                   {"vector": f"{tmp_path / 'set'} [b]", "multiplier": 1.0, "method": None}]
        assert row["settings"]["model"] == str(model_dir) and row["settings"]["max_new_tokens"] == 6
        assert row["settings"]["temperature"] == 0.0 and row["settings"]["chat"] is False
    for row in rows:
        assert row["unsteered"] == greedy(row["prompt"])
        with a.apply(model, multiplier=2.0), b.apply(model):
            assert row["steered"] == greedy(row["prompt"])
        assert row["steered"] != row["unsteered"]
        assert f"steered ({tmp_path / 'a'} x2, {tmp_path / 'set'} [b] x1): {row['steered']}" in out


def test_generate_sampling_is_seeded(capsys, model_dir: Path) -> None:
    args = ["generate", "--model", model_dir, "--prompt", "Hi", "--temperature", "1.0", "--top-k", "50",
            "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "5"]
    assert run_ok(capsys, *args) == run_ok(capsys, *args)


# --------------------------------------------------------------------------------------------------- sweep


def test_sweep_table_heatmap_and_recommendation(capsys, model_dir: Path, data_dir: Path, loaded,
                                                 tmp_path: Path) -> None:
    """The command is steering_opt.sweep.sweep: its table (CSV/JSON), its choice, its heatmap."""
    from steering_opt.sweep import sweep

    out = run_ok(capsys, "sweep", "--model", model_dir, "--datapoints", data_dir / "dps.jsonl", "--layers", "1", "3",
                 "--strengths", "0", "1", "2", "--max-iters", "3", "--out", tmp_path / "sw", "--save-vectors")
    assert "Best by margin (higher is better): layer" in out and "| layer | variant | multiplier |" in out
    rows = list(csv.DictReader((tmp_path / "sw" / "sweep.csv").open()))
    assert [(int(r["layer"]), float(r["multiplier"])) for r in rows] == [(1, 0), (1, 1), (1, 2), (3, 0), (3, 1),
                                                                         (3, 2)]
    assert {r["variant"] for r in rows} == {"additive"}
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert doc["criterion"] == "margin" and len(doc["rows"]) == 6 and doc["best"] in doc["rows"]
    assert doc["settings"]["optimize"]["max_iters"] == 3 and doc["settings"]["optimize"]["lr"] == 0.1
    assert (tmp_path / "sw" / "sweep_heatmap.png").read_bytes().startswith(PNG_MAGIC)
    for r in rows:
        if float(r["multiplier"]) == 0:  # no steering: nothing changes
            assert float(r["kl"]) == pytest.approx(0.0, abs=1e-6)
    # the command computes exactly what the library computes (same seed, split and optimiser settings)
    model, tok = loaded
    ref = sweep(model, tok, so.load_datapoints(data_dir / "dps.jsonl"), layers=[1, 3], multipliers=[0, 1, 2],
                optimize_kwargs={"max_iters": 3})
    for r, expected in zip(rows, ref.table):
        assert float(r["criterion"]) == pytest.approx(expected["criterion"], rel=1e-4, abs=1e-6)
    assert (doc["best"]["layer"], doc["best"]["multiplier"]) == (ref.best["layer"], ref.best["multiplier"])
    best = so.load(tmp_path / "sw" / "best")
    assert best.metadata["sweep_choice"]["layer"] == ref.best["layer"]
    assert best.metadata["model"]["name_or_path"] == str(model_dir)
    layer = ref.best["layer"]
    torch.testing.assert_close(best.layer_activations[layer], ref.best_steering().layer_activations[layer])
    saved = so.load(tmp_path / "sw" / "vectors" / "layer_3")
    assert float(saved.layer_activations[3].norm()) == pytest.approx(float(rows[4]["norm"]))


# ---------------------------------------------------------------------------------- evaluate / auto-steer


def test_evaluate_prints_a_table_and_matches_the_library(capsys, model_dir: Path, loaded, tmp_path: Path) -> None:
    model, tok = loaded
    vec = so.SteeringVector({1: torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))})
    so.save(vec, tmp_path / "v", model=model)
    out = run_ok(capsys, "evaluate", "--model", model_dir, "--vector", tmp_path / "v", "3", "--prompt", "Hello",
                 "--prompt", "The capital of", "--promote", " Paris", "--suppress", " London", "--max-new-tokens",
                 "4", "--scorer", "keywords:Paris", "--output", tmp_path / "eval.json")
    doc = json.loads((tmp_path / "eval.json").read_text())
    ref = so.evaluate(model, tok, [(vec, 3.0)], ["Hello", "The capital of"], promote=[" Paris"],
                      suppress=[" London"], max_new_tokens=4, scorer="keywords:Paris")
    assert doc["steering"] == [{"vector": str(tmp_path / "v"), "multiplier": 3.0}]
    for key in ("kl", "margin_gain", "perplexity", "success_rate", "distinct2"):
        assert doc["summary"][key] == pytest.approx(ref.summary[key], rel=1e-4, abs=1e-6), key
    assert [r["steered"] for r in doc["records"]] == [r["steered"] for r in ref.records]
    table = out.split("metric", 1)[1]
    assert "KL on neutral prompts" in table and f"{ref.summary['margin_gain']:.4g}" in table
    assert "success rate" in table and "steered: " in out  # the per-prompt texts


def test_auto_steer_saves_the_library_choice(capsys, model_dir: Path, data_dir: Path, loaded,
                                            tmp_path: Path) -> None:
    from steering_opt.sweep import auto_steer

    out = run_ok(capsys, "auto-steer", "--model", model_dir, "--datapoints", data_dir / "dps.jsonl", "--layers",
                 "1", "2", "--strengths", "1", "2", "--max-iters", "2", "--repetition-check", "0", "--out",
                 tmp_path / "v", "--output", tmp_path / "report.json")
    model, tok = loaded
    ref_vec, ref = auto_steer(model, tok, so.load_datapoints(data_dir / "dps.jsonl"), layers=[1, 2],
                              multipliers=[1, 2], optimize_kwargs={"max_iters": 2}, repetition_check=0)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert (doc["best"]["layer"], doc["best"]["multiplier"]) == (ref.best["layer"], ref.best["multiplier"])
    # both layers at strength 1, the better one also at 2 (unless x1 is already over the KL budget)
    assert len(doc["rows"]) == len(ref.table) in (2, 3) and doc["criterion"] == "margin"
    assert [(r["layer"], r["multiplier"]) for r in doc["rows"]] == [(r["layer"], r["multiplier"]) for r in ref.table]
    vec = so.load(tmp_path / "v", model=model)
    layer = ref.best["layer"]
    torch.testing.assert_close(vec.layer_activations[layer], ref_vec.layer_activations[layer])
    assert vec.metadata["model"]["name_or_path"] == str(model_dir) and vec.metadata["datapoints"]["count"] == 2
    assert f"Chosen by margin (higher is better): layer {layer}" in out and "| layer | variant |" in out
    # --calibrate-kl reaches auto_steer(calibrate_kl=...): the choice measured again at the lower strength
    target = doc["best"]["kl"] / 2
    out = run_ok(capsys, "auto-steer", "--model", model_dir, "--datapoints", data_dir / "dps.jsonl", "--layers",
                 "1", "2", "--strengths", "1", "2", "--max-iters", "2", "--calibrate-kl", str(target),
                 "--repetition-check", "0", "--out", tmp_path / "v2", "--output", tmp_path / "report2.json")
    best = json.loads((tmp_path / "report2.json").read_text())["best"]
    assert best["stage"] == "calibrate" and best["kl"] == pytest.approx(target, rel=0.05)
    assert (best["layer"], best["variant"]) == (layer, ref.best["variant"]) and "Note: calibrate_kl:" in out


# ------------------------------------------------------------------------------------ first five minutes


def test_optimize_defaults_are_the_recipe_and_the_budget_is_printed(capsys, model_dir: Path, data_dir: Path,
                                                                    tmp_path: Path) -> None:
    code, out, err = run(capsys, "optimize", "--model", model_dir, "--datapoints", data_dir / "dps.jsonl",
                         "--layer", "1", "--no-plot", "--out", tmp_path / "v")
    assert code == 0, err
    assert f"loading {model_dir} ..." in err  # says what it loads, without -v
    budget = out.splitlines()[0]
    assert budget.startswith("Optimising on 2 datapoint(s) at layer(s) [1]: at most 30 steps (fewer if the loss "
                             "plateaus) of Adam at lr 0.1")
    summary = next(line for line in out.splitlines() if line.startswith("Optimised"))
    found = re.search(r": (\d+) steps, loss .* nats \((\w+)\)", summary)
    assert found, summary
    steps, status = int(found.group(1)), found.group(2)
    assert (steps == 30 and status in ("max_iters", "target_reached")) or (steps < 30 and status == "plateau")
    options = so.load(tmp_path / "v").metadata["options"]
    assert options["lr"] == 0.1 and options["max_iters"] == 30
    out = run_ok(capsys, "optimize", "--model", model_dir, "--datapoints", data_dir / "dps.jsonl", "--layer", "1",
                 "--target-loss", "1000", "--no-plot", "--out", tmp_path / "t")
    assert "until the loss is <= 1000 nats, at most 1000 steps" in out
    assert so.load(tmp_path / "t").metadata["options"]["max_iters"] is None


@pytest.mark.parametrize("argv,needle", [
    (["optimize", "--max-iterz", "3"], "unrecognized argument --max-iterz (did you mean --max-iters?)"),
    (["generate", "--prompt", "x", "--outptu", "f"], "(did you mean --output?)"),
    (["optimze"], "invalid choice: 'optimze'"),
    (["auto-ster"], "(did you mean auto-steer?)"),
    (["train", "--pairs", "p", "--out", "o", "--aggregator", "meen"], "(did you mean mean?)"),
])
def test_mistyped_options_and_commands_get_a_suggestion(capsys, argv: list, needle: str) -> None:
    assert needle in run_error(capsys, *argv)


def test_version_and_a_description_for_every_subcommand(capsys) -> None:
    from steering_opt.cli import build_parser

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"steering-opt {so.__version__}"
    commands = build_parser().commands
    assert {"optimize", "train", "generate", "evaluate", "sweep", "auto-steer", "export", "info",
            "demo"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description and len(parser.description) > 40, name


def test_help_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys, contextlib, io\nfrom steering_opt.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- export / info


def test_export_and_info(capsys, loaded, tmp_path: Path) -> None:
    import gguf

    model = loaded[0]
    d = model.config.hidden_size
    vec = so.SteeringVector({2: torch.arange(d, dtype=torch.float32), 3: -torch.ones(d)},
                            metadata={"method": "test", "loss": 1.5})
    so.save(vec, tmp_path / "v", model=model)
    out = run_ok(capsys, "export", tmp_path / "v", "--out", tmp_path / "v.gguf")
    assert "2 -> direction.1" in out and "3 -> direction.2" in out
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert sorted(got) == ["direction.1", "direction.2"]
    np.testing.assert_array_equal(got["direction.1"], vec.layer_activations[2].numpy())
    run_ok(capsys, "export", tmp_path / "v", "--out", tmp_path / "v.npz", "--multiplier", "2")
    np.testing.assert_array_equal(np.load(tmp_path / "v.npz")["layer_3"], -2 * np.ones(d, dtype=np.float32))
    run_ok(capsys, "export", tmp_path / "v", "--format", "pt", "--out", tmp_path / "v.pt")
    assert sorted(torch.load(tmp_path / "v.pt", weights_only=True)) == [2, 3]

    text = run_ok(capsys, "info", tmp_path / "v")
    assert "kind: additive" in text and "layers: [2, 3]" in text and "LlamaForCausalLM" in text
    assert "final loss: 1.5 nats" in text
    doc = json.loads(run_ok(capsys, "info", tmp_path / "v", "--json"))
    assert doc["format"] == "steering_opt.vector" and doc["metadata"]["final_loss"] == 1.5
    so.save({"x": vec, "y": vec * 2}, tmp_path / "set")
    assert "a set of 2 named vectors" in run_ok(capsys, "info", tmp_path / "set")
    assert "kind: additive" in run_ok(capsys, "info", tmp_path / "v.gguf")


# ---------------------------------------------------------------------------------------------- errors


def test_jsonl_errors_name_file_and_line(capsys, model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(DATAPOINTS[0]) + "\n\n" + '{"prompt": "x", "dst_completions": [" y"]\n')
    line = run_error(capsys, "optimize", "--model", model_dir, "--datapoints", bad, "--layer", "1", "--out",
                     tmp_path / "o")
    assert f"{bad}:3: invalid JSON" in line
    bad.write_text(json.dumps(DATAPOINTS[0]) + "\n" + json.dumps({"prompt": "x", "dst_completion": [" y"]}) + "\n")
    line = run_error(capsys, "sweep", "--model", model_dir, "--datapoints", bad, "--layers", "1", "--out",
                     tmp_path / "o")
    assert f"{bad}:2: unknown key 'dst_completion' (did you mean 'dst_completions'?)" in line
    bad.write_text(json.dumps({"prompt": "x", "dst_completions": " y"}) + "\n")
    assert f"{bad}:1: 'dst_completions' must be a list of strings" in run_error(
        capsys, "optimize", "--datapoints", bad, "--layer", "1", "--out", tmp_path / "o")
    bad.write_text(json.dumps({"positive": "a"}) + "\n")
    assert f"{bad}:1: missing required key 'negative'" in run_error(
        capsys, "train", "--pairs", bad, "--out", tmp_path / "o")
    bad.write_text("\n\n")
    assert "no datapoints (the file is empty)" in run_error(
        capsys, "optimize", "--datapoints", bad, "--layer", "1", "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,needle", [
    (["optimize", "--datapoints", "{data}/missing.jsonl", "--layer", "1", "--out", "{tmp}/o"], "missing.jsonl"),
    (["optimize", "--model", "{model}", "--datapoints", "{data}/dps.jsonl", "--layer", "99", "--out", "{tmp}/o"],
     "99"),
    (["optimize", "--prompt", "hi", "--layer", "1", "--out", "{tmp}/o"], "--dst"),
    (["optimize", "--datapoints", "{data}/dps.jsonl", "--prompt", "hi", "--layer", "1", "--out", "{tmp}/o"],
     "not both"),
    (["optimize", "--datapoints", "{data}/dps.jsonl", "--layer", "1", "--joint", "--vector-clamp", "1", "--out",
      "{tmp}/o"], "--vector-clamp cannot be combined with --joint"),
    (["optimize", "--datapoints", "{data}/dps.jsonl", "--layer", "1", "--lr", "-1", "--out", "{tmp}/o"], "--lr"),
    (["optimize", "--datapoints", "{data}/dps.jsonl", "--layer", "1", "--out", "{data}"], "not a steering_opt save"),
    (["optimize", "--datapoints", "{data}/dps.jsonl", "--layer", "1", "--dtype", "bf17", "--out", "{tmp}/o"],
     "unknown dtype"),
    (["generate", "--model", "{model}", "--prompt", "hi", "--vector", "{tmp}/nope"], "nope"),
    (["generate", "--prompt", "hi", "--vector", "{tmp}/nope", "1", "2"], "PATH [MULTIPLIER]"),
    (["generate", "--prompt", "hi", "--vector", "{tmp}/nope", "lots"], "multiplier must be a number"),
    (["generate", "--model", "{model}"], "no prompts"),
    (["train", "--model", "{model}", "--pairs", "{data}/pairs.jsonl", "--layer", "7", "--out", "{tmp}/o"], "7"),
    (["train", "--pairs", "{data}/pairs.jsonl", "--aggregator", "median", "--out", "{tmp}/o"], "invalid choice"),
    (["sweep", "--model", "{model}", "--datapoints", "{data}/dps.jsonl", "--layers", "1", "1", "--out", "{tmp}/o"],
     "twice"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x.gguf"], "no steering vector"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x.txt"], "--format"),
    (["info", "{tmp}/nope"], "no steering vector"),
])
def test_user_errors_one_line_exit_2(capsys, model_dir: Path, data_dir: Path, tmp_path: Path, argv: list,
                                     needle: str) -> None:
    argv = [a.format(model=model_dir, data=data_dir, tmp=tmp_path) for a in argv]
    assert needle in run_error(capsys, *argv)
    assert not (tmp_path / "o").exists()


def test_vector_errors(capsys, model_dir: Path, loaded, tmp_path: Path) -> None:
    model = loaded[0]
    d = model.config.hidden_size
    # a vector for another hidden size: refused, naming both models
    small = make_tiny_model("llama", 300, hidden_size=32, intermediate_size=64, head_dim=8)
    small.config._name_or_path = "org/small"
    so.save(so.SteeringVector({1: torch.ones(32)}), tmp_path / "v32", model=small)
    line = run_error(capsys, "generate", "--model", model_dir, "--prompt", "hi", "--vector", tmp_path / "v32")
    assert "'org/small'" in line and str(model_dir) in line and "hidden size 32" in line
    # another architecture with the same width: refused unless --allow-model-mismatch
    gpt2 = make_tiny_model("gpt2", 300)
    so.save(so.SteeringVector({1: torch.ones(d)}), tmp_path / "vgpt2", model=gpt2)
    line = run_error(capsys, "generate", "--model", model_dir, "--prompt", "hi", "--vector", tmp_path / "vgpt2")
    assert "GPT2LMHeadModel" in line and "LlamaForCausalLM" in line and "--allow-model-mismatch" in line
    run_ok(capsys, "generate", "--model", model_dir, "--prompt", "hi", "--vector", tmp_path / "vgpt2",
           "--allow-model-mismatch", "--max-new-tokens", "2")
    # a corrupt file
    so.save(so.SteeringVector({2: torch.ones(d)}), tmp_path / "v")
    tfile = tmp_path / "v" / persist.TENSORS_FILE
    tfile.write_bytes(tfile.read_bytes()[:30])
    assert "truncated" in run_error(capsys, "info", tmp_path / "v")
    assert "truncated" in run_error(capsys, "generate", "--prompt", "hi", "--vector", tmp_path / "v")
    # exports that llama.cpp cannot represent
    so.save(so.SteeringVector({1: torch.ones(d)}), tmp_path / "v1")
    assert "cannot be exported" in run_error(capsys, "export", tmp_path / "v1", "--out", tmp_path / "x.gguf")
    so.save(so.SteeringVector({2: torch.ones(d)}, clamp=1.0), tmp_path / "vc")
    assert "clamp" in run_error(capsys, "export", tmp_path / "vc", "--out", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_subprocess_user_error_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "dps.jsonl"
    bad.write_text('{"prompt": "a", "dst_completions": [" b"]}\nnot json\n')
    proc = subprocess.run([sys.executable, "-m", "steering_opt", "optimize", "--datapoints", str(bad), "--layer",
                           "1", "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"steering-opt optimize: error: {bad}:2: invalid JSON at column 1: Expecting value"
    assert proc.stdout == ""


def test_help_lists_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("optimize", "train", "generate", "evaluate", "sweep", "auto-steer", "export", "info", "demo"):
        assert cmd in text


# --------------------------------------------------------------------------------------- embedded model


@pytest.mark.embedded
def test_optimize_and_generate_on_embedded_model(capsys, tmp_path: Path) -> None:
    """The default model (no --model): a one-shot refusal vector, then generation with it."""
    out = run_ok(capsys, "optimize", "--chat", "--prompt", "Give me a short recipe for pancakes.",
                 "--dst", "I'm sorry, but I can't help with that request.", "--layer", "6", "--max-iters", "6",
                 "--lr", "0.1", "--seed", "0", "--out", tmp_path / "refusal")
    assert "6 steps" in out
    vec = so.load(tmp_path / "refusal")
    assert vec.metadata["model"]["name_or_path"] == "SmolLM2-135M-Instruct"
    assert vec.metadata["model"]["hidden_size"] == 576 and vec.metadata["chat_template"] is True
    summary = next(line for line in out.splitlines() if line.startswith("Optimised"))
    hist_first, final = [float(x) for x in summary.split("loss ", 1)[1].split(" nats")[0].split(" -> ")]
    assert final < hist_first
    out = run_ok(capsys, "generate", "--chat", "--prompt", "Tell me about the moon.", "--vector",
                 tmp_path / "refusal", "--compare", "--max-new-tokens", "12")
    steered = next(line for line in out.splitlines() if line.startswith("steered"))
    unsteered = next(line for line in out.splitlines() if line.startswith("unsteered"))
    assert steered.split(": ", 1)[1] != unsteered.split(": ", 1)[1]


@pytest.mark.embedded
def test_generate_refuses_tiny_vector_on_embedded_model(capsys, loaded, tmp_path: Path) -> None:
    so.save(so.SteeringVector({1: torch.ones(loaded[0].config.hidden_size)}), tmp_path / "v", model=loaded[0])
    line = run_error(capsys, "generate", "--prompt", "hi", "--vector", tmp_path / "v")
    assert "hidden size 64" in line and "SmolLM2-135M-Instruct" in line and "576" in line


# -------------------------------------------------------------------------------------------- JSONL schemas


def test_datapoint_schema_round_trip(tmp_path: Path) -> None:
    dps = [
        so.TrainingDatapoint("a", dst_completions=[" b", " c"], src_completions=[" d"],
                             dst_completions_target_losses=[1.0, 2.5], src_completions_target_losses=[0.5],
                             token=slice(-2, None), is_negative=True),
        so.TrainingDatapoint("é ü", src_completions=["x"], token=[0, -1]),
        so.TrainingDatapoint("p", dst_completions=["q"], token=-1),
    ]
    path = jsonl.write_datapoints(dps, tmp_path / "d.jsonl")
    assert jsonl.load_datapoints(path) == dps
    first = json.loads(path.read_text().splitlines()[0])
    assert first["token"] == {"start": -2, "stop": None} and first["is_negative"] is True


@pytest.mark.parametrize("line,needle", [
    ('["a"]', "expected a JSON object"),
    ('{"dst_completions": ["x"]}', "missing required key 'prompt'"),
    ('{"prompt": "", "dst_completions": ["x"]}', "'prompt' must be a non-empty string"),
    ('{"prompt": "a"}', "no completions"),
    ('{"prompt": "a", "dst_completions": ["x", 3]}', "dst_completions[1] must be a string"),
    ('{"prompt": "a", "dst_completions": [""]}', "dst_completions[0] is an empty string"),
    ('{"prompt": "a", "dst_completions": ["x"], "dst_completions_target_losses": [1, 2]}', "has 2 entries"),
    ('{"prompt": "a", "dst_completions": ["x"], "dst_completions_target_losses": ["1"]}', "list of numbers"),
    ('{"prompt": "a", "dst_completions": ["x"], "token": "last"}', "'token' must be"),
    ('{"prompt": "a", "dst_completions": ["x"], "token": {"begin": 1}}', "only 'start' and 'stop'"),
    ('{"prompt": "a", "dst_completions": ["x"], "is_negative": "yes"}', "'is_negative' must be true or false"),
    ('{"prompt": "a", "dst_completions": ["x"], "weight": 2}', "unknown key 'weight'; allowed keys"),
])
def test_datapoint_schema_errors(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "ok", "dst_completions": ["fine"]}\n' + line + "\n")
    with pytest.raises(JSONLError) as info:
        jsonl.load_datapoints(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert needle in str(info.value)
    assert info.value.line == 2


@pytest.mark.parametrize("line,needle", [
    ('{"positive": "a", "negative": ""}', "'negative' must be a non-empty string"),
    ('{"positive": [], "negative": "b"}', "empty list of chat messages"),
    ('{"positive": [{"role": "user"}], "negative": "b"}', "positive[0] must be a chat message"),
    ('{"positive": "a", "negative": "b", "label": 1}', "unknown key 'label'"),
])
def test_contrast_pair_schema(tmp_path: Path, line: str, needle: str) -> None:
    from steering_opt.contrastive import ContrastPair

    path = _write_jsonl(tmp_path / "p.jsonl", PAIRS)
    pairs = jsonl.load_contrast_pairs(path)
    assert pairs[0] == ContrastPair(positive=PAIRS[0]["positive"], negative=PAIRS[0]["negative"])
    assert pairs[2].positive[1]["content"] == "Lovely to see you!"
    path.write_text(line + "\n")
    with pytest.raises(JSONLError, match=r":1: ") as info:
        jsonl.load_contrast_pairs(path)
    assert needle in str(info.value)


def test_jsonl_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        jsonl.load_datapoints(tmp_path / "nope.jsonl")
    with pytest.raises(JSONLError, match="is a folder"):
        jsonl.load_datapoints(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "dst_completions": ["x"]}\n')
    with pytest.raises(JSONLError, match=r"latin1\.jsonl:1: not UTF-8"):
        jsonl.load_datapoints(tmp_path / "latin1.jsonl")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a", "dst_completions": ["x"]}\n')
    assert jsonl.load_datapoints(tmp_path / "bom.jsonl")[0].prompt == "a"


def test_ctrl_c_during_optimize_saves_the_best_vector_so_far(capsys, model_dir: Path, data_dir: Path,
                                                            tmp_path: Path, monkeypatch) -> None:
    from steering_opt import engine

    calls = {"n": 0}
    real = engine.FastEngine.run

    def run_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(engine.FastEngine, "run", run_then_interrupt)
    code, out, err = run(capsys, "optimize", "--model", model_dir, "--datapoints", data_dir / "dps.jsonl",
                         "--layer", "1", "--no-plot", "--max-iters", "20", "--out", tmp_path / "v")
    assert code == 0, err
    assert "(interrupted)" in out
    saved = persist.load(tmp_path / "v")
    assert saved.metadata["status"] == "interrupted" and saved.metadata["iters"] < 20
