"""llm-steering-opt's hook, sampling and MELBO utilities as drop-ins, plus TransformerLens support.

Every expected value is computed here from an independent formula (hand-written hooks, plain autograd,
``output_hidden_states``), never from the functions under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from torch import nn

import steering_opt as so
from steering_opt.compat.transformer_lens import HookedTransformerLM, as_causal_lm, optimize_hooked_transformer

D = 64
LAYER = 1
PROMPT, COMPLETION = "The cat sat on the", " mat and then slept"


def enc(tok, text, special):
    return tok(text, add_special_tokens=special)["input_ids"]


def rand(n=D, seed=0, scale=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def model_state(model):
    return ([p.requires_grad for p in model.parameters()], [p.grad for p in model.parameters()],
            [m.training for m in model.modules()], [{**m._forward_pre_hooks} for m in model.modules()])


def logprob_by_hand(model, tok, prompt, completion, hook=None, coldness=1.0):
    """Σ_t log softmax(coldness·logits)[y_t] with ``hook(h) -> h'`` on the input of block LAYER."""
    p, c = enc(tok, prompt, True), enc(tok, completion, False)
    handle = None
    if hook is not None:
        handle = so.get_blocks(model)[LAYER].register_forward_pre_hook(
            lambda mod, args, kwargs: ((hook(args[0]), *args[1:]), kwargs) if args else
            (args, {**kwargs, "hidden_states": hook(kwargs["hidden_states"])}), with_kwargs=True)
    try:
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: -1].double()
    finally:
        if handle is not None:
            handle.remove()
    return torch.log_softmax(coldness * logits, -1)[torch.arange(len(c)), torch.tensor(c)].sum()


# ------------------------------------------------------------------------------------------------ hooks


def test_steering_hook_reference_names_and_plain_registration(tiny_llama, tokenizer):
    v = rand(scale=2.0)
    ids = torch.tensor([enc(tokenizer, PROMPT, True)])
    with torch.no_grad():
        plain = tiny_llama(input_ids=ids, output_hidden_states=True)
        block_in = plain.hidden_states[LAYER]
    expected = block_in.clone()
    expected[:, 1:3] += v  # additive steering on positions 1..2 only
    seen = []
    block = so.get_blocks(tiny_llama)[LAYER]
    for hook in (so.make_steering_hook_hf(vector_=v, token=slice(1, 3)),
                 so.make_steering_hook_hf(vector=v, token=slice(1, 3)),
                 so.make_steering_hook_hf(v, None, slice(1, 3))):
        # how the reference's users attach hooks by hand: a plain forward pre-hook on the block
        handle = block.register_forward_pre_hook(hook)
        probe = block.register_forward_pre_hook(  # runs after it: sees what the block receives
            lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True)
        try:
            with torch.no_grad():
                tiny_llama(input_ids=ids)
        finally:
            probe.remove()
            handle.remove()
        torch.testing.assert_close(seen.pop(), expected)
    # called by hand as hook(module, args): returns the steered hidden states, as the reference does
    out = so.make_steering_hook_hf(v)(None, (block_in,))
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, block_in + v)
    assert not any(m._forward_pre_hooks for m in tiny_llama.modules())
    with pytest.raises(TypeError, match="`vector_`"):
        so.make_steering_hook_hf(v, vector=v)
    with pytest.raises(TypeError, match="`vector_`"):
        so.make_steering_hook_hf()


def test_plain_registration_on_gpt2(tokenizer):
    model = make_tiny_model("gpt2", len(tokenizer))
    v = rand(scale=3.0, seed=4)
    ids = torch.tensor([enc(tokenizer, PROMPT, True)])
    with torch.no_grad():
        expected = logprob_by_hand(model, tokenizer, PROMPT, COMPLETION, hook=lambda h: h + v)
        handle = model.transformer.h[LAYER].register_forward_pre_hook(so.make_steering_hook_hf(v))
        try:
            got = so.get_completion_logprob_hf(model, PROMPT, COMPLETION, tokenizer)
        finally:
            handle.remove()
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert model(input_ids=ids).logits.shape[1] == ids.shape[1]


