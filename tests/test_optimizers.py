"""The optimisers (``optimizer=``) and the loop's early stops: plateau, time budget, callback, interrupt.

Tiny random Llama (hidden 64); every test runs in well under a second or two.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from test_reliability import ModelState

import steering_opt as so
from steering_opt import loop
from steering_opt.optimizers import lr_factor

DP = so.TrainingDatapoint("The weather today is", src_completions=[" rainy and cold"],
                          dst_completions=[" sunny and warm"])
LAYER = 1


def run(model, tokenizer, **kw):
    kw = {"lr": 0.1, "max_iters": 12, "seed": 0, "progress": False, **kw}
    return so.optimize(model, tokenizer, [DP], LAYER, **kw)


@pytest.mark.parametrize("name", ["adam", "adam_cosine", "normalized", "lbfgs"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_every_optimizer_lowers_the_loss_and_respects_max_norm(tiny_llama, tokenizer, name, max_norm):
    before = ModelState.of(tiny_llama)
    r = run(tiny_llama, tokenizer, optimizer=name, max_norm=max_norm, plateau_patience=None)
    assert r.loss < r.loss_history[0], f"{name}: {r.loss_history}"
    assert all(math.isfinite(x) for x in r.loss_history)
    if max_norm is not None:
        assert r.norm <= max_norm * (1 + 1e-5)
    assert r.options.optimizer == name
    before.assert_same(tiny_llama)


def test_adam_is_plain_adam_bit_for_bit(tiny_llama, tokenizer):
    """optimizer='adam' = torch.optim.Adam at a constant lr on the same loss, projected after each step."""
    ours = run(tiny_llama, tokenizer, optimizer="adam", max_iters=6, max_norm=3.0)
    start = run(tiny_llama, tokenizer, max_iters=0).vector.clone()
    v = start.clone().requires_grad_()
    opt = torch.optim.Adam([v], lr=0.1)
    for _ in range(6):
        opt.zero_grad()
        handle = tiny_llama.model.layers[LAYER].register_forward_pre_hook(_add(v), with_kwargs=True)
        try:
            loss = _loss(tiny_llama, tokenizer)
        finally:
            handle.remove()
        loss.backward()
        opt.step()
        with torch.no_grad():
            v.mul_(min(1.0, 3.0 / float(v.norm())))
    assert torch.allclose(ours.vector, v.detach(), atol=2e-5), float((ours.vector - v).abs().max())
    # and the core's default is that optimiser, exactly as the reference adapter gets it
    ref, _ = so.optimize_vector(tiny_llama, [DP], LAYER, tokenizer=tokenizer, lr=0.1, max_iters=6, max_norm=3.0,
                                seed=0)
    assert torch.equal(ours.vector, ref)


def _add(v):
    def hook(module, args, kwargs):
        if args:
            return (args[0] + v,) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + v}
    return hook


def _loss(model, tokenizer):
    """llm-steering-opt's loss for DP at coldness 0.7: -log p(dst) - log(1 - p(src)), summed over tokens."""
    total = torch.zeros(())
    prompt = tokenizer(DP.prompt)["input_ids"]
    for comp, promote in ((DP.dst_completions[0], True), (DP.src_completions[0], False)):
        ids = tokenizer(comp, add_special_tokens=False)["input_ids"]
        x = torch.tensor([prompt + ids])
        logits = model(input_ids=x).logits[0, len(prompt) - 1:-1] * 0.7
        lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
        total = total + (-lp.sum() if promote else -torch.log1p(-lp.exp().clamp(max=1 - 1e-7)).sum())
    return total


def test_plateau_stops_with_status_and_best_parameters(tiny_llama, tokenizer):
    r = run(tiny_llama, tokenizer, max_iters=200, plateau_patience=3, plateau_rel_tol=0.5)
    assert r.status == "plateau" and 3 <= r.iters < 200
    assert r.loss == pytest.approx(min(r.loss_history), rel=1e-6)
    off = run(tiny_llama, tokenizer, max_iters=15, plateau_patience=None)
    assert off.status == "max_iters" and off.iters == 15


def test_reference_adapter_never_stops_on_a_plateau(tiny_llama, tokenizer):
    _, info = so.optimize_vector(tiny_llama, [DP], LAYER, tokenizer=tokenizer, lr=1e-6, max_iters=25, seed=0)
    assert info["status"] == "max_iters" and info["iters"] == 25


def test_time_budget_returns_best_so_far(tiny_llama, tokenizer, monkeypatch):
    clock = iter(range(0, 10**6, 10))  # every reading of the clock is 10 s later
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(clock)))
    before = ModelState.of(tiny_llama)
    r = run(tiny_llama, tokenizer, max_iters=100, time_budget_s=25, plateau_patience=None)
    assert r.status == "time_budget" and 1 <= r.iters <= 3
    assert r.loss == pytest.approx(min(r.loss_history), rel=1e-6)
    before.assert_same(tiny_llama)


