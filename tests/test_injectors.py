"""One steering API: SteeringVector arithmetic/apply/patch, token positions that are the same with and without a
KV cache, ActivationHook / ActivationInjector / MultiVectorInjector, generate_with_steering, and the same path
for optimised and contrastive vectors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import steering_opt as so
from steering_opt import arch
from steering_opt.compat.rotalabs_steer import (
    ActivationHook,
    ActivationInjector,
    MultiVectorInjector,
    generate_with_steering,
)
from steering_opt.contrastive import ablation_operator, train_steering_vector
from steering_opt.vector import SteeringVector

D = 64
PAIRS = [("I love this, thank you!", "I hate this."), ("What a wonderful day", "What a terrible day it is")]


def _vec(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(D, generator=torch.Generator().manual_seed(seed))


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


IDS = torch.tensor([[5, 17, 301, 42, 9, 77]])


# ------------------------------------------------------------------------------------ arithmetic


def test_arithmetic():
    a = SteeringVector({1: _vec(1), 2: _vec(2)}, metadata={"method": "x"})
    b = SteeringVector({2: _vec(3), 3: _vec(4)})
    s = a + b
    assert s.layers == [1, 2, 3]
    torch.testing.assert_close(s.layer_activations[2], _vec(2) + _vec(3))
    torch.testing.assert_close(s.layer_activations[1], _vec(1))
    torch.testing.assert_close((a - b).layer_activations[3], -_vec(4))
    torch.testing.assert_close((2 * a).layer_activations[1], 2 * _vec(1))
    torch.testing.assert_close((a * 2).layer_activations[2], (a / 0.5).layer_activations[2])
    torch.testing.assert_close((-a).layer_activations[1], -_vec(1))
    torch.testing.assert_close(sum([a, b]).layer_activations[2], s.layer_activations[2])
    assert a.layer_activations[1] is not s.layer_activations[1]  # no aliasing
    torch.testing.assert_close(a.layer_activations[1], _vec(1))  # operands unchanged
    with pytest.raises(ValueError, match="incompatible"):
        a + SteeringVector({1: _vec(1)}, layer_type="mlp")
    with pytest.raises(ValueError, match="incompatible"):
        a + SteeringVector({1: torch.zeros(8)})
    with pytest.raises(ValueError, match="only additive"):
        a + SteeringVector({1: _vec(1)}, clamp=1.0)
    with pytest.raises(TypeError):
        a + 1.0
    with pytest.raises(TypeError):
        a * "2"
    with pytest.raises(TypeError, match="keys must be int layers"):
        SteeringVector({"1": _vec(1)})
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        SteeringVector({1: [1.0, 2.0]})


def test_scaling_equals_multiplier_for_every_kind(tiny_llama):
    additive = SteeringVector({1: _vec(1, 3), 2: _vec(2, 3)})
    clamp = SteeringVector({2: _vec(3, 3)}, clamp=0.5)
    g = torch.Generator().manual_seed(5)
    affine = SteeringVector({2: _vec(4)}, affine={2: (torch.randn(2, D, generator=g), torch.randn(2, D, generator=g))})
    for vec in (additive, clamp, affine):
        with vec.apply(tiny_llama, multiplier=-1.5):
            want = _logits(tiny_llama, IDS)
        with (vec * -1.5).apply(tiny_llama):
            got = _logits(tiny_llama, IDS)
        torch.testing.assert_close(got, want)
        with vec.apply(tiny_llama):
            assert not torch.allclose(_logits(tiny_llama, IDS), want)


# ------------------------------------------------------------------------------------ apply / patch


def test_apply_equals_tutorial_hooks(tiny_llama):
    v = _vec(1, 2)
    with so.hf_hooks_contextmanager(tiny_llama, [(2, so.make_steering_hook_hf(v))]):
        want = _logits(tiny_llama, IDS)
    with SteeringVector({2: v}).apply(tiny_llama):
        torch.testing.assert_close(_logits(tiny_llama, IDS), want)
    with so.hf_hooks_contextmanager(tiny_llama, [(2, so.make_steering_hook_hf(v, clamp=0.7))]):
        want = _logits(tiny_llama, IDS)
    with SteeringVector({2: v}, clamp=0.7).apply(tiny_llama):
        torch.testing.assert_close(_logits(tiny_llama, IDS), want)


def test_patch_handle_and_cleanup(tiny_llama):
    n0 = _n_hooks(tiny_llama)
    vec = SteeringVector({1: _vec(1, 3), 3: _vec(2, 3)})
    base = _logits(tiny_llama, IDS)
    handle = vec.patch(tiny_llama, multiplier=2.0)
    assert _n_hooks(tiny_llama) > n0
    steered = _logits(tiny_llama, IDS)
    handle.remove()
    assert _n_hooks(tiny_llama) == n0 and not torch.allclose(steered, base)
    torch.testing.assert_close(_logits(tiny_llama, IDS), base)
    with pytest.raises(RuntimeError, match="inside"):
        with vec.apply(tiny_llama):
            raise RuntimeError("inside")
    assert _n_hooks(tiny_llama) == n0
    # a bad layer is found before any hook is registered
    with pytest.raises(ValueError, match="out of range"):
        SteeringVector({1: _vec(1), 9: _vec(2)}).patch(tiny_llama)
    assert _n_hooks(tiny_llama) == n0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(multiplier="2"), TypeError, "`multiplier` must be a finite number"),
        (dict(multiplier=float("nan")), TypeError, "`multiplier` must be a finite number"),
        (dict(min_token_index=-1), ValueError, "`min_token_index` must be an int >= 0"),
        (dict(token_indices="abc"), TypeError, "`token_indices` must be an int"),
        (dict(token_indices=[0.5]), TypeError, "`token_indices` must hold ints"),
        (dict(token_indices=slice(0, 4, 2)), ValueError, "slice step must be 1"),
        (dict(token_indices=torch.ones(2, 2, dtype=torch.bool)), ValueError, "must be 1-D"),
        (dict(injection_mode="middle"), ValueError, "`injection_mode` must be one of"),
        (dict(operator=3), TypeError, "`operator` must be a callable"),
        (dict(layer_config={"mlp": "model.layers.{num}.mlp", 3: "x"}), TypeError, "dict keys must be layer_type"),
    ],
)
def test_apply_argument_errors(tiny_llama, kwargs, exc, match):
    n0 = _n_hooks(tiny_llama)
    with pytest.raises(exc, match=match):
        SteeringVector({1: _vec(1)}).patch(tiny_llama, **kwargs)
    assert _n_hooks(tiny_llama) == n0


def test_apply_rejects_mismatched_model_and_operator_on_clamp(tiny_llama):
    with pytest.raises(ValueError, match="hidden size 8"):
        SteeringVector({1: torch.ones(8)}).patch(tiny_llama)
    with pytest.raises(ValueError, match="only applies to additive"):
        SteeringVector({1: _vec(1)}, clamp=1.0).patch(tiny_llama, operator=ablation_operator())
    with pytest.raises(ValueError, match="non-zero for a clamp"):
        SteeringVector({1: _vec(1)}, clamp=1.0).patch(tiny_llama, multiplier=0)


# ------------------------------------------------------------------------------------ token positions

#: (name, apply kwargs); every option must steer the same tokens with and without a KV cache.
TOKEN_OPTIONS = [
    ("all", {}),
    ("first", dict(injection_mode="first")),
    ("last", dict(injection_mode="last")),
    ("generated", dict(injection_mode="generated")),
    ("min_token_index", dict(min_token_index=6)),
    ("token_indices", dict(token_indices=[-1, 1, 7])),
    ("neg_slice", dict(token_indices=slice(-2, None))),
    ("bool_mask", dict(token_indices=torch.tensor([False, True, False, False, True, False, False, True]))),
    ("weights", dict(token_indices=torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0]))),
]


def _generate_scores(model, vec, ids, mask, use_cache, **apply_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = vec.apply(model, **apply_kwargs) if vec is not None else _null()
    with ctx, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=2,
                             use_cache=use_cache, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "gpt_neox"])
def test_token_positions_same_with_and_without_kv_cache(arch_name, tokenizer):
    model = make_tiny_model(arch_name, len(tokenizer))
    ids = torch.tensor([[5, 17, 301, 42, 9], [2, 2, 88, 31, 7]])  # second row left-padded
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    vec = SteeringVector({1: _vec(1, 6), 2: _vec(2, 6)})
    _, base = _generate_scores(model, None, ids, mask, True)
    for name, kwargs in TOKEN_OPTIONS:
        seq_c, scores_c = _generate_scores(model, vec, ids, mask, True, **kwargs)
        seq_n, scores_n = _generate_scores(model, vec, ids, mask, False, **kwargs)
        assert torch.equal(seq_c, seq_n), name
        torch.testing.assert_close(scores_c, scores_n, atol=1e-4, rtol=1e-4, msg=name)
        assert (scores_c - base).abs().max() > 1e-2, f"{name}: steering had no effect"


def test_beam_search_same_with_and_without_kv_cache(tiny_llama):
    """Beam search reorders rows between steps; each row keeps its prompt, so the same tokens are steered."""
    ids = torch.tensor([[5, 17, 301, 42, 9], [2, 2, 88, 31, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    vec = SteeringVector({1: _vec(1, 6)})
    for mode in ("generated", "last"):
        outs = []
        for use_cache in (True, False):
            with vec.apply(tiny_llama, injection_mode=mode), torch.no_grad():
                outs.append(tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3,
                                                do_sample=False, pad_token_id=2, use_cache=use_cache,
                                                output_scores=True, return_dict_in_generate=True))
        assert torch.equal(outs[0].sequences, outs[1].sequences), mode
        torch.testing.assert_close(outs[0].sequences_scores, outs[1].sequences_scores, atol=1e-4, rtol=1e-4)


def test_token_modes_mean_the_documented_positions(tiny_llama):
    """Without a cache, with one unpadded prompt of length P: modes and negative indices equal absolute positions."""
    ids = torch.tensor([[5, 17, 301, 42, 9]])
    P = ids.shape[1]
    mask = torch.ones_like(ids)
    vec = SteeringVector({1: _vec(1, 6)})
    same = [
        (dict(injection_mode="generated"), dict(min_token_index=P)),
        (dict(injection_mode="generated"), dict(token_indices=slice(P, None))),
        (dict(injection_mode="last"), dict(min_token_index=P - 1)),
        (dict(injection_mode="first"), dict(token_indices=[0])),
        (dict(token_indices=[-1]), dict(token_indices=[P - 1])),
        (dict(token_indices=slice(-2, None)), dict(min_token_index=P - 2)),
        (dict(token_indices=torch.tensor([0.0, 1.0, 1.0])), dict(token_indices=[1, 2])),
    ]
    for a, b in same:
        for use_cache in (True, False):
            _, sa = _generate_scores(tiny_llama, vec, ids, mask, use_cache, **a)
            _, sb = _generate_scores(tiny_llama, vec, ids, mask, use_cache, **b)
            torch.testing.assert_close(sa, sb, msg=f"{a} vs {b}")
    # in a left-padded batch, each row is steered like the same prompt alone
    batch = torch.tensor([[5, 17, 301, 42, 9], [2, 2, 88, 31, 7]])
    bmask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    for kwargs in (dict(injection_mode="generated"), dict(injection_mode="last"), dict(token_indices=[-1])):
        _, sb = _generate_scores(tiny_llama, vec, batch, bmask, True, **kwargs)
        _, s1 = _generate_scores(tiny_llama, vec, batch[1:, 2:], bmask[1:, 2:], True, **kwargs)
        torch.testing.assert_close(sb[1:], s1, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ ActivationHook


def test_activation_hook_components_and_positions(tiny_llama, right_tokenizer, left_tokenizer):
    texts = ["The quick brown fox jumps", "Hi"]
    singles = []
    for t in texts:
        ids = right_tokenizer(t, return_tensors="pt").input_ids
        with torch.no_grad():
            hs = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        singles.append(hs)
    for tok in (right_tokenizer, left_tokenizer):
        batch = tok(texts, return_tensors="pt", padding=True)
        for pos, want in [("last", [s[-1] for s in singles]), ("first", [s[0] for s in singles]),
                          ("mean", [s.mean(0) for s in singles])]:
            with ActivationHook(tiny_llama, 2, "residual", pos) as hook, torch.no_grad():
                tiny_llama(**batch)
            got = hook.get_activations()[2]
            assert got.shape == (2, D)
            torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5, msg=f"{tok.padding_side} {pos}")
    # components name the architecture's modules
    ids = torch.tensor([[5, 17, 301]])
    for component, site in (("mlp", "mlp"), ("attn", "self_attn"), ("input_layernorm", "input_layernorm")):
        seen: list[torch.Tensor] = []
        h = arch.get_site_module(tiny_llama, 1, site).register_forward_hook(
            lambda m, a, o, seen=seen: seen.append(arch.get_output_hidden_states(o)))
        with ActivationHook(tiny_llama, [1], component, "all") as hook, torch.no_grad():
            tiny_llama(input_ids=ids)
        h.remove()
        torch.testing.assert_close(hook.get_activations()[1], seen[0])


def test_activation_hook_accumulates_and_cleans_up(tiny_llama):
    n0 = _n_hooks(tiny_llama)
    hook = ActivationHook(tiny_llama, [0, -1], token_position="all")
    with pytest.raises(RuntimeError, match="recorded nothing"):
        hook.get_activations()
    with hook, torch.no_grad():
        tiny_llama(input_ids=torch.tensor([[1, 2, 3]]))
        tiny_llama(input_ids=torch.tensor([[4, 5]]))
    assert _n_hooks(tiny_llama) == n0
    with pytest.raises(ValueError, match="different lengths"):
        hook.get_activations()
    per_forward = hook.get_activations(concat=False)
    assert [t.shape[1] for t in per_forward[-1]] == [3, 2]
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationHook(tiny_llama, [1]):
            raise RuntimeError("boom")
    assert _n_hooks(tiny_llama) == n0
    with pytest.raises(ValueError, match="`component` must be one of"):
        ActivationHook(tiny_llama, [1], component="resid")
    with pytest.raises(ValueError, match="`token_position` must be one of"):
        ActivationHook(tiny_llama, [1], token_position="middle")
    with pytest.raises(ValueError, match="out of range"):
        ActivationHook(tiny_llama, [4])
    # during cached generation, "last" records the new token of every step
    with ActivationHook(tiny_llama, [1], token_position="last") as hook, torch.no_grad():
        tiny_llama.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert hook.get_activations()[1].shape == (4, D)  # prefill + 3 cached steps


# ------------------------------------------------------------------------------------ injectors


def test_activation_injector_equals_apply(tiny_llama):
    v1, v2 = _vec(1, 3), _vec(2, 3)
    per_layer = [SteeringVector({1: v1}), SteeringVector({3: v2})]
    ids = torch.tensor([[5, 17, 301, 42, 9]])
    for mode in ("all", "last", "first", "generated"):
        with SteeringVector({1: v1, 3: v2}).apply(tiny_llama, multiplier=0.7, injection_mode=mode):
            want = _logits(tiny_llama, ids)
        with ActivationInjector(tiny_llama, per_layer, strength=0.7, injection_mode=mode):
            torch.testing.assert_close(_logits(tiny_llama, ids), want)
    with SteeringVector({2: v1}).apply(tiny_llama, multiplier=2.0):
        want = _logits(tiny_llama, ids)
    injector = ActivationInjector(tiny_llama, v1, strength=1.0, layer=2)  # raw tensor + layer
    with injector:
        injector.strength = 2.0  # read at the next forward
        torch.testing.assert_close(_logits(tiny_llama, ids), want)
    assert _n_hooks(tiny_llama) == 0
    with pytest.raises(ValueError, match="pass `layer`"):
        ActivationInjector(tiny_llama, v1)
    with pytest.raises(ValueError, match="`injection_mode` must be one of"):
        ActivationInjector(tiny_llama, per_layer, injection_mode="middle")
    with pytest.raises(TypeError, match="`strength` must be a number"):
        ActivationInjector(tiny_llama, per_layer, strength="1")


def test_multi_vector_injector_live_strengths(tiny_llama):
    a = SteeringVector({1: _vec(1, 3)})
    b = [SteeringVector({2: _vec(2, 3)}), SteeringVector({3: _vec(3, 3)})]
    ids = torch.tensor([[5, 17, 301, 42, 9]])
    base = _logits(tiny_llama, ids)
    injector = MultiVectorInjector(tiny_llama, {"refusal": a, "uncertainty": b}, {"refusal": 1.0, "uncertainty": 0.5})
    assert injector.strengths == {"refusal": 1.0, "uncertainty": 0.5}

    def expected(sa: float, sb: float) -> torch.Tensor:
        combined = a * sa + b[0] * sb + b[1] * sb
        with combined.apply(tiny_llama):
            return _logits(tiny_llama, ids)

    want_first, want_second = expected(1.0, 0.5), expected(0.8, -1.0)
    with injector:
        hooks = {id(m): (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in tiny_llama.modules()}
        torch.testing.assert_close(_logits(tiny_llama, ids), want_first, atol=1e-5, rtol=1e-5)
        injector.set_strength("refusal", 0.8)
        injector.set_strength("uncertainty", -1.0)
        after = {id(m): (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in tiny_llama.modules()}
        assert hooks == after  # nothing re-registered
        torch.testing.assert_close(_logits(tiny_llama, ids), want_second, atol=1e-5, rtol=1e-5)
        injector.set_strength("refusal", 0)
        injector.set_strength("uncertainty", 0)
        torch.testing.assert_close(_logits(tiny_llama, ids), base)
    assert _n_hooks(tiny_llama) == 0
    with pytest.raises(KeyError, match="no vector set named 'x'"):
        injector.set_strength("x", 1.0)
    with pytest.raises(ValueError, match="not in `vector_sets`"):
        MultiVectorInjector(tiny_llama, {"a": a}, {"b": 1.0})


# ------------------------------------------------------------------------------------ generate_with_steering


def test_generate_with_steering(tiny_llama, tokenizer):
    vec = SteeringVector({2: _vec(1, 5)})
    prompt = "The weather today is"
    ids = tokenizer(prompt, return_tensors="pt")
    with vec.apply(tiny_llama, multiplier=-2.0), torch.no_grad():
        out = tiny_llama.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    want = tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    got = generate_with_steering(tiny_llama, tokenizer, prompt, vec, multiplier=-2.0, max_new_tokens=6)
    assert got == want
    assert generate_with_steering(tiny_llama, tokenizer, prompt, _vec(1, 5), layer=2, multiplier=-2.0,
                                  max_new_tokens=6) == want
    with torch.no_grad():
        plain = tiny_llama.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generate_with_steering(tiny_llama, tokenizer, prompt, None, max_new_tokens=6) == \
        tokenizer.decode(plain[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    chat = [{"role": "user", "content": "Hello!"}]
    outs = generate_with_steering(tiny_llama, tokenizer, [prompt, chat], vec, max_new_tokens=3)
    assert isinstance(outs, list) and len(outs) == 2 and all(isinstance(o, str) for o in outs)
    only_new = generate_with_steering(tiny_llama, tokenizer, prompt, vec, multiplier=-2.0, injection_mode="generated",
                                      max_new_tokens=6, use_cache=False)
    assert only_new == generate_with_steering(tiny_llama, tokenizer, prompt, vec, multiplier=-2.0,
                                              injection_mode="generated", max_new_tokens=6)


def test_generate_with_steering_errors_and_state(tiny_llama, tokenizer):
    tiny_llama.train()
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    with pytest.raises(ValueError, match="pass `layer`"):
        generate_with_steering(tiny_llama, tokenizer, "Hi", _vec(1))
    with pytest.raises(TypeError, match="expected a string or a list of chat messages"):
        generate_with_steering(tiny_llama, tokenizer, 42, None)
    with pytest.raises(TypeError, match="`multiplier` must be a number"):
        generate_with_steering(tiny_llama, tokenizer, "Hi", SteeringVector({1: _vec(1)}), multiplier=None)
    with pytest.raises(ValueError):  # an error inside generate: hooks still removed, modes restored
        generate_with_steering(tiny_llama, tokenizer, "Hi", SteeringVector({1: _vec(1)}), max_new_tokens=-3)
    assert _n_hooks(tiny_llama) == 0
    assert all(m.training for m in tiny_llama.modules())
    assert flags == [p.requires_grad for p in tiny_llama.parameters()]


# ------------------------------------------------------------------------------------ one API for both methods


def test_optimised_and_contrastive_vectors_share_one_path(tiny_llama, tokenizer):
    dp = so.TrainingDatapoint("The cat sat on the", src_completions=[" mat"], dst_completions=[" roof"])
    v, info = so.optimize_vector(tiny_llama, [dp], 2, tokenizer=tokenizer, max_iters=3, lr=0.5, seed=0)
    opt = SteeringVector.from_optimization(v, info, 2)
    caa = train_steering_vector(tiny_llama, tokenizer, PAIRS, layers=[2]) * 3.0
    ids = torch.tensor([[5, 17, 301, 42, 9]])
    with so.hf_hooks_contextmanager(tiny_llama, [(2, so.make_steering_hook_hf(v))]):
        want_opt = _logits(tiny_llama, ids)
    for vec, want in ((opt, want_opt), (caa, None)):
        with vec.apply(tiny_llama):
            got = _logits(tiny_llama, ids)
        if want is not None:
            torch.testing.assert_close(got, want)
        with ActivationInjector(tiny_llama, vec, strength=1.0):
            torch.testing.assert_close(_logits(tiny_llama, ids), got)
    with (opt + caa).apply(tiny_llama):
        summed = _logits(tiny_llama, ids)
    with opt.apply(tiny_llama), caa.apply(tiny_llama):
        torch.testing.assert_close(_logits(tiny_llama, ids), summed, atol=1e-5, rtol=1e-5)
    with MultiVectorInjector(tiny_llama, {"opt": opt, "caa": caa}):
        torch.testing.assert_close(_logits(tiny_llama, ids), summed, atol=1e-5, rtol=1e-5)
    for vec in (opt, caa):
        text = generate_with_steering(tiny_llama, tokenizer, "Hello", vec, max_new_tokens=2)
        assert isinstance(text, str)
    assert _n_hooks(tiny_llama) == 0
