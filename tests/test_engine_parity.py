"""The fast engine computes exactly what the reference engine computes (DESIGN.md §5, issue 4).

For every steering option (additive, clamp, affine, noise, several layers shared or separate,
``token`` ints / slices / lists incl. negative, ``is_negative``, ``only_hook_prompt``, small token
budgets that split batches) and several architectures (incl. sliding-window variants), the
per-completion losses and the gradients w.r.t. every steering parameter agree to 1e-4 relative;
whole optimisation trajectories agree too, and so does one short run on the embedded 135M model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import ARCHS, SLIDING_OVERRIDES, make_tiny_model

import steering_opt as so
from steering_opt.data import SRC, tokenize_datapoints
from steering_opt.engine import FastEngine, Objective, ReferenceEngine
from steering_opt.loop import JobState, spec_for, tangent_gradients
from steering_opt.options import OptimizeOptions
from steering_opt.parameterization import Additive, Affine, Clamp

D = 64
INIT = 0.3
RTOL = 1e-4

BASE = [  # different prompt lengths; several completions of different lengths per prompt
    ("The capital of France is", [" Paris, of course.", " Rome"], [" Berlin", " Madrid or maybe Lisbon"]),
    ("Say", [" no"], [" yes please", " ok"]),
    ("Once upon a time, in a land far away, there", [], [" lived a king"]),
]
LONGEST = 15  # tokens of the longest single (prompt + completion) sequence above


def datapoints(token=(None, None, None), negative=(False, False, False)):
    return [so.TrainingDatapoint(p, src_completions=list(s), dst_completions=list(d), token=t, is_negative=n)
            for (p, s, d), t, n in zip(BASE, token, negative)]


def test_the_datapoints_are_what_the_cases_assume(tokenizer):
    seqs = tokenize_datapoints(tokenizer, datapoints())
    assert max(len(s.ids) for s in seqs) == LONGEST
    assert len({s.prompt_len for s in seqs}) == 3
    # the first prompt followed by all its completions is longer than any single sequence
    first = [s for s in seqs if s.datapoint == 0]
    assert first[0].prompt_len + sum(s.completion_len for s in first) > LONGEST


# ------------------------------------------------------------------------------------- models

MODEL_OVERRIDES = {
    # sliding windows shorter than the sequences: different layers get different mask types
    **{f"{arch}-sliding": (arch, SLIDING_OVERRIDES[arch]) for arch in ("gemma2", "qwen2", "mistral")
       if arch in ARCHS},
    # a window that never binds within one sequence but would across a datapoint's packed completions
    "gemma2-window": ("gemma2", dict(sliding_window=LONGEST)),
}
MAIN_ARCHS = [a for a in ("llama", "gpt2", "gpt_neox") if a in ARCHS]
MORE_ARCHS = [a for a in ("gemma2", "qwen2") if a in ARCHS] + [n for n in MODEL_OVERRIDES if n.split("-")[0]
                                                                 in ARCHS]


class _Models:
    def __init__(self, vocab: int):
        self.vocab, self.cache = vocab, {}

    def __getitem__(self, name: str):
        if name not in self.cache:
            arch, overrides = MODEL_OVERRIDES.get(name, (name, {}))
            self.cache[name] = make_tiny_model(arch, self.vocab, initializer_range=INIT, **overrides)
        return self.cache[name]


@pytest.fixture(scope="module")
def models(tokenizer):
    return _Models(len(tokenizer))


# -------------------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    name: str
    layers: list[int]
    token: tuple = (None, None, None)
    negative: tuple = (False, False, False)
    only_hook_prompt: bool = False
    clamp: float | None = None
    affine: int = 0
    separate: bool = False
    noise: bool = False
    max_batch_tokens: int = 16384
    objective: Objective = dataclasses.field(default_factory=Objective)


CASES = [
    Case("additive", [1]),
    Case("layer0", [0]),
    Case("last_layer_objective", [3], objective=Objective(coldness=1.3, do_one_minus=False,
                                                           normalize_token_length=True)),
    Case("clamp", [1], clamp=1.5),
    Case("clamp_tokens_negative", [2], clamp=-0.5, token=(slice(1, 3), None, -1), negative=(False, True, False)),
    Case("affine", [1], affine=2),
    Case("affine_shared_layers", [0, 2], affine=2, negative=(True, False, False)),
    Case("shared_layers", [1, 3]),
    Case("separate_layers", [0, 2], separate=True),
    Case("noise", [1], noise=True),
    Case("noise_layers_negative", [1, 2], noise=True, negative=(False, True, True)),
    Case("token_ints", [1], token=(2, -1, [0, 3])),
    Case("token_slices", [1], token=(slice(1, 4), slice(-2, None), slice(None, -3))),
    Case("is_negative", [1], negative=(True, False, True)),
    Case("only_hook_prompt", [1], only_hook_prompt=True, token=(None, slice(-2, None), None)),
    Case("small_batches", [1, 2], max_batch_tokens=12, token=(None, -1, None)),
]
CASE_IDS = [c.name for c in CASES]
SOME_CASES = [c for c in CASES if c.name in ("additive", "clamp_tokens_negative", "affine_shared_layers",
                                             "noise_layers_negative", "token_slices", "only_hook_prompt",
                                             "small_batches")]


def run_engine(engine_cls, model, seqs, case):
    """Losses and gradients (src-only and dst-only weighted) of every steering parameter."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(D, generator=g) * 2
    if case.separate:
        vectors = {layer: (torch.randn(D, generator=g) * 2).requires_grad_(True) for layer in case.layers}
    else:
        v = shared.clone().requires_grad_(True)
        vectors = {layer: v for layer in case.layers}
    left = right = None
    if case.affine:
        left = (torch.randn(case.affine, D, generator=g) * 0.2).requires_grad_(True)
        right = (torch.randn(case.affine, D, generator=g) * 0.2).requires_grad_(True)
    state = job_state(vectors, left, right, case.clamp, seqs, noise=case.noise)
    kw = dict(max_batch_tokens=case.max_batch_tokens) if engine_cls is FastEngine else {}
    engine = engine_cls(model, seqs, case.layers, case.objective, **kw)
    out = {}
    noise = None
    if case.noise:
        tangent_gradients(engine, [state], sorted(case.layers), D, torch.device("cpu"))
        out["noise_grads"] = state.tangent.clone()
        noise = state.noise(D)
        out["noise"] = {k: noise.clone() for k in case.layers}
    is_src = torch.tensor([s.kind == SRC for s in seqs], dtype=torch.float32)
    for name, w in (("src", is_src), ("dst", 1 - is_src)):
        for t in state.tensors:
            t.grad = None
        out[f"losses_{name}"] = engine.run(spec_of(state, noise), weights=w)
        out[f"grads_{name}"] = [t.grad.clone() for t in state.tensors]
    return out


