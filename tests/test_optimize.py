"""The optimiser's contract (DESIGN.md §3): exact step counts, early stopping, norm caps, clamp,
affine, noise, the output-constrained phase, multi-layer steering, token selection, seeding, and
leaving the model exactly as it was found.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from test_loss import DST, SRC, add_hook, blocks, enc, slow_loss

import steering_opt as so
import steering_opt.engine as engine_mod
from steering_opt.data import tokenize_datapoints
from steering_opt.engine import FastEngine, Objective, ReferenceEngine, SteerSpec
from steering_opt.loop import JobState, tangent_gradients
from steering_opt.options import OptimizeOptions
from steering_opt.parameterization import Additive, Affine, Clamp

LAYER = 1
INIT = 0.3
D = 64

DP = so.TrainingDatapoint("The cat sat on the", src_completions=[" mat"], dst_completions=[" roof"])


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_model("llama", len(tokenizer), initializer_range=INIT)


def opt(model, tok, dps=(DP,), layer=LAYER, **kw):
    kw.setdefault("seed", 0)
    return so.optimize_vector(model, list(dps), layer, tokenizer=tok, **kw)


def loss_of(model, tok, vec, dps=(DP,), layer=LAYER, **kw):
    """``info`` of the starting vector ``vec`` (no optimiser step)."""
    return opt(model, tok, dps, layer, max_iters=0, starting_vec=vec, **kw)[-1]


def record_steer(monkeypatch):
    """Wrap the engines' ``steer`` to record every call's inputs and output."""
    calls = []
    real = engine_mod.steer

    def wrapped(h, params, rows, **kw):
        out = real(h, params, rows, **kw)
        p = params[0]
        mask = kw.get("mask")
        calls.append(dict(h=h.detach(), vector=rows.detach(), out=out.detach(),
                          mask=None if mask is None else mask.detach(),
                          clamp=p.coefficient if isinstance(p, Clamp) else None,
                          left=p.left.detach() if isinstance(p, Affine) else None,
                          right=p.right.detach() if isinstance(p, Affine) else None))
        return out

    monkeypatch.setattr(engine_mod, "steer", wrapped)
    return calls


def count_adam_steps(monkeypatch):
    steps = []
    real = torch.optim.Adam.step

    def counting(self, *args, **kwargs):
        steps.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    return steps


# ------------------------------------------------------------------------------------ max_iters


@pytest.mark.parametrize("n", [0, 1, 5])
@pytest.mark.parametrize("fn", ["optimize_vector", "optimize_vectors", "minibatch"])
def test_max_iters_means_exactly_that_many_steps(model, tokenizer, monkeypatch, fn, n):
    steps = count_adam_steps(monkeypatch)
    if fn == "optimize_vector":
        info = opt(model, tokenizer, max_iters=n, lr=0.1)[-1]
    elif fn == "optimize_vectors":
        _, info = so.optimize_vectors(model, [DP], [0, 2], tokenizer=tokenizer, max_iters=n, lr=0.1, seed=0)
    else:
        _, info = so.optimize_vector_minibatch_hf(model, tokenizer, ["A b", "C d e", "F"], LAYER,
                                                  dst_completions=[" x"], minibatch_size=2, max_iters=n, seed=0)
    assert len(steps) == n
    assert info["iters"] == n
    assert len(info["loss_history"]) == n + 1
    assert info["status"] == "max_iters"


# ---------------------------------------------------------------------------------- target loss


def _first_run_hit(history, target, k):
    run = 0
    for i, x in enumerate(history):
        run = run + 1 if x <= target else 0
        if run >= k:
            return i
    return None


@pytest.mark.parametrize("k", [1, 3])
def test_target_loss_stops_at_first_evaluation_that_meets_it(model, tokenizer, monkeypatch, k):
    _, full = opt(model, tokenizer, max_iters=15, lr=0.5)
    history = full["loss_history"]
    target = history[4]
    stop = _first_run_hit(history, target, k)
    assert stop is not None and stop < 15
    steps = count_adam_steps(monkeypatch)
    for max_iters in (15, None):
        steps.clear()
        vec, info = opt(model, tokenizer, max_iters=max_iters, lr=0.5, target_loss=target,
                        target_loss_target_iters=k)
        assert info["status"] == "target_reached"
        assert info["iters"] == stop == len(steps)
        np.testing.assert_allclose(info["loss_history"], history[: stop + 1], rtol=1e-6)
        assert info["loss"] == pytest.approx(history[stop], rel=1e-6)
        again = loss_of(model, tokenizer, vec)["loss"]  # the returned vector is the one that met it
        assert again <= target
        assert again == pytest.approx(info["loss"], rel=1e-5)


def test_per_completion_targets_without_summing(model, tokenizer, monkeypatch):
    def datapoints(roof_target=None):
        return [so.TrainingDatapoint("The cat sat on the", src_completions=[" mat", " floor"],
                                     dst_completions=[" roof"],
                                     dst_completions_target_losses=None if roof_target is None else [roof_target]),
                so.TrainingDatapoint("Hello", src_completions=[" bye"], dst_completions=[" hi there", " yo"],
                                     dst_completions_target_losses=[100.0, 100.0])]

    seen = []
    real_run = FastEngine.run

    def recording_run(self, *a, **kw):
        out = real_run(self, *a, **kw)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(FastEngine, "run", recording_run)
    opt(model, tokenizer, datapoints(), max_iters=12, lr=0.5)
    per_step = torch.stack(seen)  # (evaluations, sequences), order: datapoint, src, dst
    roof_target = float(per_step[5, 2])
    global_target = float(per_step[:, [0, 1, 3]].max()) + 1.0  # src losses: always met
    targets = torch.tensor([global_target, global_target, roof_target, global_target, 100.0, 100.0])
    stop = int(torch.nonzero((per_step <= targets).all(1))[0])
    assert 0 < stop <= 5
    dps = datapoints(roof_target)
    vec, info = opt(model, tokenizer, dps, max_iters=12, lr=0.5, target_loss=global_target,
                    do_target_loss_sum=False)
    assert info["status"] == "target_reached" and info["iters"] == stop
    loss = info["loss"]
    assert [[len(x) for x in d] for d in loss] == [[2, 1], [1, 2]]
    flat = [loss[0][SRC][0], loss[0][SRC][1], loss[0][DST][0], loss[1][SRC][0], loss[1][DST][0], loss[1][DST][1]]
    np.testing.assert_allclose(flat, per_step[stop].numpy(), rtol=1e-6)
    assert all(x <= t for x, t in zip(flat, targets.tolist()))
    again = loss_of(model, tokenizer, vec, dps, do_target_loss_sum=False)["completion_losses"]
    np.testing.assert_allclose([x for d in again for j in d for x in j], flat, rtol=1e-5)


# -------------------------------------------------------------------------------------- max_norm


@pytest.mark.parametrize("starting_norm", [1.0, 5.0])
def test_max_norm_is_never_exceeded(model, tokenizer, monkeypatch, starting_norm):
    max_norm = 2.0
    _, free = opt(model, tokenizer, max_iters=8, lr=1.0, starting_norm=starting_norm)
    assert free["norm"] > 2 * max_norm  # the cap binds
    calls = record_steer(monkeypatch)
    vec, info = opt(model, tokenizer, max_iters=8, lr=1.0, max_norm=max_norm, starting_norm=starting_norm)
    assert len(calls) == 9
    for c in calls:
        assert float(c["vector"].norm(dim=-1).max()) <= max_norm * (1 + 1e-5)
    assert float(vec.norm()) <= max_norm * (1 + 1e-5)
    assert info["norm"] == pytest.approx(float(vec.norm()))
    assert float(vec.norm()) == pytest.approx(max_norm, rel=1e-4)


# ---------------------------------------------------------------------------------------- clamp


def _capture_block_input(model, layer, store):
    """Forward pre-hook recording the (steered) input of ``layer``; register it after the steering hook."""

    def hook(module, args, kwargs):
        store.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone())

    return blocks(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("c", [0.0, 1.5, -2.0])
def test_clamp_hook_sets_the_projection(model, tokenizer, c):
    v = torch.randn(D, generator=torch.Generator().manual_seed(1)) * 3
    vhat = v / v.norm()
    ids = torch.tensor([enc(tokenizer, "The cat sat on the mat", True)])
    for hook in (so.make_steering_hook_hf(c * v, so.make_abl_mat(v)), so.make_steering_hook_hf(v, clamp=c)):
        store = []
        with so.hf_hooks_contextmanager(model, [(LAYER, hook)]):
            handle = _capture_block_input(model, LAYER, store)
            try:
                with torch.no_grad():
                    model(input_ids=ids)
            finally:
                handle.remove()
        (h,) = store
        proj = h[0] @ vhat
        torch.testing.assert_close(proj, torch.full_like(proj, c * float(v.norm())), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_clamp_optimisation_steers_every_activation_to_the_clamp_value(model, tokenizer, monkeypatch, engine):
    c = 1.5
    dps = [DP, so.TrainingDatapoint("Hello", dst_completions=[" hi"], is_negative=True)]
    calls = record_steer(monkeypatch)
    vec, info = opt(model, tokenizer, dps, max_iters=4, lr=0.3, vector_clamp=c, engine=engine)
    assert calls and all(x["clamp"] == c for x in calls)
    for x in calls:
        rows = x["vector"]  # (batch, d): ±v per row
        rhat = rows / rows.norm(dim=-1, keepdim=True)
        proj = (x["out"] * rhat[:, None, :]).sum(-1)
        real = torch.ones_like(proj, dtype=torch.bool) if x.get("mask") is None else x["mask"]
        expected = c * rows.norm(dim=-1)[:, None].expand_as(proj)
        torch.testing.assert_close(proj[real], expected[real], atol=1e-4, rtol=1e-5)
    # the returned vector with the tutorial's clamp hook reproduces the reported losses
    with so.hf_hooks_contextmanager(model, [(LAYER, so.make_steering_hook_hf(c * vec, so.make_abl_mat(vec)))]):
        roof = -float(so.get_completion_logprob_hf(model, DP.prompt, " roof", tokenizer, coldness=0.7))
        mat = -float(so.get_completion_logprob_hf(model, DP.prompt, " mat", tokenizer, coldness=0.7,
                                                  do_one_minus=True))
    assert info["completion_losses"][0][DST][0] == pytest.approx(roof, rel=1e-5)
    assert info["completion_losses"][0][SRC][0] == pytest.approx(mat, rel=1e-4, abs=1e-7)


def test_clamp_needs_a_nonzero_vector(model, tokenizer):
    with pytest.raises(ValueError, match="non-zero"):
        opt(model, tokenizer, max_iters=1, vector_clamp=1.0, starting_vec=torch.zeros(D))
    with pytest.raises(ValueError):
        so.make_abl_mat(torch.zeros(D))


# --------------------------------------------------------------------------------------- affine


def test_affine_steering_returns_a_low_rank_matrix_with_capped_factors(model, tokenizer, monkeypatch):
    calls = record_steer(monkeypatch)
    vec, mat, info = opt(model, tokenizer, max_iters=6, lr=0.5, affine_rank=2, max_affine_norm=0.5,
                         max_norm=1.0, starting_affine_norm=1.0)
    assert mat.shape == (D, D)
    assert int(torch.linalg.matrix_rank(mat)) <= 2
    left, right = info["affine_factors"]
    assert left.shape == right.shape == (2, D)
    for f in (left, right):
        assert float(f.norm(dim=1).max()) <= 0.5 * (1 + 1e-5)
    torch.testing.assert_close(mat, left.T @ right)
    assert float(vec.norm()) <= 1 + 1e-5
    for x in calls[1:]:  # every evaluation after the first projection
        for f in (x["left"], x["right"]):
            assert float(f.norm(dim=1).max()) <= 0.5 * (1 + 1e-5)
    # the returned (vector, matrix) steer exactly as during training
    with so.hf_hooks_contextmanager(model, [(LAYER, so.make_steering_hook_hf(vec, mat))]):
        roof = -float(so.get_completion_logprob_hf(model, DP.prompt, " roof", tokenizer, coldness=0.7))
    assert info["completion_losses"][0][DST][0] == pytest.approx(roof, rel=1e-5)


def test_max_norm_caps_only_the_vector_with_affine_factors_and_shared_layers(model, tokenizer):
    vec, mat, info = opt(model, tokenizer, layer=[0, 2], max_iters=1, lr=1e-4, affine_rank=2, max_norm=0.1,
                         max_affine_norm=None, starting_affine_norm=1.0)
    assert float(vec.norm()) <= 0.1 * (1 + 1e-5)
    for f in info["affine_factors"]:  # the factors are capped by max_affine_norm only (here: not at all)
        torch.testing.assert_close(f.norm(dim=1), torch.ones(2), rtol=1e-2, atol=0)


# ---------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("engine_cls", [FastEngine, ReferenceEngine])
def test_tangent_noise_is_orthogonal_to_the_unsteered_gradient(model, tokenizer, engine_cls):
    dps = [DP, so.TrainingDatapoint("Hello there", src_completions=[" bye"], dst_completions=[" hi you"])]
    seqs = tokenize_datapoints(tokenizer, dps)
    owner = [s.datapoint for s in seqs]
    eng = engine_cls(model, seqs, [LAYER], Objective())
    def state(tangent):
        st = JobState({LAYER: Additive(torch.ones(D, requires_grad=True))}, seqs, len(dps),
                      OptimizeOptions(noise_scale=0.5, do_tangent_space_noise=tangent),
                      torch.Generator().manual_seed(0))
        tangent_gradients(eng, [st], [LAYER], D, torch.device("cpu"))
        return st

    st = state(True)
    grads = st.tangent
    assert grads.shape == (len(dps), D)  # g: gradient of each datapoint's unsteered loss, computed once
    expected = torch.zeros(len(dps), D, dtype=torch.float64)
    for s in seqs:
        z = torch.zeros(D, dtype=torch.float64, requires_grad=True)
        handle = blocks(model)[LAYER].register_forward_pre_hook(add_hook(z, None), with_kwargs=True)
        try:
            logits = model(input_ids=torch.tensor([s.ids])).logits[0].double()
        finally:
            handle.remove()
        lp = torch.log_softmax(0.7 * logits, -1)[torch.arange(s.prompt_len - 1, len(s.ids) - 1),
                                                 s.ids[s.prompt_len:]]
        loss = -torch.log1p(-lp.exp()).sum() if s.kind == SRC else -lp.sum()
        expected[s.datapoint] += torch.autograd.grad(loss, z)[0]
    torch.testing.assert_close(grads.double(), expected, rtol=1e-3, atol=1e-9)
    draws = []
    for _ in range(3):
        rows = st.noise(D)
        assert rows.shape == (len(seqs), D)
        g = grads[owner]
        cos = (rows * g).sum(-1) / (rows.norm(dim=-1) * g.norm(dim=-1))
        assert float(cos.abs().max()) < 1e-5
        assert 0.3 * math.sqrt(D) < float(rows.norm(dim=-1).mean()) < 0.7 * math.sqrt(D)
        draws.append(rows)
    assert not torch.allclose(draws[0], draws[1])  # fresh noise at every evaluation
    plain = state(False).noise(D)
    g = grads[owner]
    cos = (plain * g).sum(-1) / (plain.norm(dim=-1) * g.norm(dim=-1))
    assert float(cos.abs().max()) > 1e-3


def test_noise_is_used_and_seeded(model, tokenizer):
    kw = dict(max_iters=4, lr=0.3, noise_scale=0.5)
    v1, i1 = opt(model, tokenizer, **kw)
    v2, i2 = opt(model, tokenizer, **kw)
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    assert i1["loss_history"] == i2["loss_history"]
    _, quiet = opt(model, tokenizer, max_iters=4, lr=0.3)
    assert quiet["loss_history"][0] != pytest.approx(i1["loss_history"][0], rel=1e-4)
    _, other = opt(model, tokenizer, seed=1, **kw)
    assert other["loss_history"] != i1["loss_history"]


# ----------------------------------------------------------------------------- output constraints


@pytest.mark.parametrize("summed", [True, False])
def test_output_constrained_phase_shrinks_the_norm_and_meets_every_constraint(model, tokenizer, summed):
    target = 5.0
    vec, info = opt(model, tokenizer, max_iters=20, lr=1.0, target_loss=target, do_target_loss_sum=summed,
                    do_output_constr=True, output_constr_lr=0.2, max_output_constr_iters=40)
    assert info["status"] == "target_reached"
    assert info["constraints_satisfied"] is True
    assert info["norm"] < 0.8 * info["norm_before_output_constr"]
    assert info["norm"] == pytest.approx(float(vec.norm()), rel=1e-6)
    assert 0 < info["output_constr_iters"] <= 40
    again = loss_of(model, tokenizer, vec, do_target_loss_sum=summed)
    losses = [x for d in again["completion_losses"] for j in d for x in j]
    if summed:
        assert again["loss"] <= target
        assert info["loss"] == pytest.approx(again["loss"], rel=1e-5)
    else:
        assert all(x <= target for x in losses)
        np.testing.assert_allclose([x for d in info["loss"] for j in d for x in j], losses, rtol=1e-5)


# ---------------------------------------------------------------------------------- multi-layer


@pytest.mark.parametrize("engine_cls", [FastEngine, ReferenceEngine])
def test_every_layer_gets_gradient_and_shared_gradient_is_the_sum(model, tokenizer, engine_cls):
    layers = [0, 1, 3]
    seqs = tokenize_datapoints(tokenizer, [DP])
    eng = engine_cls(model, seqs, layers, Objective())
    g = torch.Generator().manual_seed(0)
    vals = {layer: torch.randn(D, generator=g) for layer in layers}
    sep = {layer: x.clone().requires_grad_(True) for layer, x in vals.items()}
    eng.run(lambda idx: SteerSpec(rows={layer: v.expand(len(idx), -1) for layer, v in sep.items()}))
    for layer in layers:
        assert sep[layer].grad is not None and float(sep[layer].grad.norm()) > 1e-6, layer
    # one vector shared over the layers: its gradient is the sum of the per-layer gradients
    same = {layer: vals[0].clone().requires_grad_(True) for layer in layers}
    eng.run(lambda idx: SteerSpec(rows={layer: v.expand(len(idx), -1) for layer, v in same.items()}))
    shared = vals[0].clone().requires_grad_(True)
    eng.run(lambda idx: SteerSpec(rows={layer: shared.expand(len(idx), -1) for layer in layers}))
    torch.testing.assert_close(shared.grad, sum(v.grad for v in same.values()), rtol=1e-5, atol=1e-8)


def test_optimize_vectors_changes_every_layer(model, tokenizer):
    layers = [0, 1, 3]
    start, _ = so.optimize_vectors(model, [DP], layers, tokenizer=tokenizer, max_iters=0, seed=0)
    vecs, info = so.optimize_vectors(model, [DP], layers, tokenizer=tokenizer, max_iters=3, lr=0.1, seed=0)
    assert sorted(vecs) == layers and sorted(info["norms"]) == layers
    for layer in layers:
        assert float((vecs[layer] - start[layer]).norm()) > 1e-3, layer
        assert info["norms"][layer] == pytest.approx(float(vecs[layer].norm()), rel=1e-6)
    # info['loss'] is the completion loss of the returned vectors
    seqs = tokenize_datapoints(tokenizer, [DP])
    losses = ReferenceEngine(model, seqs, layers, Objective()).run(
        lambda idx: SteerSpec(rows={layer: v.expand(len(idx), -1) for layer, v in vecs.items()}), backward=False)
    assert info["loss"] == pytest.approx(float(losses.sum()), rel=1e-5)
    # regularisers change the outcome
    reg, _ = so.optimize_vectors(model, [DP], layers, tokenizer=tokenizer, max_iters=3, lr=0.1, seed=0,
                                 regularization_weight=1.0, sparsity_weight=1.0, entropy_weight=10.0)
    assert any(float((reg[layer] - vecs[layer]).norm()) > 1e-3 for layer in layers)


def test_shared_vector_over_several_layers_moves_and_matches_the_hand_loss(model, tokenizer):
    v = torch.randn(D, generator=torch.Generator().manual_seed(2))
    vec, info = opt(model, tokenizer, layer=[0, 2], max_iters=3, lr=0.2, starting_vec=v)
    assert float((vec - v).norm()) > 1e-3
    p_ids = enc(tokenizer, DP.prompt, True)
    hand = float(slow_loss(model, p_ids, enc(tokenizer, " roof", False), DST, {0: vec, 2: vec}))
    assert info["completion_losses"][0][DST][0] == pytest.approx(hand, rel=1e-5)


# ------------------------------------------------------------------------------ sign / objective


@pytest.mark.parametrize("clamp", [None, 1.0])
def test_is_negative_steers_with_minus_v(model, tokenizer, clamp):
    v = torch.randn(D, generator=torch.Generator().manual_seed(3)) * 3
    neg = so.TrainingDatapoint(DP.prompt, src_completions=DP.src_completions, dst_completions=DP.dst_completions,
                               is_negative=True)
    kw = dict(vector_clamp=clamp)
    a = loss_of(model, tokenizer, v, [neg], **kw)["completion_losses"]
    b = loss_of(model, tokenizer, -v, [DP], **kw)["completion_losses"]
    c = loss_of(model, tokenizer, v, [DP], **kw)["completion_losses"]
    for d in range(2):
        np.testing.assert_allclose(a[0][d], b[0][d], rtol=1e-6)
    assert abs(a[0][DST][0] - c[0][DST][0]) > 1e-3


def test_do_one_minus_false_pushes_the_suppressed_logprob_down(model, tokenizer):
    dp = so.TrainingDatapoint(DP.prompt, src_completions=[" mat"])
    vec, info = opt(model, tokenizer, [dp], max_iters=5, lr=0.5, do_one_minus=False)
    hist = info["loss_history"]
    assert hist[-1] < hist[0] < 0  # Σ log p: negative, and decreasing
    before = float(so.get_completion_logprob_hf(model, dp.prompt, " mat", tokenizer, coldness=0.7))
    with so.hf_hooks_contextmanager(model, [(LAYER, so.make_steering_hook_hf(vec))]):
        after = float(so.get_completion_logprob_hf(model, dp.prompt, " mat", tokenizer, coldness=0.7))
    assert after == pytest.approx(info["loss"], rel=1e-5)
    assert after < before


# ------------------------------------------------------------------------------ steered positions

PROMPT = "The cat sat on the"  # 5 tokens
COMPLETION = " roof today"  # 2 tokens


@pytest.mark.parametrize("token,only_prompt,positions", [
    (2, False, [2]),
    (-1, False, [4]),
    (slice(1, 3), False, [1, 2]),
    (slice(-2, None), False, [3, 4, 5, 6]),
    ([0, 3], False, [0, 3]),
    (None, True, [0, 1, 2, 3, 4]),
    (slice(-2, None), True, [3, 4]),
])
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_token_and_only_hook_prompt_restrict_the_steered_positions(model, tokenizer, monkeypatch, engine, token,
                                                                   only_prompt, positions):
    p_ids, c_ids = enc(tokenizer, PROMPT, True), enc(tokenizer, COMPLETION, False)
    assert (len(p_ids), len(c_ids)) == (5, 2)
    dp = so.TrainingDatapoint(PROMPT, dst_completions=[COMPLETION], token=token)
    v = torch.randn(D, generator=torch.Generator().manual_seed(4)) * 3
    calls = record_steer(monkeypatch)
    info = loss_of(model, tokenizer, v, [dp], only_hook_prompt=only_prompt, engine=engine)
    hand = float(slow_loss(model, p_ids, c_ids, DST, {LAYER: v}, positions=positions))
    everywhere = float(slow_loss(model, p_ids, c_ids, DST, {LAYER: v}))
    assert info["loss"] == pytest.approx(hand, rel=1e-5)
    assert hand != pytest.approx(everywhere, rel=1e-4)
    (x,) = calls
    diff = (x["out"] - x["h"])[0, :7]
    steered = torch.zeros(7, dtype=torch.bool)
    steered[positions] = True
    assert float(diff[~steered].abs().max()) == 0.0
    torch.testing.assert_close(diff[steered], v.expand(int(steered.sum()), -1))


@pytest.mark.parametrize("token,positions", [(2, [2]), (-1, [4]), (slice(1, 3), [1, 2]), ([0, 3], [0, 3])])
def test_token_hook_steers_nothing_elsewhere(model, tokenizer, token, positions):
    v = torch.randn(D, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([enc(tokenizer, PROMPT, True)])
    out = {}
    for name, hooks in (("plain", []), ("steered", [(LAYER, so.make_steering_hook_hf(v, token=token))])):
        store = []
        with so.hf_hooks_contextmanager(model, hooks):
            handle = _capture_block_input(model, LAYER, store)
            try:
                with torch.no_grad():
                    model(input_ids=ids)
            finally:
                handle.remove()
        out[name] = store[0][0]
    diff = out["steered"] - out["plain"]
    steered = torch.zeros(5, dtype=torch.bool)
    steered[positions] = True
    assert float(diff[~steered].abs().max()) == 0.0
    torch.testing.assert_close(diff[steered], v.expand(len(positions), -1))


# ------------------------------------------------------------------------------------- seeding


def test_seed_makes_runs_reproducible(model, tokenizer):
    v1, i1 = opt(model, tokenizer, max_iters=3, lr=0.2, seed=11)
    v2, i2 = opt(model, tokenizer, max_iters=3, lr=0.2, seed=11)
    v3, _ = opt(model, tokenizer, max_iters=3, lr=0.2, seed=12)
    assert torch.equal(v1, v2)
    assert i1["loss_history"] == i2["loss_history"]
    assert not torch.allclose(v1, v3)
    a, _ = so.optimize_vectors(model, [DP], [0, 2], tokenizer=tokenizer, max_iters=2, seed=11)
    b, _ = so.optimize_vectors(model, [DP], [0, 2], tokenizer=tokenizer, max_iters=2, seed=11)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- model untouched


def _state(model):
    return dict(
        weights={k: v.clone() for k, v in model.state_dict().items()},
        flags={n: p.requires_grad for n, p in model.named_parameters()},
        grads={n: p.grad for n, p in model.named_parameters()},
        modes={n: m.training for n, m in model.named_modules()},
        hooks={n: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks),
                   len(m._forward_hooks_with_kwargs)) for n, m in model.named_modules()},
        modules=[(n, id(m)) for n, m in model.named_modules()],
        config=model.config.to_dict(),
    )


def _assert_same(model, before):
    after = _state(model)
    assert after["weights"].keys() == before["weights"].keys()
    for k, v in before["weights"].items():
        assert torch.equal(after["weights"][k], v), k
    assert after["flags"] == before["flags"]
    assert all(g is None for g in after["grads"].values())
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    assert all(h == (0, 0, 0, 0) for h in after["hooks"].values())
    assert after["modules"] == before["modules"]
    assert after["config"] == before["config"]


class _Interrupt:
    """Make the engines' ``steer`` raise ``KeyboardInterrupt`` on its ``n``-th call (inside a forward)."""

    def __init__(self, n):
        self.n, self.calls, self.real = n, 0, engine_mod.steer

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.calls >= self.n:
            raise KeyboardInterrupt
        return self.real(*a, **kw)