def test_callback_sees_every_evaluation_and_can_stop(tiny_llama, tokenizer):
    seen = []

    def cb(step, loss, steering):
        seen.append((step, loss, float(steering[LAYER].vector.detach().norm())))
        return step == 4 or None

    r = run(tiny_llama, tokenizer, max_iters=50, callback=cb, plateau_patience=None)
    assert r.status == "callback" and r.iters == 4
    assert [s for s, _, _ in seen] == list(range(5)) and [x for _, x, _ in seen] == r.loss_history
    assert r.loss == pytest.approx(min(r.loss_history), rel=1e-6)


@pytest.mark.parametrize("keep", [True, False])
def test_interrupt_returns_best_or_reraises_and_leaves_the_model(tiny_llama, tokenizer, keep):
    def cb(step, loss, steering):
        if step == 3:
            raise KeyboardInterrupt

    before = ModelState.of(tiny_llama)
    if keep:
        r = run(tiny_llama, tokenizer, max_iters=50, callback=cb, return_on_interrupt=True)
        assert r.status == "interrupted" and r.info["status"] == "interrupted"
        assert r.loss == pytest.approx(min(r.loss_history), rel=1e-6) and torch.isfinite(r.vector).all()
    else:
        with pytest.raises(KeyboardInterrupt):
            run(tiny_llama, tokenizer, max_iters=50, callback=cb)
    before.assert_same(tiny_llama)


def test_lbfgs_counts_one_engine_evaluation_per_closure_call(tiny_llama, tokenizer, monkeypatch):
    from steering_opt.engine import FastEngine

    calls = []
    original = FastEngine.run

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(FastEngine, "run", counting)
    r = run(tiny_llama, tokenizer, optimizer="lbfgs", max_iters=5, plateau_patience=None)
    assert r.status in ("max_iters", "converged")
    assert len(calls) <= 1 + 25 * r.iters  # the round's evaluation + the line search's, reused when they coincide
    assert len(calls) >= r.iters


def test_bad_values_are_refused_before_any_work(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="optimizer"):
        so.OptimizeOptions(optimizer="sgd")
    with pytest.raises(ValueError, match="plateau_patience"):
        so.OptimizeOptions(plateau_patience=0)
    with pytest.raises(ValueError, match="time_budget_s"):
        so.OptimizeOptions(time_budget_s=-1)
    with pytest.raises(TypeError, match="callback"):
        so.OptimizeOptions(callback=3)
    with pytest.raises(ValueError, match="noise_scale"):
        so.OptimizeOptions(optimizer="lbfgs", noise_scale=0.1)
    with pytest.raises(ValueError, match="minibatch"):
        so.optimize(tiny_llama, tokenizer, [DP, DP], LAYER, optimizer="lbfgs", minibatch_size=1)


def test_schedule_warms_up_then_decays_to_a_tenth():
    f = [lr_factor(s, 40) for s in range(41)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))


def test_time_budget_is_wall_time(tiny_llama, tokenizer):
    t = time.perf_counter()
    r = run(tiny_llama, tokenizer, max_iters=100000, time_budget_s=0.3, plateau_patience=None)
    assert r.status == "time_budget" and time.perf_counter() - t < 5


@pytest.mark.parametrize("lr", [0.05, 0.3])
def test_lbfgs_first_step_is_lr_sqrt_numel_long(tiny_llama, tokenizer, monkeypatch, lr):
    """torch's first L-BFGS step, -g·min(1, 1/‖g‖₁), is tiny for these losses; ours is lr·√numel long (a normalised
    step), so the line search does not spend evaluations growing it."""
    trials: list[torch.Tensor] = []
    original = loop._reevaluate

    def recording(engine, st, *a, **k):
        run_ = original(engine, st, *a, **k)

        def wrapped():
            trials.append(st.tensors[0].detach().clone())
            return run_()
        return wrapped

    monkeypatch.setattr(loop, "_reevaluate", recording)
    v0 = torch.randn(tiny_llama.config.hidden_size, generator=torch.Generator().manual_seed(1))
    r = run(tiny_llama, tokenizer, optimizer="lbfgs", lr=lr, max_iters=3, starting_vec=v0, plateau_patience=None)
    assert trials, "the line search evaluated nothing"
    assert float((trials[0] - v0).norm()) == pytest.approx(lr * math.sqrt(v0.numel()), rel=1e-4)
    assert r.loss < r.loss_history[0]
