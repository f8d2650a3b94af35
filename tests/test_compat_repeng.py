"""repeng compatibility: ControlVector / ControlModel / DatasetEntry, repeng's layer numbering (layer i = the output
of block i) and GGUF layout, on tiny models (and one run on the embedded model)."""

from __future__ import annotations

import os
import warnings

import gguf
import numpy as np
import pytest
import torch

import steering_opt as so
from steering_opt.compat.repeng import ControlModel, ControlVector, DatasetEntry
from steering_opt.compat.steering_vectors import record_activations

TEXTS = [("I love this movie", "I hate this movie"), ("What a great day", "What an awful day it was"),
         ("Yes, gladly", "No thanks"), ("Happy!", "Sad.")]
DATASET = [DatasetEntry(p, n) for p, n in TEXTS]


def _last_hidden(model, tokenizer, text: str, index: int) -> np.ndarray:
    with torch.no_grad():
        hs = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states
    return hs[index][0, -1].double().numpy()


def _reference_direction(model, tokenizer, layer: int, method: str) -> np.ndarray:
    """repeng's recipe written out with numpy: hidden_states[layer + 1] at the last token, the first principal
    component (centred, as scikit-learn's PCA) of the differences or of the pair-centred states, signed by
    scikit-learn's rule and then so that most positives project above their negatives."""
    h = np.stack([_last_hidden(model, tokenizer, s, layer + 1) for pair in TEXTS for s in pair])
    if method == "pca_diff":
        train = h[::2] - h[1::2]
    else:
        center = (h[::2] + h[1::2]) / 2
        train = np.concatenate([h[::2] - center, h[1::2] - center])
    u = np.linalg.svd(train - train.mean(0), full_matrices=False)[2][0]
    u = -u if u[np.abs(u).argmax()] < 0 else u
    p = h @ u
    return -u if np.mean(p[::2] < p[1::2]) > np.mean(p[::2] > p[1::2]) else u


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_train_matches_repeng_recipe(tiny_llama, tokenizer, method):
    vec = ControlVector.train(tiny_llama, tokenizer, DATASET, method=method, batch_size=3)
    assert vec.model_type == "llama"
    assert list(vec.directions) == [3, 2, 1]  # repeng's default: -1 .. -(n_layers - 1)
    for layer in (1, 2):
        d = vec.directions[layer]
        assert d.dtype == np.float32 and d.shape == (64,) and abs(float(np.linalg.norm(d)) - 1) < 1e-5
        np.testing.assert_allclose(d, _reference_direction(tiny_llama, tokenizer, layer, method), atol=2e-6)
    same = ControlVector.train(tiny_llama, tokenizer, DATASET, method=method, max_batch_size=8, hidden_layers=[-3])
    np.testing.assert_allclose(same.directions[1], vec.directions[1], atol=1e-6)
    assert list(same.directions) == [1]


def test_train_arguments(tiny_llama, tokenizer):
    with pytest.raises(NotImplementedError, match="umap"):
        ControlVector.train(tiny_llama, tokenizer, DATASET, method="umap")
    with pytest.raises(ValueError, match="`method` must be one of"):
        ControlVector.train(tiny_llama, tokenizer, DATASET, method="pca")
    with pytest.raises(ValueError, match="hidden_layers=4 is out of range"):
        ControlVector.train(tiny_llama, tokenizer, DATASET, hidden_layers=[4])
    with pytest.raises(ValueError, match="`dataset` is empty"):
        ControlVector.train(tiny_llama, tokenizer, [])
    with pytest.raises(ValueError, match="found no direction"):
        ControlVector.train(tiny_llama, tokenizer, DATASET[:1], hidden_layers=[1])
    seen = {}

    def transform(hiddens):
        seen.update({k: v.shape for k, v in hiddens.items()})
        return {k: 3 * v[:, ::-1] for k, v in hiddens.items()}  # scaled, features reversed

    moved = ControlVector.train(tiny_llama, tokenizer, DATASET, hidden_layers=[2], transform_hiddens=transform)
    plain = ControlVector.train(tiny_llama, tokenizer, DATASET, hidden_layers=[2])
    assert seen == {2: (8, 64)}
    np.testing.assert_allclose(moved.directions[2], plain.directions[2][::-1], atol=1e-6)