CALLS = {
    "fast": lambda m, t: so.optimize_vector(m, [DP], LAYER, tokenizer=t, max_iters=2, seed=0),
    "reference": lambda m, t: so.optimize_vector(m, [DP], LAYER, tokenizer=t, max_iters=2, seed=0,
                                                 engine="reference"),
    "layer0": lambda m, t: so.optimize_vector(m, [DP], 0, tokenizer=t, max_iters=2, seed=0),
    "clamp": lambda m, t: so.optimize_vector(m, [DP], LAYER, tokenizer=t, max_iters=2, seed=0, vector_clamp=1.0),
    "affine": lambda m, t: so.optimize_vector(m, [DP], LAYER, tokenizer=t, max_iters=2, seed=0, affine_rank=2),
    "noise": lambda m, t: so.optimize_vector(m, [DP], LAYER, tokenizer=t, max_iters=2, seed=0, noise_scale=0.1),
    "output_constr": lambda m, t: so.optimize_vector(m, [DP], LAYER, tokenizer=t, max_iters=2, seed=0,
                                                     target_loss=100.0, do_output_constr=True,
                                                     max_output_constr_iters=3),
    "vectors": lambda m, t: so.optimize_vectors(m, [DP], [0, 2], tokenizer=t, max_iters=2, seed=0),
    "minibatch": lambda m, t: so.optimize_vector_minibatch_hf(m, t, ["A b", "C"], [1, 2], dst_completions=[" x"],
                                                              minibatch_size=1, max_iters=2, seed=0),
}