def test_make_abl_mat_gradient_treats_the_norm_as_constant():
    v = rand(8, seed=1, scale=3.0).requires_grad_(True)
    w = rand(64, seed=2).reshape(8, 8)
    (so.make_abl_mat(v=v) * w).sum().backward()
    n2 = float((v.detach() ** 2).sum())
    # d/dv Σ W ⊙ (−v vᵀ / c) with c = ‖v‖² held constant = −(W + Wᵀ) v / c
    torch.testing.assert_close(v.grad, -(w + w.T) @ v.detach() / n2)
    m = so.make_abl_mat(v.detach())
    torch.testing.assert_close(m, -torch.outer(v.detach(), v.detach()) / n2)
    assert so.make_abl_mat(vector=v.detach()).shape == (8, 8)
    with pytest.raises(ValueError, match="non-zero"):
        so.make_abl_mat(torch.zeros(8))


def test_gradient_through_clamp_hook_matches_the_formula(tiny_llama, tokenizer):
    """A custom loop differentiating through make_steering_hook_hf(c·v, make_abl_mat(v)) and
    get_completion_logprob_hf gets the gradient of h − (h·v) v/‖v‖² + c·v with ‖v‖² constant."""
    c = 0.3
    v0 = rand(seed=3, scale=0.05)  # small ‖v‖: the projection term dominates the gradient
    before = model_state(tiny_llama)

    v = v0.clone().requires_grad_(True)
    with so.hf_hooks_contextmanager(tiny_llama, [(LAYER, so.make_steering_hook_hf(c * v, so.make_abl_mat(v)))]):
        lp = so.get_completion_logprob_hf(tiny_llama, PROMPT, COMPLETION, tokenizer)
    assert lp.requires_grad
    lp.backward()
    got = v.grad.clone()
    after = model_state(tiny_llama)
    assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3]
    assert all(g is None for g in after[1]), "gradient accumulated into the model's weights"

    def grad_of(detach_direction: bool) -> torch.Tensor:
        w = v0.clone().requires_grad_(True)
        n2 = (w.detach() ** 2).sum()
        d = w.detach() if detach_direction else w
        for p in tiny_llama.parameters():
            p.requires_grad_(False)
        try:
            lp = logprob_by_hand(tiny_llama, tokenizer, PROMPT, COMPLETION,
                                 hook=lambda h: h - (h @ d)[..., None] * d / n2 + c * w)
        finally:
            for p, f in zip(tiny_llama.parameters(), before[0]):
                p.requires_grad_(f)
        lp.backward()
        return w.grad

    expected = grad_of(False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    wrong = grad_of(True)  # make_abl_mat detaching v: a visibly different gradient
    assert float(torch.nn.functional.cosine_similarity(wrong, expected, dim=0)) < 0.99


def test_make_activs_hook_hf_collects_block_inputs(tiny_llama, tokenizer):
    ids = torch.tensor([enc(tokenizer, PROMPT, True)])
    acts: list = []
    with torch.no_grad(), so.hf_hooks_contextmanager(tiny_llama, [(LAYER, so.make_activs_hook_hf(acts))]):
        out = tiny_llama(input_ids=ids, output_hidden_states=True)
    assert len(acts) == 1
    torch.testing.assert_close(acts[0], out.hidden_states[LAYER])
    handle = so.get_blocks(tiny_llama)[LAYER].register_forward_pre_hook(so.make_activs_hook_hf(acts))
    try:
        with torch.no_grad():
            again = tiny_llama(input_ids=ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(acts[1], acts[0])
    torch.testing.assert_close(again, out.logits)  # the hook leaves the forward unchanged
    with pytest.raises(TypeError, match="`outlist`"):
        so.make_activs_hook_hf(None)


def test_make_steering_hook_tflens_formula():
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(5))
    v, m = rand(8, seed=6), rand(64, seed=7).reshape(8, 8) / 8
    x_in = x.clone()
    out = so.make_steering_hook_tflens(v, m, token=slice(1, 4))(x, None)
    torch.testing.assert_close(x, x_in)  # out of place
    expected = x.clone()
    expected[:, 1:4] = x[:, 1:4] + v + x[:, 1:4] @ m.T
    torch.testing.assert_close(out, expected)
    out = so.make_steering_hook_tflens(v, token=-1)(x, None)
    expected = x.clone()
    expected[:, -1] += v
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------------------------- sampling


class _Recorder(nn.Module):
    """Wraps a model and records the keyword arguments of each forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls: list[dict] = []

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, **kwargs):
        self.calls.append(kwargs)
        return self.inner(input_ids=input_ids, **{k: v for k, v in kwargs.items() if k != "marker"})


def test_get_completion_logprob_reference_parameters(tiny_llama, tokenizer):
    p, c = enc(tokenizer, PROMPT, True), enc(tokenizer, COMPLETION, False)
    with torch.no_grad():
        logits = tiny_llama(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: -1].double()
    probs = torch.softmax(0.7 * logits, -1)[torch.arange(len(c)), torch.tensor(c)]
    eps = 1e-3
    # positional order: tokenizer, coldness, return_all_probs, do_one_minus, do_log, eps, use_transformer_lens
    total, per = so.get_completion_logprob(tiny_llama, PROMPT, COMPLETION, tokenizer, 0.7, True, True, True, eps,
                                           False)
    np.testing.assert_allclose(per, torch.log(1 - probs + eps).numpy(), rtol=1e-5)
    assert float(total) == pytest.approx(float(torch.log(1 - probs + eps).sum()), rel=1e-5)
    prod = so.get_completion_logprob_hf(tiny_llama, PROMPT, COMPLETION, tokenizer, coldness=0.7, do_log=False)
    assert float(prod) == pytest.approx(float(probs.prod()), rel=1e-4)
    older = so.get_completion_logprob_hf(tiny_llama, PROMPT, COMPLETION, tokenizer, temperature=0.7)
    assert float(older) == pytest.approx(float(torch.log(probs).sum()), rel=1e-5)
    rec = _Recorder(tiny_llama)
    so.get_completion_logprob_hf(rec, PROMPT, COMPLETION, tokenizer, marker=123)
    assert rec.calls[-1].get("marker") == 123  # **kwargs reach the model
    with pytest.raises(TypeError, match="`use_transformer_lens=True`"):
        so.get_completion_logprob(tiny_llama, PROMPT, COMPLETION, tokenizer, use_transformer_lens=True)
    with pytest.raises(ValueError, match="`eps`"):
        so.get_completion_logprob_hf(tiny_llama, PROMPT, COMPLETION, tokenizer, eps=-1.0)


def _next_probs(model, ids, coldness):
    with torch.no_grad():
        return torch.softmax(coldness * model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)


def test_sample_most_likely_completions_reference_positional_order(tiny_llama, tokenizer):
    prompt = "Hello there"
    p = enc(tokenizer, prompt, True)
    # positions 6..12: coldness, do_one_minus, gc_interval, use_total_probs, reverse, return_log_probs,
    # return_token_probs
    comps, probs = so.sample_most_likely_completions_hf(tiny_llama, tokenizer, prompt, None, 3, 0, 0.8, True, 1,
                                                        False, False, False, True)
    one_minus = 1 - _next_probs(tiny_llama, p, 0.8)
    top = torch.topk(one_minus, 3)
    assert comps == tokenizer.batch_decode([[t] for t in top.indices.tolist()])
    np.testing.assert_allclose(probs[:, 0], top.values.numpy(), rtol=1e-5)
    # use_total_probs at position 9, reverse at 10
    kw = dict(k=3, iters=1, coldness=1.0, do_one_minus=False, gc_interval=None, use_total_probs=True, reverse=False)
    by_kw = so.sample_most_likely_completions_hf(tiny_llama, tokenizer, prompt, None, **kw)
    by_pos = so.sample_most_likely_completions_hf(tiny_llama, tokenizer, prompt, None, 3, 1, 1.0, False, None, True,
                                                  False)
    assert by_kw[0] == by_pos[0]
    np.testing.assert_allclose(by_kw[1], by_pos[1])
    rev, rev_p = so.sample_most_likely_completions_hf(tiny_llama, tokenizer, prompt, None, 2, 0, 1.0, False, 3, False,
                                                      True)
    least = torch.topk(-_next_probs(tiny_llama, p, 1.0), 2)
    assert rev == tokenizer.batch_decode([[t] for t in least.indices.tolist()])
    np.testing.assert_allclose(rev_p[:, 0], least.values.numpy(), rtol=1e-5, atol=1e-12)
    older = so.sample_most_likely_completions_hf(tiny_llama, tokenizer, prompt, k=3, iters=0, temperature=0.8)
    newer = so.sample_most_likely_completions_hf(tiny_llama, tokenizer, prompt, k=3, iters=0, coldness=0.8)
    assert older[0] == newer[0]
    rec = _Recorder(tiny_llama)
    so.sample_most_likely_completions_hf(rec, tokenizer, prompt, k=2, iters=1, marker="x")
    assert len(rec.calls) == 2 and all(call.get("marker") == "x" for call in rec.calls)
    with pytest.raises(ValueError, match="`gc_interval`"):
        so.sample_most_likely_completions_hf(tiny_llama, tokenizer, prompt, gc_interval=0)
    with pytest.raises(ValueError, match="`temperature`"):
        so.sample_most_likely_completions_hf(tiny_llama, tokenizer, prompt, coldness=0.5, temperature=0.8)


# ------------------------------------------------------------------------------------------------- MELBO


def _melbo_by_hand(model, tok, dp, v, target):
    """Σ_completions −mean_t ‖h_T(steered) − h_T(plain)‖ from the last prompt token on (output_hidden_states)."""
    p = enc(tok, dp.prompt, True)
    total = torch.zeros(())
    for comp in dp.src_completions + dp.dst_completions:
        ids = torch.tensor([p + enc(tok, comp, False)])
        with torch.no_grad():
            plain = model(input_ids=ids, output_hidden_states=True).hidden_states[target][0, len(p) - 1:]
        handle = so.get_blocks(model)[LAYER].register_forward_pre_hook(
            lambda mod, args, kwargs: ((args[0] + v, *args[1:]), kwargs), with_kwargs=True)
        try:
            steered = model(input_ids=ids, output_hidden_states=True).hidden_states[target][0, len(p) - 1:]
        finally:
            handle.remove()
        total = total - (steered - plain).norm(dim=-1).mean()
    return total


def test_make_melbo_loss_funcs_reference_signatures(tiny_llama, tokenizer):
    target = 3
    dp = so.TrainingDatapoint(PROMPT, src_completions=[" mat"], dst_completions=[" roof of the house"])
    pre, loss = so.make_melbo_loss_funcs(target, tokenizer=tokenizer)
    v = rand(seed=8, scale=2.0).requires_grad_(True)
    before = model_state(tiny_llama)
    pre_dict = pre(tiny_llama, [dp], LAYER, v, None, None, only_hook_prompt=False)
    acts = pre_dict["target_layer_activs"]
    n_prompt = len(enc(tokenizer, PROMPT, True))
    assert [[a.shape for a in kind] for kind in acts[0]] == [
        [(1 + len(enc(tokenizer, " mat", False)), D)], [(1 + len(enc(tokenizer, " roof of the house", False)), D)]]
    value = loss(tiny_llama, [dp], LAYER, v, None, None, only_hook_prompt=False, **pre_dict)
    assert isinstance(value, float) and n_prompt > 0
    got = v.grad.clone()  # the loss function has backpropagated itself, as in the reference

    w = v.detach().clone().requires_grad_(True)
    for prm in tiny_llama.parameters():
        prm.requires_grad_(False)
    try:
        expected = _melbo_by_hand(tiny_llama, tokenizer, dp, w, target)
    finally:
        for prm, f in zip(tiny_llama.parameters(), before[0]):
            prm.requires_grad_(f)
    expected.backward()
    assert value == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(got, w.grad, rtol=1e-4, atol=1e-6)
    v.grad = None
    assert loss(tiny_llama, [dp], LAYER, v, None, None, only_calculate_loss=True, **pre_dict) == pytest.approx(value)
    assert v.grad is None
    after = model_state(tiny_llama)
    assert after[0] == before[0] and after[3] == before[3] and all(g is None for g in after[1])
    with pytest.raises(ValueError, match="tokenizer="):
        so.make_melbo_loss_funcs(target)[0](tiny_llama, [dp], LAYER, v, None, None)


def test_core_melbo_objective_in_optimize(tiny_llama, tokenizer):
    dp = so.TrainingDatapoint(PROMPT, dst_completions=[" roof"])
    pre, loss = so.make_melbo_objective(3)
    res = so.optimize(tiny_llama, tokenizer, [dp], LAYER, lr=0.1, max_iters=2, target_loss=100.0,
                      do_output_constr=True, max_output_constr_iters=3, seed=0,
                      custom_output_constr_pre_loss_func=pre, custom_output_constr_loss_func=loss)
    assert math.isfinite(res.norm) and res.extra["output_constr_iters"] >= 1


# ------------------------------------------------------------------------------------------ TransformerLens


@pytest.fixture(scope="module")
def hooked(tokenizer):
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(n_layers=3, d_model=32, n_ctx=128, d_head=8, n_heads=4, d_vocab=len(tokenizer),
                                     act_fn="gelu", normalization_type="LN", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return tl.HookedTransformer(cfg, tokenizer=tokenizer).eval()


def test_transformer_lens_logprob_and_tflens_hook(hooked):
    v = rand(32, seed=9, scale=2.0)
    p = hooked.to_tokens(PROMPT)[0].tolist()
    c = hooked.to_tokens(COMPLETION, prepend_bos=False)[0].tolist()

    def by_hand(fwd_hooks):
        with torch.no_grad(), hooked.hooks(fwd_hooks=fwd_hooks):
            logits = hooked(torch.tensor([p + c]))[0, len(p) - 1: -1].double()
        return float(torch.log_softmax(0.7 * logits, -1)[torch.arange(len(c)), torch.tensor(c)].sum())

    site = f"blocks.{LAYER}.hook_resid_pre"
    plain = so.get_completion_logprob(hooked, PROMPT, COMPLETION, None, 0.7, use_transformer_lens=True)
    assert float(plain) == pytest.approx(by_hand([]), rel=1e-5)
    with hooked.hooks(fwd_hooks=[(site, so.make_steering_hook_tflens(v))]):
        steered = so.get_completion_logprob(hooked, PROMPT, COMPLETION, coldness=0.7, use_transformer_lens=True)
    assert float(steered) == pytest.approx(by_hand([(site, lambda x, hook: x + v)]), rel=1e-5)
    assert abs(float(steered) - float(plain)) > 1e-3
    # the core's decoder_block site on the adapter is blocks.L.hook_resid_pre
    lm, tok = as_causal_lm(hooked)
    with so.hf_hooks_contextmanager(lm, [(LAYER, so.make_steering_hook_hf(v))]):
        via_adapter = so.get_completion_logprob_hf(lm, PROMPT, COMPLETION, tok, coldness=0.7)
    assert float(via_adapter) == pytest.approx(float(steered), rel=1e-5)
    with pytest.raises(TypeError, match="`use_transformer_lens=False`"):
        so.get_completion_logprob(hooked, PROMPT, COMPLETION, use_transformer_lens=False)


def test_optimize_hooked_transformer_and_melbo(hooked):
    dp = so.TrainingDatapoint(PROMPT, dst_completions=[" roof"], src_completions=[" mat"])
    flags = [p.requires_grad for p in hooked.parameters()]
    res = optimize_hooked_transformer(hooked, [dp], LAYER, lr=0.2, max_iters=4, seed=0)
    assert res.vector.shape == (32,) and res.iters == 4
    site = f"blocks.{LAYER}.hook_resid_pre"
    with hooked.hooks(fwd_hooks=[(site, so.make_steering_hook_tflens(res.vector.detach()))]):
        dst = so.get_completion_logprob(hooked, PROMPT, " roof", coldness=0.7, use_transformer_lens=True)
        src = so.get_completion_logprob(hooked, PROMPT, " mat", coldness=0.7, use_transformer_lens=True,
                                        do_one_minus=True)
    assert res.loss == pytest.approx(-float(dst) - float(src), rel=1e-4)
    assert res.loss_history[-1] < res.loss_history[0]
    assert [p.requires_grad for p in hooked.parameters()] == flags
    assert isinstance(as_causal_lm(hooked)[0], HookedTransformerLM)
    # reference-shaped MELBO on a HookedTransformer (the reference's only supported case)
    pre, loss = so.make_melbo_loss_funcs(2)
    v = rand(32, seed=10).requires_grad_(True)
    pre_dict = pre(hooked, [dp], LAYER, v, None, None, only_hook_prompt=False)
    value = loss(hooked, [dp], LAYER, v, None, None, only_hook_prompt=False, **pre_dict)
    assert value < 0 and v.grad is not None and bool(v.grad.abs().sum() > 0)
