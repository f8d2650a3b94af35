"""llm-steering-opt's optimiser API as a drop-in: signatures, return shapes, the options it has and we
implement (satisfice, noise_iters, do_noise_abl_relu, do_antipgd, return_vec_history, return_loss_history,
debug, custom output-constraint functions), the older names, and numerical agreement.

Agreement is checked against independent computations written here (a direct loss formula, plain Adam)
and against small numbers recorded from the reference by ``tools/record_reference_numbers.py``
(``tests/data/llm_steering_opt_reference.json``, which names the reference commit): the reference itself
is not needed.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

import steering_opt as so
from steering_opt.compat import llm_steering_opt_legacy as legacy
from steering_opt.data import tokenize_datapoints
from steering_opt.loop import JobState
from steering_opt.options import OptimizeOptions
from steering_opt.parameterization import Additive

DATA = json.loads((Path(__file__).parent / "data" / "llm_steering_opt_reference.json").read_text())
D = 64
LAYER = 1
DP = so.TrainingDatapoint("The cat sat on the", src_completions=[" roof"], dst_completions=[" mat"])


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return make_tiny_model("llama", len(tokenizer))


def direct_losses(model, tok, dps, layer, vec, coldness=0.7):
    """Per-completion losses (float64) from a plain hooked forward of prompt + completion."""
    out = []
    for dp in dps:
        p = tok(dp.prompt)["input_ids"]
        for kind, comps in ((0, dp.src_completions), (1, dp.dst_completions)):
            for c in comps:
                ids = p + tok(c, add_special_tokens=False)["input_ids"]
                block = model.model.layers[layer]
                handle = block.register_forward_pre_hook(
                    lambda m, a, k: ((a[0] + vec.to(a[0]),) + a[1:], k) if a else
                    (a, {**k, "hidden_states": k["hidden_states"] + vec.to(k["hidden_states"])}), with_kwargs=True)
                try:
                    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
                finally:
                    handle.remove()
                lp = torch.log_softmax(coldness * logits, -1)[torch.arange(len(p) - 1, len(ids) - 1), ids[len(p):]]
                out.append(-torch.log1p(-lp.exp()).sum() if kind == 0 else -lp.sum())
    return torch.stack(out)


# --------------------------------------------------------------------------------- signatures, returns


@pytest.mark.parametrize("name", ["optimize_vector", "optimize_vector_minibatch_hf"])
def test_every_reference_parameter_in_its_order_with_its_default(name):
    ref = DATA["signatures"][name]
    ours = list(inspect.signature(getattr(so, name)).parameters.values())
    assert [p.name for p in ours[: len(ref)]] == [n for n, _ in ref]
    for p, (n, default) in zip(ours, ref):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, n
        if name == "optimize_vector_minibatch_hf" and n == "max_affine_norm":
            continue  # theirs None (its affine path cannot run); ours the option's default 2.0 (documented)
        if default is not None or p.default is not inspect.Parameter.empty:
            assert p.default == default, (n, p.default, default)


def test_return_arities_follow_the_reference(model, tokenizer):
    kw = dict(tokenizer=tokenizer, max_iters=1, seed=0)
    (vector,) = so.optimize_vector(model, [DP], LAYER, return_info=False, **kw)
    assert vector.shape == (D,)
    vector, matrix = so.optimize_vector(model, [DP], LAYER, return_info=False, affine_rank=2, **kw)
    assert matrix.shape == (D, D)
    vector, matrix, info = so.optimize_vector(model, [DP], LAYER, affine_rank=2, **kw)
    assert info["iters"] == 1
    (vectors,) = so.optimize_vectors(model, [DP], [0, 2], return_info=False, **kw)
    assert set(vectors) == {0, 2}
    out = so.optimize_vector_minibatch_hf(model, tokenizer, ["A b", "C"], LAYER, [" x"], None, 1, return_info=False,
                                          max_iters=1, seed=0)
    assert len(out) == 1 and out[0].shape == (D,)


def test_positional_call_in_the_reference_order(model, tokenizer):
    # model, datapoints, layer, eps, lr, max_iters, coldness, normalize_token_length, only_hook_prompt,
    # use_transformer_lens, tokenizer, target_loss, return_info
    a = so.optimize_vector(model, [DP], LAYER, 1e-6, 0.1, 2, 0.5, False, False, False, tokenizer, None, True,
                           seed=3)
    b = so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, lr=0.1, max_iters=2, coldness=0.5, seed=3)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[1]["loss"] == b[1]["loss"]


def test_loss_history_as_info_loss_and_vec_history(model, tokenizer):
    v, m, info = so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, max_iters=3, lr=0.1, seed=0,
                                    affine_rank=1, do_target_loss_sum=False, return_loss_history=True,
                                    return_vec_history=True)
    assert info["loss"] == info["loss_history"] and len(info["loss"]) == 4
    hist = info["vec_history"]
    assert len(hist) == 3 and [a.shape for a in hist[-1]] == [(D,), (1, D), (1, D)]
    torch.testing.assert_close(torch.from_numpy(hist[-1][0]), v.cpu(), rtol=0, atol=0)
    assert not torch.equal(torch.from_numpy(hist[0][0]), torch.from_numpy(hist[-1][0]))  # copies, not views
    _, info = so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, max_iters=1, seed=0, do_target_loss_sum=False)
    assert info["loss"] == [[[pytest.approx(x) for x in k] for k in info["completion_losses"][0]]]


def test_transformer_lens_flag_is_checked_against_the_model(model, tokenizer):
    with pytest.raises(TypeError, match="use_transformer_lens"):
        so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, use_transformer_lens=True)
    with pytest.raises(TypeError, match="use_transformer_lens"):
        so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, use_transformer_lens="no")


# ------------------------------------------------------------------------------ the objective, for real


def plain_adam(model, tok, dps, vec0, lr, steps, targets=None):
    """Adam on the direct loss (its sum, or Σ (loss - target)² with ``targets``); vectors after each step."""
    v = vec0.clone().double().requires_grad_(True)
    adam = torch.optim.Adam([v], lr=lr)
    out = []
    for _ in range(steps):
        adam.zero_grad()
        losses = direct_losses(model, tok, dps, LAYER, v)
        obj = losses.sum() if targets is None else ((losses - torch.tensor(targets, dtype=torch.float64)) ** 2).sum()
        obj.backward()
        adam.step()
        out.append(v.detach().clone())
    return out


@pytest.mark.parametrize("satisfice", [False, True])
def test_trajectory_is_plain_adam_on_the_loss(model, tokenizer, satisfice):
    dp = so.TrainingDatapoint("The cat sat on the", src_completions=[" roof"], dst_completions=[" mat"],
                              dst_completions_target_losses=[9.0])
    v0 = torch.randn(D, generator=torch.Generator().manual_seed(1))
    targets = None
    kw = {}
    if satisfice:  # the dst completion's own target (9.0), the global one (2.5) for the src completion
        targets, kw = [2.5, 9.0], dict(satisfice=True, target_loss=2.5, do_target_loss_sum=False)
    info = so.optimize_vector(model, [dp], LAYER, tokenizer=tokenizer, lr=0.05, max_iters=3, starting_vec=v0,
                              return_vec_history=True, **kw)[-1]
    expected = plain_adam(model, tokenizer, [dp], v0, 0.05, 3, targets)
    for got, want in zip(info["vec_history"], expected):
        torch.testing.assert_close(torch.from_numpy(got[0]).double(), want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        first = direct_losses(model, tokenizer, [dp], LAYER, v0)
    assert info["loss_history"][0] == pytest.approx(float(first.sum()), rel=1e-5)


def test_satisfice_needs_a_target(model, tokenizer):
    with pytest.raises(ValueError, match="satisfice"):
        so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, satisfice=True, max_iters=1)


def test_noise_iters_averages_the_draws(model, tokenizer, monkeypatch):
    from steering_opt.engine import FastEngine

    calls = []
    real = FastEngine.run

    def recording(self, spec_fn, **kw):
        out = real(self, spec_fn, **kw)
        calls.append((out.clone(), kw.get("weights")))
        return out

    monkeypatch.setattr(FastEngine, "run", recording)
    info = so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, max_iters=1, noise_scale=0.5, noise_iters=3,
                              seed=0, do_tangent_space_noise=False)[-1]
    evals = [c for c in calls]
    assert len(evals) == 6  # 3 draws per evaluation, 2 evaluations
    assert len({round(float(c[0].sum()), 6) for c in evals[:3]}) == 3  # a fresh draw each time
    assert info["loss_history"][0] == pytest.approx(sum(float(c[0].sum()) for c in evals[:3]) / 3, rel=1e-6)
    assert all(torch.allclose(c[1], torch.full((2,), 1 / 3)) for c in evals[:3])  # mean gradient


def job(tokenizer, **opts):
    dps = [DP, so.TrainingDatapoint("Hello there", dst_completions=[" hi"])]
    seqs = tokenize_datapoints(tokenizer, dps)
    st = JobState({LAYER: Additive(torch.ones(D, requires_grad=True))}, seqs, len(dps),
                  OptimizeOptions(noise_scale=0.5, **opts), torch.Generator().manual_seed(0))
    return st


def test_noise_abl_relu_removes_only_a_downhill_component(tokenizer):
    st = job(tokenizer, do_noise_abl_relu=True)
    g = torch.randn(2, D, generator=torch.Generator().manual_seed(5))
    st.tangent = g
    raw = torch.randn(2, 1, D, generator=torch.Generator().manual_seed(0))[:, 0] * 0.5  # the same draws
    rows = st.noise(D)
    per_dp = rows[[0, 2]]  # first sequence of each datapoint
    for i in range(2):
        if float(raw[i] @ g[i]) > 0:  # uphill: kept as drawn
            torch.testing.assert_close(per_dp[i], raw[i])
        else:  # downhill: its component along g removed
            assert abs(float(per_dp[i] @ g[i])) < 1e-4
            torch.testing.assert_close(per_dp[i], raw[i] - (raw[i] @ g[i]) / (g[i] @ g[i]) * g[i])


def test_antipgd_applies_the_difference_of_successive_draws(tokenizer):
    st = job(tokenizer, do_antipgd=True, do_tangent_space_noise=False)
    gen = torch.Generator().manual_seed(0)
    prev = torch.zeros(2, D)
    for _ in range(3):
        xi = torch.randn(2, 1, D, generator=gen)[:, 0] * 0.5
        rows = st.noise(D)
        torch.testing.assert_close(rows[[0, 2]], xi - prev)
        prev = xi


def test_debug_logs_at_debug_level(model, tokenizer, caplog, capsys):
    with caplog.at_level(logging.DEBUG, logger="steering_opt.loop"):
        so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, max_iters=2, seed=0, debug=True)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("step 0: loss" in m for m in msgs) and any("stopping" in m for m in msgs)
    assert capsys.readouterr().out == ""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="steering_opt.loop"):
        so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, max_iters=2, seed=0)
    assert not caplog.records


@pytest.mark.parametrize("affine", [False, True])
def test_custom_output_constraint_functions_get_the_reference_arguments(model, tokenizer, affine):
    seen = {}

    def pre(model_, datapoints, layer, vector, matrix_left, matrix_right, only_hook_prompt=None):
        seen["pre"] = (model_, datapoints, layer, vector.shape, matrix_left, matrix_right, only_hook_prompt)
        return {"scale": 0.5}

    def loss(model_, datapoints, layer, vector, matrix_left, matrix_right, only_hook_prompt=None, scale=None):
        seen["loss"] = (datapoints, layer, vector.requires_grad, scale,
                        None if matrix_left is None else (matrix_left.shape, matrix_right.shape))
        value = -scale * vector.norm()  # the reference's functions backpropagate themselves and return a number
        value.backward()
        return float(value.detach())

    dps = [DP]
    kw = dict(affine_rank=1) if affine else {}
    out = so.optimize_vector(model, dps, [LAYER], tokenizer=tokenizer, max_iters=1, seed=0, do_output_constr=True,
                             max_output_constr_iters=2, custom_output_constr_loss_func=loss,
                             custom_output_constr_pre_loss_func=pre, only_hook_prompt=True, **kw)
    m, dps_seen, layer, shape, left, right, ohp = seen["pre"]
    assert m is model and dps_seen is dps and layer == [LAYER] and shape == (D,) and ohp is True
    assert (left is None) == (not affine) and (right is None) == (not affine)
    assert seen["loss"][:4] == (dps, [LAYER], True, 0.5)
    assert seen["loss"][4] == (((1, D), (1, D)) if affine else None)
    assert out[-1]["output_constr_iters"] >= 1


# -------------------------------------------------------------------------------------- older names


def test_older_names_warn_once_and_translate(model, tokenizer):
    legacy.warned.clear()
    with pytest.warns(DeprecationWarning, match="optimize_vector"):
        out = so.optimize_completion(model, [DP], LAYER, tokenizer=tokenizer, use_transformer_lens=False,
                                     max_iters=2, lr=0.1, temperature=0.5, seed=0)
    assert len(out) == 1  # return_loss=False by default: (vector,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vec, info = so.optimize_completion(model, [DP], LAYER, tokenizer=tokenizer, use_transformer_lens=False,
                                           max_iters=2, lr=0.1, temperature=0.5, seed=0, return_loss=True,
                                           do_target_loss_avg=False)
    new = so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, max_iters=2, lr=0.1, coldness=0.5, seed=0,
                             do_target_loss_sum=False)
    torch.testing.assert_close(vec, new[0], rtol=0, atol=0)
    assert info["loss"] == new[1]["loss"] and isinstance(info["loss"][0][0], list)
    with pytest.warns(DeprecationWarning, match="optimize_vector_minibatch_hf"):
        old = so.optimize_minibatch_completion_hf(model, tokenizer, ["A b", "C d"], LAYER, [" x"], [" y"], 1,
                                                  max_iters=2, temperature=0.5, do_abl_hook=True, abl_hook_coeff=1.5,
                                                  target_loss_max_loss=False, seed=0)
    cur = so.optimize_vector_minibatch_hf(model, tokenizer, ["A b", "C d"], LAYER, [" x"], [" y"], 1, max_iters=2,
                                          coldness=0.5, vector_clamp=1.5, max_affine_norm=None, seed=0)
    torch.testing.assert_close(old[0], cur[0], rtol=0, atol=0)
    assert old[1]["loss"] == cur[1]["loss"]


def test_matrix_only_affine_steering_with_max_norm_zero(model, tokenizer):
    """The paper's affine experiments call ``optimize_completion(..., affine_rank=1, max_norm=0)``: the matrix
    is learned, the vector stays 0. Without ``affine_rank``, ``max_norm=0`` is refused."""
    vec, mat, info = so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, max_iters=3, lr=0.1, seed=0,
                                        affine_rank=1, max_norm=0, max_affine_norm=1)
    assert float(vec.norm()) == 0.0 and float(mat.norm()) > 0
    assert info["loss_history"][-1] < info["loss_history"][0]
    with pytest.raises(ValueError, match="`max_norm`.*affine_rank"):
        so.optimize_vector(model, [DP], LAYER, tokenizer=tokenizer, max_iters=1, max_norm=0)


# ------------------------------------------------------------------ agreement with recorded reference numbers


def trajectory(model, tok, name):
    case, kw, start = DATA["trajectory_options"][name]
    dps = [so.TrainingDatapoint(p, src_completions=s, dst_completions=d) for p, s, d in DATA["cases"][case]]
    kw = dict(kw)
    if start == "vector":
        kw["starting_vec"] = torch.randn(model.config.hidden_size,
                                         generator=torch.Generator().manual_seed(DATA["start_seed"])) * 2
    n = DATA["n_steps"]
    kw["seed"] = DATA["torch_seed"]  # draws as the reference does after torch.manual_seed(seed)
    info = so.optimize_vector(model, dps, DATA["layer"], tokenizer=tok, eps=0.0, max_iters=n, return_vec_history=True,
                              return_loss_history=True, do_target_loss_sum=False, **kw)[-1]
    return info["loss"][:n], info["vec_history"]


def summary(x):
    x = torch.as_tensor(x).double().flatten()
    probes = torch.randn(2, x.numel(), generator=torch.Generator().manual_seed(DATA["probe_seed"]),
                         dtype=torch.float64)
    return [float(x.norm())] + x[: DATA["n_coords"]].tolist() + (probes @ x).tolist()


def test_losses_at_a_vector_match_the_reference(embedded_model, embedded_tokenizer):
    model, tok = embedded_model, embedded_tokenizer
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(DATA["start_seed"])) * 2
    dps = [so.TrainingDatapoint(p, src_completions=s, dst_completions=d)
           for p, s, d in DATA["cases"]["two_completions"]]
    info = so.optimize_vector(model, dps, DATA["layer"], tokenizer=tok, starting_vec=v, max_iters=0,
                              do_target_loss_sum=False)[-1]
    ours = [x for dp in info["loss"] for kind in dp for x in kind]
    assert ours == pytest.approx(DATA["losses_eps0"], abs=1e-4)
    # the reference's -log(p + eps) (single-token completions: p = exp(-loss), also for src where p is 1 - p_token)
    with_eps = [-math.log(math.exp(-x) + 1e-6) for x in ours]
    assert with_eps == pytest.approx(DATA["losses_eps1e-6"], abs=1e-4)
    with torch.no_grad():
        direct = direct_losses(model, tok, dps, DATA["layer"], v).tolist()
    assert ours == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize("name", ["additive", "affine", "noise", "antipgd", "satisfice", "max_norm"])
def test_trajectories_match_the_reference_step_for_step(embedded_model, embedded_tokenizer, name):
    """Ours with max_iters=N against the reference's run with max_iters=N-1 (it takes one step more)."""
    losses, hist = trajectory(embedded_model, embedded_tokenizer, name)
    ref = DATA["trajectories"][name]
    assert losses == pytest.approx(ref["losses"], abs=2e-4)
    assert len(hist) == len(ref["steps"])
    for ours_step, ref_step in zip(hist, ref["steps"]):
        for t, r in zip(ours_step, ref_step):
            want = [r["norm"]] + r["head"] + r["probes"]
            got = summary(t)
            assert max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, want)) < 3e-3


@pytest.mark.parametrize("iters", [0, 3])
def test_minibatch_loss_is_on_the_reference_scale(embedded_model, embedded_tokenizer, iters):
    src, dst = DATA["minibatch_completions"]
    _, info = so.optimize_vector_minibatch_hf(embedded_model, embedded_tokenizer, DATA["minibatch_prompts"],
                                              DATA["layer"], src, dst, 2, lr=0.1, max_iters=iters,
                                              seed=DATA["torch_seed"])
    assert info["loss"] == pytest.approx(DATA["minibatch"][str(iters)]["loss"], abs=1e-4)