@pytest.fixture
def fresh_model(tokenizer):
    m = make_tiny_model("gemma2", len(tokenizer), initializer_range=INIT)  # per-layer mask types in the config
    m.train()
    m.model.layers[0].eval()
    m.get_input_embeddings().weight.requires_grad_(False)
    return m


@pytest.mark.parametrize("name", list(CALLS))
def test_model_is_left_exactly_as_found(fresh_model, tokenizer, monkeypatch, name):
    before = _state(fresh_model)
    CALLS[name](fresh_model, tokenizer)
    _assert_same(fresh_model, before)
    # ... also when the call is interrupted from inside a forward pass (for the output-constrained
    # call: inside its second phase; the first meets its target at the first evaluation)
    n = 5 if name == "output_constr" else 2
    interrupt = _Interrupt(n)
    monkeypatch.setattr(engine_mod, "steer", interrupt)
    with pytest.raises(KeyboardInterrupt):
        CALLS[name](fresh_model, tokenizer)
    assert interrupt.calls == n
    _assert_same(fresh_model, before)


@pytest.mark.parametrize("kwargs", [
    dict(starting_vec=torch.zeros(D + 1)),
    dict(lr=-1.0),
    dict(affine_rank=0),
    dict(layer=99),
    dict(max_iters=-1),
])
def test_model_is_left_exactly_as_found_when_an_argument_is_bad(fresh_model, tokenizer, kwargs):
    before = _state(fresh_model)
    kwargs = dict(kwargs)
    layer = kwargs.pop("layer", LAYER)
    with pytest.raises((ValueError, TypeError, IndexError)):
        so.optimize_vector(fresh_model, [DP], layer, tokenizer=tokenizer, max_iters=kwargs.pop("max_iters", 1),
                           **kwargs)
    _assert_same(fresh_model, before)