def job_state(vectors, left=None, right=None, clamp=None, seqs=(), noise=False):
    """A one-job loop state over ``vectors`` ``{layer: tensor}`` (layers sharing a tensor share parameters)."""
    made = {}

    def param(v):
        if clamp is not None:
            return Clamp(v, clamp)
        return Affine(v, left, right) if left is not None else Additive(v)

    steering = {layer: made.setdefault(id(v), param(v)) for layer, v in vectors.items()}
    n_dp = max(s.datapoint for s in seqs) + 1
    return JobState(steering, list(seqs), n_dp, OptimizeOptions(noise_scale=0.5 if noise else None),
                    torch.Generator().manual_seed(1))


def spec_of(state, noise=None):
    return spec_for([state], sorted(state.steering), torch.zeros(len(state.seqs), dtype=torch.long), state.signs,
                    noise)


def assert_rel(a, b, what, rtol=RTOL):
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err < rtol, f"{what}: relative error {err:.2e}"


def compare_engines(model, tok, case):
    seqs = tokenize_datapoints(tok, datapoints(case.token, case.negative), only_hook_prompt=case.only_hook_prompt)
    fast = run_engine(FastEngine, model, seqs, case)
    ref = run_engine(ReferenceEngine, model, seqs, case)
    for key in ("losses_src", "losses_dst"):
        torch.testing.assert_close(fast[key], ref[key], rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(fast["losses_src"], fast["losses_dst"], rtol=1e-6, atol=0)  # weights don't matter
    for key in ("grads_src", "grads_dst"):
        assert len(fast[key]) == len(ref[key])
        for i, (a, b) in enumerate(zip(fast[key], ref[key])):
            assert float(b.norm()) > 0, f"{key}[{i}] is zero"
            assert_rel(a, b, f"{key}[{i}]")
    if case.noise:
        assert_rel(fast["noise_grads"], ref["noise_grads"], "tangent-noise gradient")
        for layer in case.layers:
            assert_rel(fast["noise"][layer], ref["noise"][layer], "noise")
    return fast


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("arch", MAIN_ARCHS)
def test_fast_engine_matches_reference(models, tokenizer, arch, case):
    compare_engines(models[arch], tokenizer, case)


@pytest.mark.parametrize("case", SOME_CASES, ids=[c.name for c in SOME_CASES])
@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_fast_engine_matches_reference_more_architectures(models, tokenizer, arch, case):
    compare_engines(models[arch], tokenizer, case)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("token_ints", "is_negative", "small_batches")],
                         ids=["token_ints", "is_negative", "small_batches"])