def test_control_model_steers_block_outputs_and_resets_exactly(tiny_llama, tokenizer):
    model = tiny_llama
    ids = tokenizer("Tell me a story", return_tensors="pt")
    base = _logits(model, ids)
    vec = ControlVector.train(model, tokenizer, DATASET)
    wrapped = ControlModel(model, [1, -2])
    assert wrapped.layer_ids == [1, 2] and wrapped.config is model.config
    with record_activations(model, layer_nums=[1]) as before, torch.no_grad():
        model(**ids)
    wrapped.set_control(vec, 2.5)
    with record_activations(model, layer_nums=[1]) as after, torch.no_grad():
        steered = wrapped(**ids).logits
    delta = after[1][0] - before[1][0]
    torch.testing.assert_close(delta[0], torch.from_numpy(2.5 * vec.directions[1]).expand_as(delta[0]),
                               atol=1e-5, rtol=1e-5)
    # the same steering as steering_opt's decoder_block layers i + 1
    native = ControlVector(vec.model_type, {i: vec.directions[i] for i in (1, 2)}).to_steering_opt()
    assert native.layers == [2, 3]
    wrapped.reset()
    assert torch.equal(_logits(model, ids), base)
    with native.apply(model, multiplier=2.5):
        torch.testing.assert_close(_logits(model, ids), steered, atol=1e-5, rtol=1e-5)

    wrapped.set_control(vec, 1.0, normalize=True)
    with record_activations(model, layer_nums=[1]) as normed, torch.no_grad():
        wrapped.forward(**ids)
    torch.testing.assert_close(normed[1][0].norm(dim=-1), before[1][0].norm(dim=-1), atol=1e-4, rtol=1e-5)
    wrapped.set_control(vec, 1.0, operator=lambda current, control: current * 0 + control)
    with record_activations(model, layer_nums=[1]) as replaced, torch.no_grad():
        wrapped(**ids)
    torch.testing.assert_close(replaced[1][0][0], torch.from_numpy(vec.directions[1]).expand_as(replaced[1][0][0]))
    out = wrapped.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    with pytest.raises(ValueError, match=r"no direction for layer\(s\) \[2\]"):
        wrapped.set_control(ControlVector("llama", {1: vec.directions[1]}))
    assert wrapped.unwrap() is model
    assert torch.equal(_logits(model, ids), base)
    with pytest.raises(RuntimeError, match="unwrapped"):
        wrapped.set_control(vec)


def test_arithmetic_as_in_repeng():
    a = ControlVector("llama", {1: np.array([1.0, 2.0], dtype=np.float32), 2: np.array([0.0, 1.0], dtype=np.float32)})
    b = ControlVector("llama", {2: np.array([1.0, 1.0], dtype=np.float32), 3: np.array([3.0, 0.0], dtype=np.float32)})
    s = a + b
    assert sorted(s.directions) == [1, 2, 3]
    np.testing.assert_array_equal(s.directions[2], [1.0, 2.0])
    np.testing.assert_array_equal((a - b).directions[3], [-3.0, 0.0])
    np.testing.assert_array_equal((2 * a).directions[1], [2.0, 4.0])
    np.testing.assert_array_equal((a * 2).directions[1], (a / 0.5).directions[1])
    np.testing.assert_array_equal((-a).directions[1], [-1.0, -2.0])
    assert a == ControlVector("llama", {k: v.copy() for k, v in a.directions.items()}) and a != b
    with pytest.raises(TypeError, match="Unsupported operand"):
        a + 1  # noqa: B018
    with pytest.warns(UserWarning, match="mismatched model_types"):
        a + ControlVector("gpt2", {1: np.zeros(2, dtype=np.float32)})  # noqa: B018


