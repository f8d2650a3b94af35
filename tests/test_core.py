"""The optimiser core: options as data, one loop, parameterisations as classes.

* every entry point agrees on the rules (the cases that used to drift between code paths);
* a new parameterisation is one class: defined here, optimised with ``optimize`` and ``optimize_many``,
  saved, reloaded and applied, with no edit anywhere else.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import make_tiny_model

import steering_opt as so
from steering_opt.options import OptimizeOptions
from steering_opt.parameterization import Additive, Affine, Clamp, Steering
from steering_opt.scale import Job, optimize_many

D = 64
DP = so.TrainingDatapoint("The cat sat on the", src_completions=[" mat"], dst_completions=[" roof"])
DP2 = so.TrainingDatapoint("Hello there", src_completions=[" bye"], dst_completions=[" hi you"])


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return make_tiny_model("llama", len(tokenizer))


# ------------------------------------------------------------------------- one rule everywhere

ENTRY_POINTS = {
    "optimize": lambda m, t, **kw: so.optimize(m, t, [DP], 1, **kw),
    "optimize_vector": lambda m, t, **kw: so.optimize_vector(m, [DP], 1, tokenizer=t, **kw),
    "minibatch": lambda m, t, **kw: so.optimize_vector_minibatch_hf(m, t, [DP.prompt, DP2.prompt], 1, [" mat"],
                                                                    [" roof"], 1, **kw),
    "optimize_many": lambda m, t, **kw: optimize_many(m, [Job([DP], 1, **kw)], tokenizer=t)[0],
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("bad, exc, names", [
    (dict(affine_rank=1, vector_clamp=1.0), ValueError, ["`vector_clamp`", "`affine_rank`"]),
    (dict(vector_clamp=True), ValueError, ["`vector_clamp`", "True"]),
    (dict(vector_clamp=float("inf")), ValueError, ["`vector_clamp`", "inf"]),
    (dict(vector_clamp="1"), ValueError, ["`vector_clamp`", "'1'"]),
    (dict(max_affine_norm=0, affine_rank=1), ValueError, ["`max_affine_norm`"]),
    (dict(lr=float("nan")), ValueError, ["`lr`", "nan"]),
    (dict(seed="7"), TypeError, ["`seed`", "'7'"]),
    (dict(seed=2**70), ValueError, ["`seed`"]),
])
def test_every_entry_point_applies_the_same_rules(model, tokenizer, entry, bad, exc, names):
    with pytest.raises(exc) as info:
        ENTRY_POINTS[entry](model, tokenizer, max_iters=0, **bad)
    assert all(n in str(info.value) for n in names), str(info.value)


def test_clamp_and_affine_together_are_refused_by_the_steering_vector_too():
    with pytest.raises(ValueError, match="clamp and affine"):
        so.SteeringVector({1: torch.ones(D)}, clamp=1.0, affine={1: (torch.ones(1, D), torch.ones(1, D))})


def test_same_seed_gives_the_same_affine_start_on_every_path(model, tokenizer):
    """``max_iters=0``: the returned parameters are the starting ones (projected)."""
    kw = dict(max_iters=0, affine_rank=2, seed=3)
    starts = []
    for entry in ENTRY_POINTS.values():
        vec, mat, _ = tuple(entry(model, tokenizer, **kw))
        starts.append((vec, mat))
    for vec, mat in starts[1:]:
        torch.testing.assert_close(vec, starts[0][0], rtol=0, atol=0)
        torch.testing.assert_close(mat, starts[0][1], rtol=0, atol=0)


def test_one_default_per_option_in_every_signature():
    """Every entry point's keyword that is an option has the option's default (e.g. one max_affine_norm)."""
    defaults = {f.name: f.default for f in dataclasses.fields(OptimizeOptions)}
    fns = [so.optimize_vector, so.optimize_vectors, so.optimize_vector_minibatch_hf]
    checked = 0
    for fn in fns:
        for name, p in inspect.signature(fn).parameters.items():
            if name in defaults and p.default is not inspect.Parameter.empty:
                assert p.default == defaults[name], f"{fn.__name__}({name}={p.default!r}) vs {defaults[name]!r}"
                checked += 1
    assert checked > 40
    assert OptimizeOptions().max_affine_norm == 2.0
    assert Job([DP], 1).max_affine_norm == 2.0


def test_options_object_and_keywords_are_the_same_run(model, tokenizer):
    opts = OptimizeOptions(lr=0.2, max_iters=3, seed=1)
    a = so.optimize(model, tokenizer, [DP], 1, opts)
    b = so.optimize(model, tokenizer, [DP], 1, lr=0.2, max_iters=3, seed=1)
    c = so.optimize(model, tokenizer, [DP], 1, opts, lr=0.2)
    torch.testing.assert_close(a.vector, b.vector, rtol=0, atol=0)
    torch.testing.assert_close(a.vector, c.vector, rtol=0, atol=0)
    assert a.options == dataclasses.replace(opts) and a.iters == 3 and a.status == "max_iters"
    with pytest.raises(TypeError, match="unknown option"):
        so.optimize(model, tokenizer, [DP], 1, learning_rate=0.1)


def test_result_shapes_follow_the_reference_tuples(model, tokenizer):
    r = so.optimize(model, tokenizer, [DP], 1, max_iters=1, vector_clamp=1.0, seed=0)
    assert isinstance(r.steering[1], Clamp) and r.steering[1].coefficient == 1.0
    vec, info = r
    assert vec.shape == (D,) and info["iters"] == 1 and info["loss_units"] == "nats"
    sv = r.to_steering_vector()
    assert sv.kind == "clamp" and sv.clamp == 1.0 and sv.metadata["options"]["vector_clamp"] == 1.0
    ra = so.optimize(model, tokenizer, [DP], [1, 2], max_iters=1, affine_rank=1, seed=0)
    assert ra.steering[1] is ra.steering[2] and isinstance(ra.steering[1], Affine) and len(ra) == 3
    rl = so.optimize(model, tokenizer, [DP], [1, 2], max_iters=1, per_layer=True, seed=0)
    vecs, info = rl
    assert set(vecs) == {1, 2} and set(info["norms"]) == {1, 2}


# ------------------------------------------------------------------- a new parameterisation


class Gate(Steering):
    """A toy per-dimension gate, ``h -> h ⊙ (1 + g)``: defined here and nowhere else."""

    kind = "test_gate"

    def __init__(self, vector: torch.Tensor):
        self.vector = vector

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vector": self.vector}

    @classmethod
    def from_state(cls, tensors, config) -> Gate:
        return cls(tensors["vector"])

    @classmethod
    def initial(cls, d, options, gen) -> Gate:
        start = options.starting_vec
        return cls(start.clone() if start is not None else torch.randn(d, generator=gen) * 0.01)

    def delta(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return h * rows.to(h)[:, None, :]


def _logits(model, tokenizer, steering=None):
    ids = torch.tensor([tokenizer(DP.prompt)["input_ids"]])
    with torch.no_grad():
        if steering is None:
            return model(input_ids=ids).logits
        with steering.apply(model):
            return model(input_ids=ids).logits


def test_a_new_parameterisation_is_one_class(model, tokenizer, tmp_path):
    assert Steering.registry["test_gate"] is Gate
    r = so.optimize(model, tokenizer, [DP], 1, parameterization=Gate, max_iters=6, lr=0.2, seed=0)
    assert isinstance(r.steering[1], Gate) and r.iters == 6
    assert r.loss_history[-1] < r.loss_history[0]
    # optimize_many: batched with an additive job in the same pass, equal to the separate runs
    many = optimize_many(model, [Job([DP], 1, parameterization=Gate, max_iters=6, lr=0.2, seed=0),
                                 Job([DP2], 1, max_iters=6, lr=0.2, seed=1)], tokenizer=tokenizer)
    alone = so.optimize(model, tokenizer, [DP2], 1, max_iters=6, lr=0.2, seed=1)
    for got, ref in ((many[0], r), (many[1], alone)):  # Adam amplifies float32 rounding of another batch shape
        assert float((got.vector - ref.vector).norm() / ref.vector.norm()) < 1e-3
        assert got.iters == ref.iters
    assert isinstance(many[1].steering[1], Additive)
    # save, reload, apply: the loaded gate steers exactly as the optimised one
    sv = r.to_steering_vector()
    assert sv.kind == "test_gate"
    path = sv.save_pretrained(tmp_path / "gate")
    back = so.SteeringVector.from_pretrained(path)
    assert back.kind == "test_gate"
    torch.testing.assert_close(back.layer_activations[1], r.vector.cpu(), rtol=0, atol=0)
    steered = _logits(model, tokenizer, back)
    assert not torch.allclose(steered, _logits(model, tokenizer))
    torch.testing.assert_close(steered, _logits(model, tokenizer, sv), rtol=0, atol=0)
    # the steered loss of the loaded vector is the optimised loss
    again = so.optimize(model, tokenizer, [DP], 1, parameterization=Gate, max_iters=0,
                        starting_vec=back.layer_activations[1])
    assert again.loss == pytest.approx(r.loss, rel=1e-5)


def test_a_clamp_run_saved_and_reloaded_is_still_a_clamp_vector(model, tokenizer, tmp_path):
    """Provenance: the reference-style (vector, info) of a clamp run wraps into a clamp SteeringVector, and a
    result's steering vector records every option; both survive a save/load round trip."""
    vec, info = so.optimize_vector(model, [DP], 1, tokenizer=tokenizer, max_iters=1, vector_clamp=1.5, seed=0,
                                   target_loss=float("inf"))
    assert info["parameterization"] == "clamp" and info["vector_clamp"] == 1.5
    sv = so.SteeringVector.from_optimization(vec, info, 1)
    assert sv.kind == "clamp" and sv.clamp == 1.5
    back = so.SteeringVector.from_pretrained(sv.save_pretrained(tmp_path / "clamp"))
    assert back.kind == "clamp" and back.clamp == 1.5
    rich = so.optimize(model, tokenizer, [DP], 1, max_iters=0, vector_clamp=1.5, seed=0, target_loss=float("inf"))
    again = so.SteeringVector.from_pretrained(rich.to_steering_vector().save_pretrained(tmp_path / "rich"))
    assert again.clamp == 1.5 and again.metadata["options"]["target_loss"] == "inf"
    assert again.metadata["options"]["vector_clamp"] == 1.5
    torch.testing.assert_close(back.layer_activations[1], vec.cpu(), rtol=0, atol=0)