def test_padding_side_of_the_tokenizer_does_not_matter(models, left_tokenizer, right_tokenizer, case):
    left = compare_engines(models["llama"], left_tokenizer, case)
    right = compare_engines(models["llama"], right_tokenizer, case)
    torch.testing.assert_close(left["losses_dst"], right["losses_dst"], rtol=1e-6, atol=0)
    for a, b in zip(left["grads_dst"], right["grads_dst"]):
        assert_rel(a, b, "grads", rtol=1e-6)


def test_a_sequence_steered_nowhere_has_zero_gradient_in_both_engines(models, tokenizer):
    """``only_hook_prompt`` with ``token`` pointing into the completion steers nothing: zero gradient."""
    seqs = tokenize_datapoints(tokenizer, datapoints(token=(slice(4, None),) * 3), only_hook_prompt=True)
    assert seqs[4].datapoint == 1 and not any(seqs[4].steer_positions)  # "Say" is 1 token: nothing to steer
    for cls in (FastEngine, ReferenceEngine):
        v = torch.ones(D, requires_grad=True)
        state = job_state({1: v}, seqs=seqs)
        w = torch.zeros(len(seqs))
        w[4] = 1.0
        cls(models["llama"], seqs, [1], Objective()).run(spec_of(state), weights=w)
        assert v.grad is not None and float(v.grad.abs().max()) == 0.0


# --------------------------------------------------------------------------------- trajectories

TRAJECTORIES = {
    "additive": dict(layer=1),
    "clamp": dict(layer=1, vector_clamp=1.0),
    "affine": dict(layer=1, affine_rank=2, max_affine_norm=1.0, max_norm=3.0),
    "noise": dict(layer=1, noise_scale=0.3),
    "plain_noise": dict(layer=2, noise_scale=0.3, do_tangent_space_noise=False),
    "shared_layers": dict(layer=[0, 2], coldness=1.2, normalize_token_length=True),
    "tokens_negative": dict(layer=1, dps=dict(token=(slice(1, 3), -1, [0, 2]), negative=(False, True, False))),
    "only_hook_prompt": dict(layer=2, only_hook_prompt=True, do_one_minus=False),
}


def _trajectory(model, tok, engine, kw):
    kw = dict(kw)
    dps = datapoints(**kw.pop("dps", {}))
    out = so.optimize_vector(model, dps, kw.pop("layer"), tokenizer=tok, max_iters=10, lr=0.1, seed=0,
                             engine=engine, **kw)
    return out[0], out[-1]


@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_optimisation_trajectories_match(models, tokenizer, name):
    vf, f = _trajectory(models["llama"], tokenizer, "fast", TRAJECTORIES[name])
    vr, r = _trajectory(models["llama"], tokenizer, "reference", TRAJECTORIES[name])
    assert len(f["loss_history"]) == len(r["loss_history"]) == 11
    np.testing.assert_allclose(f["loss_history"], r["loss_history"], rtol=RTOL)
    assert f["loss_history"][-1] < f["loss_history"][0]
    assert_rel(vf, vr, "final vector")


