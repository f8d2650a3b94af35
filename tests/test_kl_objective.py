"""The KL fluency term (``kl_weight`` / ``kl_prompts``) and strength calibration (``calibrate_strength``).

* the term's value is the mean KL(unsteered ‖ steered) that ``evaluate.kl_divergence`` measures;
* its gradient matches central finite differences (float64 tiny model), for additive, clamp and affine steering;
* the fast and reference engines agree on its value and gradient (as for the completion losses);
* in ``optimize`` (full batch and minibatches) and ``optimize_many`` it lowers the KL, ``info['loss']`` stays the
  completion loss and ``info['kl']`` is the KL of the returned parameters;
* in the output-constrained phase the objective is ``‖v‖ + λ·KL`` (and the constraints still hold);
* ``calibrate_strength`` finds the multiplier whose KL is the budget, and errors name ``kl_budget``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import steering_opt as so
from steering_opt.evaluate import kl_divergence
from steering_opt.kl import KLTerm
from steering_opt.options import OptimizeOptions
from steering_opt.parameterization import Additive, Affine, Clamp

D = 64
PROMPTS = ["The weather today is", "A good way to learn a new skill is to"]
DP = so.TrainingDatapoint("Say", src_completions=[" no"], dst_completions=[" yes please"])


def steerings(dtype: torch.dtype = torch.float32) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(D, generator=g, dtype=dtype) * 2.0
    left = torch.randn(2, D, generator=g, dtype=dtype) * 0.3
    right = torch.randn(2, D, generator=g, dtype=dtype) * 0.3
    return {"additive": Additive(v.clone()), "clamp": Clamp(v.clone(), 1.5),
            "affine": Affine(v.clone(), left.clone(), right.clone())}


def test_the_value_is_the_measured_mean_kl(tiny_llama, tokenizer):
    p = steerings()["additive"]
    term = KLTerm(tiny_llama, tokenizer, [1], PROMPTS, 1.0)
    vec = so.SteeringVector.from_steering({1: p})
    expected = kl_divergence(tiny_llama, tokenizer, PROMPTS, vec)
    assert term.measure({1: p}) == pytest.approx(expected, rel=1e-4)
    assert term.measure({1: Additive(torch.zeros(D))}) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["additive", "clamp", "affine"])
def test_gradient_matches_finite_differences(tokenizer, kind):
    model = make_tiny_model("llama", len(tokenizer)).double()
    p = steerings(torch.float64)[kind].requires_grad_()
    term = KLTerm(model, tokenizer, [1, 2], PROMPTS[:1], 1.0)
    value = term({1: p, 2: p})
    assert float(value) > 1e-3  # the steering changes the distributions
    for t in p.parameters():
        assert t.grad is not None
        u = torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=t.dtype)
        u = u / u.norm()
        analytic = float((t.grad * u).sum())
        h = 1e-2  # the engines return float32 values: a larger step keeps rounding below the O(h²) error
        with torch.no_grad():
            t.add_(h * u)
            up = term.measure({1: p, 2: p})
            t.sub_(2 * h * u)
            down = term.measure({1: p, 2: p})
            t.add_(h * u)
        assert analytic == pytest.approx((up - down) / (2 * h), rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("kind", ["additive", "clamp", "affine"])
def test_fast_and_reference_engines_agree(tiny_llama, tokenizer, kind):
    out = {}
    for engine in ("fast", "reference"):
        p = steerings()[kind].requires_grad_()
        term = KLTerm(tiny_llama, tokenizer, [1, 3], PROMPTS, 0.5, engine=engine, max_batch_tokens=16)
        val = float(term({1: p, 3: p}))
        out[engine] = (val, [t.grad.clone() for t in p.parameters()])
    (vf, gf), (vr, gr) = out["fast"], out["reference"]
    assert vf == pytest.approx(vr, rel=1e-4)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_optimize_reports_completion_loss_and_kl(tiny_llama, tokenizer):
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    base = so.optimize(tiny_llama, tokenizer, DP, 1, lr=0.3, max_iters=8, seed=0)
    reg = so.optimize(tiny_llama, tokenizer, DP, 1, lr=0.3, max_iters=8, seed=0, kl_weight=50.0,
                      kl_prompts=PROMPTS)
    assert "kl" not in base.info
    assert reg.info["loss"] == pytest.approx(float(reg.losses.sum()))  # the completion loss only
    assert len(reg.info["kl_history"]) == len(reg.info["loss_history"])
    term = KLTerm(tiny_llama, tokenizer, [1], PROMPTS, 1.0)
    assert reg.info["kl"] == pytest.approx(term.measure(reg.steering), rel=1e-5)
    assert reg.info["kl"] < term.measure(base.steering)
    assert reg.info["kl_history"][-1] < reg.info["kl_history"][0] or reg.info["kl_history"][0] < 1e-6
    for k, v in tiny_llama.state_dict().items():  # the model is left as it was
        assert torch.equal(v, state[k])
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags and not tiny_llama.training


def test_output_constrained_phase_minimises_norm_plus_kl(tiny_llama, tokenizer):
    kw = dict(lr=0.3, max_iters=8, seed=0, target_loss=1e9, target_loss_target_iters=10**6, do_output_constr=True,
              max_output_constr_iters=6, output_constr_patience=100)
    lam = 20.0
    plain = so.optimize(tiny_llama, tokenizer, DP, 1, **kw)
    reg = so.optimize(tiny_llama, tokenizer, DP, 1, **kw, kl_weight=lam, kl_prompts=PROMPTS)
    term = KLTerm(tiny_llama, tokenizer, [1], PROMPTS, 1.0)
    start = so.optimize(tiny_llama, tokenizer, DP, 1, **{**kw, "do_output_constr": False}, kl_weight=lam,
                        kl_prompts=PROMPTS)
    # the phase's first objective is the start point's norm + λ·KL (without the term: the norm only)
    assert reg.info["output_constr_norm_history"][0] == pytest.approx(
        start.norm + lam * term.measure(start.steering), rel=1e-4)
    assert plain.info["output_constr_norm_history"][0] == pytest.approx(plain.info["norm_before_output_constr"],
                                                                        rel=1e-5)
    assert reg.info["constraints_satisfied"] and reg.info["kl"] == pytest.approx(term.measure(reg.steering), rel=1e-5)
    assert reg.info["kl"] <= term.measure(start.steering) + 1e-6


def test_minibatches_and_optimize_many_carry_the_term(tiny_llama, tokenizer):
    dps = [DP, so.TrainingDatapoint("Reply", src_completions=[" never"], dst_completions=[" always"])]
    mb = so.optimize(tiny_llama, tokenizer, dps, 1, lr=0.3, max_iters=4, seed=0, kl_weight=5.0,
                     kl_prompts=PROMPTS, minibatch_size=1)
    assert mb.info["kl"] >= 0 and len(mb.info["kl_history"]) == 5
    jobs = [so.Job([DP], 1, lr=0.3, max_iters=4, seed=0, kl_weight=5.0, kl_prompts=tuple(PROMPTS)),
            so.Job([DP], 1, lr=0.3, max_iters=4, seed=0)]
    many = so.optimize_many(tiny_llama, tokenizer, jobs)
    single = so.optimize(tiny_llama, tokenizer, DP, 1, lr=0.3, max_iters=4, seed=0, kl_weight=5.0,
                         kl_prompts=PROMPTS)
    assert "kl" not in many[1].info
    assert many[0].info["kl"] == pytest.approx(single.info["kl"], rel=1e-3)
    torch.testing.assert_close(many[0].vector, single.vector, rtol=1e-3, atol=1e-5)


def test_options_are_checked():
    with pytest.raises(ValueError, match="kl_weight"):
        OptimizeOptions(kl_weight=-1.0)
    with pytest.raises(ValueError, match="kl_prompts"):
        OptimizeOptions(kl_prompts="just one string")
    with pytest.raises(ValueError, match="kl_prompts"):
        OptimizeOptions(kl_prompts=[])
    assert OptimizeOptions(kl_prompts=["a", "b"]).kl_prompts == ("a", "b")


def test_calibrate_strength_meets_the_budget(tiny_llama, tokenizer):
    vec = so.SteeringVector.from_steering({1: steerings()["additive"]})
    budget = 0.5 * kl_divergence(tiny_llama, tokenizer, PROMPTS, vec, multiplier=3.0)
    m = so.calibrate_strength(tiny_llama, tokenizer, vec, budget, PROMPTS, rtol=0.01)
    assert 0 < m < 3.0
    assert kl_divergence(tiny_llama, tokenizer, PROMPTS, vec, multiplier=m) == pytest.approx(budget, rel=0.011)


def test_calibrate_strength_errors_name_kl_budget(tiny_llama, tokenizer):
    vec = so.SteeringVector.from_steering({1: Additive(torch.full((D,), 1e-3))})
    with pytest.raises(ValueError, match="kl_budget"):
        so.calibrate_strength(tiny_llama, tokenizer, vec, 5.0, PROMPTS, max_multiplier=4.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="kl_budget"):
            so.calibrate_strength(tiny_llama, tokenizer, vec, bad, PROMPTS)
