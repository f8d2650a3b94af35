"""steering-vectors compatibility: its API and layer numbering (layer L = the output of block L) on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_tiny_model

from steering_opt import contrastive
from steering_opt.compat.steering_vectors import (
    SteeringVector,
    SteeringVectorTrainingSample,
    ablation_operator,
    aggregate_activations,
    extract_activations,
    get_num_matching_layers,
    guess_and_enhance_layer_config,
    logistic_aggregator,
    pca_aggregator,
    record_activations,
    train_steering_vector,
)

PAIRS = [("I love this movie", "I hate this movie"), ("What a great day", "What an awful day it was"),
         ("Yes, gladly", "No thanks")]


def _hidden(model, tokenizer, text: str) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids).logits


def _state(model) -> tuple:
    """Hooks that are not transformers' own (it adds output recorders on the first forward), mode, grad flags."""
    hooks = [fn for m in model.modules() for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
             if not getattr(fn, "__module__", "").startswith("transformers")]
    return len(hooks), model.training, [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("arch_name", ARCHS)
def test_recorded_layer_is_block_output(arch_name, tokenizer):
    """steering-vectors' decoder_block layer L is the output of block L: output_hidden_states[L + 1]."""
    model = make_tiny_model(arch_name, len(tokenizer))
    ids = tokenizer("The quick brown fox", return_tensors="pt")
    before = _state(model)
    with record_activations(model, layer_nums=[0, 2]) as rec, torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states
    assert sorted(rec) == [0, 2] and len(rec[0]) == 1
    for layer in (0, 2):
        torch.testing.assert_close(rec[layer][0], hs[layer + 1], atol=0, rtol=0)
    assert _state(model) == before


def test_train_reads_block_output_and_applies_there(tiny_llama, tokenizer):
    model, n = tiny_llama, 4
    before = _state(model)
    vec = train_steering_vector(model, tokenizer, PAIRS, layers=[1, -1], move_to_cpu=True, show_progress=False,
                                batch_size=2, tqdm_desc="Training")
    assert isinstance(vec, SteeringVector) and vec.layer_type == "decoder_block"
    assert sorted(vec.layer_activations) == [1, n - 1] and vec.layer_activations[1].device.type == "cpu"
    hand = torch.stack([_hidden(model, tokenizer, p)[2][0, -1] - _hidden(model, tokenizer, q)[2][0, -1]
                        for p, q in PAIRS]).mean(0)
    torch.testing.assert_close(vec.layer_activations[1], hand, atol=1e-5, rtol=1e-5)
    # the same numbers as steering_opt's own decoder_block layer L + 1 (the input of the next block)
    native = contrastive.contrastive_vector(model, tokenizer, PAIRS, [2])
    torch.testing.assert_close(vec.layer_activations[1], native.layer_activations[2], atol=1e-6, rtol=1e-6)

    ids = tokenizer("Tell me about the weather", return_tensors="pt")
    with record_activations(model, layer_nums=[1]) as base, torch.no_grad():
        model(**ids)
    with vec.apply(model, multiplier=2.0, min_token_index=2):
        with record_activations(model, layer_nums=[1]) as rec, torch.no_grad():
            model(**ids)
    delta = rec[1][0] - base[1][0]
    assert float(delta[0, :2].abs().max()) == 0
    torch.testing.assert_close(delta[0, 2:], (2 * vec.layer_activations[1]).expand_as(delta[0, 2:]),
                               atol=1e-5, rtol=1e-5)
    # to_steering_opt: steering-vectors' layer L is steering_opt's L + 1, same logits
    one = SteeringVector({1: vec.layer_activations[1]})
    with one.apply(model, multiplier=3.0):
        ours = _logits(model, ids)
    with one.to_steering_opt(model).apply(model, multiplier=3.0):
        native_logits = _logits(model, ids)
    torch.testing.assert_close(ours, native_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="last block has no steering_opt decoder_block"):
        vec.to_steering_opt(model)
    assert _state(model) == before


def test_token_selection_and_patch_handles(tiny_llama, tokenizer):
    model = tiny_llama
    before = _state(model)
    v = torch.randn(64)
    vec = SteeringVector({2: v})
    ids = tokenizer("one two three four five", return_tensors="pt")
    seq = ids["input_ids"].shape[1]
    base_logits = _logits(model, ids)
    with record_activations(model, layer_nums=[2]) as base, torch.no_grad():
        model(**ids)

    def delta(**kwargs) -> torch.Tensor:
        with vec.apply(model, **kwargs), record_activations(model, layer_nums=[2]) as rec, torch.no_grad():
            model(**ids)
        return (rec[2][0] - base[2][0])[0].norm(dim=-1) > 1e-4

    mask = torch.zeros(seq, dtype=torch.long)
    mask[[1, 3]] = 1  # a 0/1 tensor is a mask (as in steering-vectors), not a list of indices
    assert delta(token_indices=mask).tolist() == mask.bool().tolist()
    assert delta(token_indices=[0, 2]).nonzero().flatten().tolist() == [0, 2]
    assert delta(token_indices=slice(1, 3)).nonzero().flatten().tolist() == [1, 2]
    assert bool(delta().all())
    with pytest.raises(ValueError, match="only 0s and 1s"):
        vec.patch_activations(model, token_indices=torch.tensor([0, 2]))
    handle = vec.patch_activations(model, multiplier=-1.0)
    assert not torch.equal(_logits(model, ids), base_logits)
    handle.remove()
    handle2 = vec.patch(model, operator=ablation_operator())
    handle2.remove()
    assert torch.equal(_logits(model, ids), base_logits) and _state(model) == before


def test_training_samples_with_read_indices_and_extract_shapes(tiny_llama, tokenizer):
    model = tiny_llama
    samples = [SteeringVectorTrainingSample("I love this movie", "I hate this movie", 1, 2),
               SteeringVectorTrainingSample("What a great day", "What an awful day it was"),
               ("Yes, gladly", "No thanks")]
    vec = train_steering_vector(model, tokenizer, samples, layers=[0], read_token_index=-2, batch_size=2)
    hand = [_hidden(model, tokenizer, "I love this movie")[1][0, 1]
            - _hidden(model, tokenizer, "I hate this movie")[1][0, 2]]
    for p, q in PAIRS[1:]:
        hand.append(_hidden(model, tokenizer, p)[1][0, -2] - _hidden(model, tokenizer, q)[1][0, -2])
    torch.testing.assert_close(vec.layer_activations[0], torch.stack(hand).mean(0), atol=1e-5, rtol=1e-5)

    pos, neg = extract_activations(model, tokenizer, PAIRS, layers=[1, 3], batch_size=2)
    assert sorted(pos) == [1, 3] and [tuple(t.shape) for t in pos[1]] == [(2, 64), (1, 64)]
    manual = aggregate_activations(pos, neg)
    trained = train_steering_vector(model, tokenizer, PAIRS, layers=[1, 3])
    for layer in (1, 3):
        torch.testing.assert_close(manual[layer], trained.layer_activations[layer], atol=1e-6, rtol=1e-6)
    via_pca = train_steering_vector(model, tokenizer, PAIRS, layers=[1], aggregator=pca_aggregator())
    assert abs(float(via_pca.layer_activations[1].norm()) - 1) < 1e-5


def test_layer_types_and_layer_configs(tokenizer):
    gpt2 = make_tiny_model("gpt2", len(tokenizer))
    guessed = guess_and_enhance_layer_config(gpt2)
    assert guessed == {"decoder_block": "transformer.h.{num}", "self_attn": "transformer.h.{num}.attn",
                       "mlp": "transformer.h.{num}.mlp", "input_layernorm": "transformer.h.{num}.ln_1",
                       "post_attention_layernorm": "transformer.h.{num}.ln_2"}
    assert guess_and_enhance_layer_config(gpt2, {"mlp": "x.{num}"}, "mlp") == {"mlp": "x.{num}"}
    assert get_num_matching_layers(gpt2, "transformer.h.{num}") == 4
    default = train_steering_vector(gpt2, tokenizer, PAIRS, layers=[1])
    for config in (guessed, {"decoder_block": lambda num: f"transformer.h.{num}"},
                   {"decoder_block": lambda model, num: f"transformer.h.{num}"}):
        vec = train_steering_vector(gpt2, tokenizer, PAIRS, layers=[1], layer_config=config)
        torch.testing.assert_close(vec.layer_activations[1], default.layer_activations[1], atol=0, rtol=0)
    mlp = train_steering_vector(gpt2, tokenizer, PAIRS, layers=[2], layer_type="mlp")
    outs = []
    for p, q in PAIRS:
        with record_activations(gpt2, "mlp", layer_nums=[2]) as rec, torch.no_grad():
            gpt2(**tokenizer(p, return_tensors="pt"))
            gpt2(**tokenizer(q, return_tensors="pt"))
        outs.append(rec[2][0][0, -1] - rec[2][1][0, -1])
    torch.testing.assert_close(mlp.layer_activations[2], torch.stack(outs).mean(0), atol=1e-5, rtol=1e-5)


def test_logistic_aggregator_matches_sklearn_setup():
    torch.manual_seed(0)
    pos, neg = torch.randn(6, 8) + 1.0, torch.randn(6, 8)
    w = logistic_aggregator({"C": 0.5, "max_iter": 200})(pos, neg)
    assert abs(float(w.norm()) - 1) < 1e-5 and float(w @ (pos - neg).mean(0)) > 0
    # without intercept on the pair-centred data (what scikit-learn fits there): the core's intercept is 0
    mean = (pos + neg) / 2
    core = contrastive.logistic_aggregator(C=0.5, normalize=True)(pos - mean, neg - mean)
    torch.testing.assert_close(w, core)
    with pytest.raises(ValueError, match="only penalty='l2'"):
        logistic_aggregator({"penalty": "l1"})
    with pytest.raises(ValueError, match="unsupported sklearn_kwargs"):
        logistic_aggregator({"class_weight": {1: 2.0}})


def test_bad_arguments_fail_before_any_forward(tiny_llama, tokenizer):
    before = _state(tiny_llama)
    calls = []
    h = tiny_llama.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for kwargs, exc, match in [
            (dict(layers=[4]), ValueError, r"layers=4 is out of range"),
            (dict(layer_type="resid"), ValueError, "`layer_type` must be one of"),
            (dict(layer_config={"decoder_block": "model.layers"}), ValueError, "must contain"),
            (dict(read_token_index=40), ValueError, "out of range"),
            (dict(batch_size=0), ValueError, "`batch_size` must be an int >= 1"),
            (dict(training_samples=[]), ValueError, "is empty"),
        ]:
            args = dict(training_samples=PAIRS, layers=[1]) | kwargs
            with pytest.raises(exc, match=match):
                train_steering_vector(tiny_llama, tokenizer, **args)
    finally:
        h.remove()
    assert calls == [] and _state(tiny_llama) == before


def test_readme_usage_runs_unchanged(tiny_llama, tokenizer):
    """steering-vectors' documented usage (basic and advanced), with only the import line changed."""
    from steering_opt.compat.steering_vectors import ablation_then_addition_operator, train_steering_vector

    model = tiny_llama
    before = _state(model)
    training_samples = [
        ("The capital of England is London", "The capital of England is Beijing"),
        ("The capital of France is Paris", "The capital of France is Berlin"),
    ]
    steering_vector = train_steering_vector(model, tokenizer, training_samples, show_progress=True)
    assert sorted(steering_vector.layer_activations) == [0, 1, 2, 3]
    with steering_vector.apply(model):
        prompt = "Is it true that crystals have magic healing properties?"
        inputs = tokenizer(prompt, return_tensors="pt")
        outputs = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert outputs.shape[1] == inputs["input_ids"].shape[1] + 3
    steering_vec = train_steering_vector(model, tokenizer, training_samples, layers=[-1, -2, -3], batch_size=8)
    assert sorted(steering_vec.layer_activations) == [1, 2, 3]
    for kwargs in (dict(multiplier=0.5), dict(multiplier=-1.0), dict(min_token_index=10),
                   dict(operator=ablation_then_addition_operator())):
        with steering_vec.apply(model, **kwargs):
            model(**inputs)
    handle = steering_vec.patch(model)
    model(**inputs)
    handle.remove()
    pos_acts_by_layer, neg_acts_by_layer = extract_activations(model, tokenizer, training_samples,
                                                               layer_type="decoder_block")
    layer_activations = aggregate_activations(pos_acts_by_layer, neg_acts_by_layer)
    manual = SteeringVector(layer_activations=layer_activations)
    torch.testing.assert_close(manual.layer_activations[1], steering_vector.layer_activations[1])
    assert _state(model) == before