@pytest.mark.parametrize("arch", [a for a in ("gpt2", "gpt_neox", "gemma2-window", "qwen2-sliding")
                                  if a.split("-")[0] in ARCHS])
def test_optimisation_trajectories_match_other_architectures(models, tokenizer, arch):
    kw = TRAJECTORIES["tokens_negative"]
    vf, f = _trajectory(models[arch], tokenizer, "fast", kw)
    vr, r = _trajectory(models[arch], tokenizer, "reference", kw)
    np.testing.assert_allclose(f["loss_history"], r["loss_history"], rtol=RTOL)
    assert_rel(vf, vr, "final vector")


def test_optimize_vectors_trajectories_match(models, tokenizer):
    kw = dict(max_iters=10, lr=0.1, seed=0, regularization_weight=0.01, sparsity_weight=0.1, entropy_weight=1.0)
    vf, f = so.optimize_vectors(models["gpt2"], datapoints(), [0, 1, 3], tokenizer=tokenizer, engine="fast", **kw)
    vr, r = so.optimize_vectors(models["gpt2"], datapoints(), [0, 1, 3], tokenizer=tokenizer, engine="reference",
                                **kw)
    np.testing.assert_allclose(f["loss_history"], r["loss_history"], rtol=RTOL)
    for layer in (0, 1, 3):
        assert_rel(vf[layer], vr[layer], f"vector of layer {layer}")


def test_output_constrained_phase_matches(models, tokenizer):
    kw = dict(max_iters=15, lr=1.0, seed=0, target_loss=40.0, do_output_constr=True, output_constr_lr=0.2,
              max_output_constr_iters=10)
    vf, f = so.optimize_vector(models["llama"], datapoints(), 1, tokenizer=tokenizer, engine="fast", **kw)
    vr, r = so.optimize_vector(models["llama"], datapoints(), 1, tokenizer=tokenizer, engine="reference", **kw)
    assert f["iters"] == r["iters"] and f["output_constr_iters"] == r["output_constr_iters"]
    np.testing.assert_allclose(f["output_constr_norm_history"], r["output_constr_norm_history"], rtol=RTOL)
    assert_rel(vf, vr, "final vector")


@pytest.mark.parametrize("tok_side", ["left", "right"])
def test_minibatch_matches_the_reference_engine(models, left_tokenizer, right_tokenizer, tok_side):
    tok = left_tokenizer if tok_side == "left" else right_tokenizer
    prompts = ["The cat sat", "Hello there my friend", "A", "Once upon a time there", "Yes"]
    kw = dict(src_completions=[" no"], dst_completions=[" yes sir"], minibatch_size=2, max_iters=6, lr=0.1, seed=0)
    vf, f = so.optimize_vector_minibatch_hf(models["llama"], tok, prompts, 1, engine="fast", **kw)
    vr, r = so.optimize_vector_minibatch_hf(models["llama"], tok, prompts, 1, engine="reference", **kw)
    np.testing.assert_allclose(f["loss_history"], r["loss_history"], rtol=RTOL)
    assert_rel(vf, vr, "final vector")


# ------------------------------------------------------------------------------ embedded model


@pytest.mark.embedded
def test_embedded_model_fast_matches_reference(embedded_model, tokenizer):
    model, tok = embedded_model if isinstance(embedded_model, tuple) else (embedded_model, tokenizer)
    dp = so.TrainingDatapoint("The capital of France is", src_completions=[" Paris"],
                              dst_completions=[" Madrid", " a city"])
    kw = dict(max_iters=2, lr=0.5, seed=0, starting_norm=4.0)
    vf, f = so.optimize_vector(model, [dp], 12, tokenizer=tok, engine="fast", **kw)
    vr, r = so.optimize_vector(model, [dp], 12, tokenizer=tok, engine="reference", **kw)
    np.testing.assert_allclose(f["loss_history"], r["loss_history"], rtol=RTOL)
    assert f["loss_history"][-1] != f["loss_history"][0]
    for j in range(2):
        np.testing.assert_allclose(f["completion_losses"][0][j], r["completion_losses"][0][j], rtol=RTOL)
    assert_rel(vf, vr, "final vector")