def test_interrupt_inside_the_loop_via_optimizer_step(fresh_model, tokenizer, monkeypatch):
    before = _state(fresh_model)
    n = {"k": 0}
    real = torch.optim.Adam.step

    def step(self, *a, **kw):
        n["k"] += 1
        if n["k"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(KeyboardInterrupt):
        so.optimize_vector(fresh_model, [DP], LAYER, tokenizer=tokenizer, max_iters=5, seed=0)
    _assert_same(fresh_model, before)


# ------------------------------------------------------------------------------------ minibatch

PROMPTS = ["The cat sat", "Hello there my friend", "A", "Once upon a time there", "Yes"]


def test_minibatch_cycles_through_the_prompts(model, tokenizer, monkeypatch):
    subsets = []
    real = FastEngine.run

    def recording(self, spec_fn, **kw):
        subsets.append(kw.get("subset"))
        return real(self, spec_fn, **kw)

    monkeypatch.setattr(FastEngine, "run", recording)
    kw = dict(src_completions=[" no"], dst_completions=[" yes sir"], minibatch_size=2, seed=0)
    vec, info = so.optimize_vector_minibatch_hf(model, tokenizer, PROMPTS, LAYER, max_iters=4, lr=0.1, **kw)
    per_dp = 2  # sequences per prompt: src, dst
    batches = [[0, 1], [2, 3], [4]]
    expected = [[d * per_dp + k for d in batches[i % 3] for k in range(per_dp)] for i in range(5)]
    assert [list(s) for s in subsets] == expected
    assert info["iters"] == 4 and len(info["loss_history"]) == 5
    # the first evaluation is the first minibatch's loss at the starting vector, averaged over its
    # (prompt, completion) pairs as llm-steering-opt reports it
    start, _ = so.optimize_vector_minibatch_hf(model, tokenizer, PROMPTS, LAYER, max_iters=0, **kw)
    hand = sum(float(slow_loss(model, enc(tokenizer, p, True), enc(tokenizer, c, False), kind, {LAYER: start}))
               for p in PROMPTS[:2] for kind, c in ((SRC, " no"), (DST, " yes sir"))) / 4
    assert info["loss_history"][0] == pytest.approx(hand, rel=1e-5)
    assert float((vec - start).norm()) > 1e-4


def test_minibatch_does_not_depend_on_the_padding_side(model, left_tokenizer, right_tokenizer):
    kw = dict(dst_completions=[" yes sir"], minibatch_size=3, max_iters=3, lr=0.1, seed=0)
    a, ia = so.optimize_vector_minibatch_hf(model, left_tokenizer, PROMPTS, LAYER, **kw)
    b, ib = so.optimize_vector_minibatch_hf(model, right_tokenizer, PROMPTS, LAYER, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ia["loss_history"], ib["loss_history"], rtol=1e-5)


@pytest.mark.parametrize("token,positions", [(-1, [4]), (slice(-2, None), [3, 4, 5, 6]), ([1], [1])])
def test_token_hook_steers_the_same_positions_during_cached_generation(model, tokenizer, token, positions):
    """With a KV cache the hook sees one new token at a time; it must steer the same positions as in
    one full pass (negative indices stay attached to the end of the prompt)."""
    v = torch.randn(D, generator=torch.Generator().manual_seed(6))
    ids = torch.tensor([enc(tokenizer, PROMPT, True)])
    store = []
    with so.hf_hooks_contextmanager(model, [(LAYER, so.make_steering_hook_hf(v, token=token))]):
        handle = _capture_block_input(model, LAYER, store)
        try:
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
        finally:
            handle.remove()
    assert out.shape[1] == 8 and [h.shape[1] for h in store] == [5, 1, 1]  # prefill, then one token at a time
    steered = torch.cat(store, dim=1)[0]
    plain = []
    handle = _capture_block_input(model, LAYER, plain)
    try:
        with torch.no_grad():
            model(input_ids=out[:, :-1])  # the block inputs below the steered layer do not depend on steering
    finally:
        handle.remove()
    diff = steered - plain[0][0]
    mask = torch.zeros(7, dtype=torch.bool)
    mask[positions] = True
    assert float(diff[~mask].abs().max()) < 1e-4  # cached vs full forward: float32 round-off only
    torch.testing.assert_close(diff[mask], v.expand(int(mask.sum()), -1), atol=1e-4, rtol=1e-5)