def test_gguf_layout_round_trip_atomic_and_umask(tmp_path, monkeypatch):
    vec = ControlVector("llama", {2: np.arange(4, dtype=np.float32), 1: -np.ones(4, dtype=np.float32)})
    path = tmp_path / "v.gguf"
    old = os.umask(0o027)
    try:
        vec.export_gguf(path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    reader = gguf.GGUFReader(str(path))

    def text(key):
        return bytes(reader.get_field(key).parts[-1]).decode()

    assert text("general.architecture") == "controlvector" and text("controlvector.model_hint") == "llama"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 2
    assert [t.name for t in reader.tensors] == ["direction.2", "direction.1"]
    back = ControlVector.import_gguf(path)
    assert back == vec

    # a failed write leaves the old file and no temporary
    before = path.read_bytes()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", lambda self, *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        (2 * vec).export_gguf(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["v.gguf"]


def test_gguf_numbering_agrees_with_steering_opt_export(tmp_path, tiny_llama):
    """steering_opt's GGUF export writes its decoder_block layer L as direction.{L-1}: repeng's layer L - 1."""
    v = torch.randn(64)
    so.export_gguf(so.SteeringVector({3: v}), tmp_path / "n.gguf", model_hint="llama")
    cv = ControlVector.import_gguf(tmp_path / "n.gguf")
    assert list(cv.directions) == [2]
    np.testing.assert_array_equal(cv.directions[2], v.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ControlVector.import_gguf(tmp_path / "n.gguf").model_type == "llama"
    with pytest.raises(FileNotFoundError):
        ControlVector.import_gguf(tmp_path / "missing.gguf")


def test_readme_usage_runs_unchanged(tiny_llama, tokenizer):
    """repeng's README flow, with only the import line changed (tiny model, tiny dataset)."""
    model = ControlModel(tiny_llama, list(range(-1, -4, -1)))

    def make_dataset(template, pos_personas, neg_personas, suffixes):
        dataset = []
        for suffix in suffixes:
            for positive_persona, negative_persona in zip(pos_personas, neg_personas):
                dataset.append(DatasetEntry(positive=template.format(persona=positive_persona) + " " + suffix,
                                            negative=template.format(persona=negative_persona) + " " + suffix))
        return dataset

    trippy_dataset = make_dataset("Act as if you're extremely {persona}.", ["high on psychedelic drugs"],
                                  ["sober from psychedelic drugs"], ["I", "The sky", "Once upon"])
    trippy_vector = ControlVector.train(model, tokenizer, trippy_dataset)
    outs = []
    for strength in (-2.2, 1, 2.2):
        model.set_control(trippy_vector, strength)
        out = model.generate(**tokenizer("[INST] Give me a one-sentence pitch for a TV show. [/INST]",
                                         return_tensors="pt"),
                             do_sample=False, max_new_tokens=4, repetition_penalty=1.1)
        outs.append(tokenizer.decode(out.squeeze()).strip())
    model.reset()
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)


def test_embedded_model_example(embedded_model, embedded_tokenizer):
    model, tokenizer = embedded_model, embedded_tokenizer
    dataset = [DatasetEntry("You are extremely happy. I feel", "You are extremely sad. I feel"),
               DatasetEntry("Act joyful. Today is", "Act gloomy. Today is"),
               DatasetEntry("Be cheerful. The weather", "Be miserable. The weather")]
    ids = tokenizer("Tell me about your day.", return_tensors="pt")
    base = _logits(model, ids)
    wrapped = ControlModel(model, list(range(-5, -18, -1)))
    happy = ControlVector.train(wrapped, tokenizer, dataset, batch_size=6)
    assert happy.model_type == "llama" and len(happy.directions) == 29
    wrapped.set_control(happy, 4.0)
    steered = wrapped.generate(**ids, max_new_tokens=5, do_sample=False)
    assert steered.shape[1] == ids["input_ids"].shape[1] + 5
    wrapped.reset()
    assert torch.equal(_logits(model, ids), base)
