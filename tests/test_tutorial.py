"""The reference tutorial's calls (seeds/002_*.txt), copied as written, run on the embedded model.

Only the model loading differs, and ``max_iters`` is added (or lowered) so the test stays short; every
other argument, name and return shape is the tutorial's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.embedded

prompt = ("Some of my fondest childhood memories are from my summer vacations back when I was little. Every now "
          "and then, after a long day of playing outside, I would come back home to be greeted with the delicious "
          "smell of my grandma's hazelnut cake wafting out of the kitchen. In this recipe, I'll teach you how to "
          "make that very cake, and create your own summer memories.\n\n")
en_completion = """<h2>Ingredients</h2>

* 1 cup of all-purpose flour"""
es_completion = """<h2>Ingredientes</h2>

* 1 taza de harina común"""


@pytest.fixture(scope="module")
def tut(embedded_model, embedded_tokenizer):
    from steering_opt import steering_opt

    datapoint = steering_opt.TrainingDatapoint(
        prompt,
        src_completions=[en_completion],
        dst_completions=[es_completion],
    )
    return steering_opt, embedded_model, embedded_tokenizer, datapoint


def _generate(model, tokenizer, text, n=5, **kw):
    return model.generate(**tokenizer(text, return_tensors='pt'), max_new_tokens=n, **kw)


def test_tutorial_basic_and_hooks(tut):
    steering_opt, model, tokenizer, datapoint = tut
    datapoints = [datapoint]
    layer = 10
    vector, loss_info = steering_opt.optimize_vector(
        model, datapoints, layer,
        tokenizer=tokenizer,
        max_iters=3,
        lr=0.1
    )
    assert set(loss_info) >= {"iters", "loss", "norm"} and loss_info["iters"] == 3
    assert vector.shape == (model.config.hidden_size,)
    steering_hook = (layer, steering_opt.make_steering_hook_hf(vector))
    with steering_opt.hf_hooks_contextmanager(model, [steering_hook]):
        generated_tokens = _generate(model, tokenizer, prompt)
    generated_str = tokenizer.batch_decode(generated_tokens, skip_special_tokens=True)[0]
    assert generated_str.startswith(prompt.strip()[:20])
    steering_hooks = [(layer, steering_opt.make_steering_hook_hf(-10 * vector))]
    with steering_opt.hf_hooks_contextmanager(model, steering_hooks):
        _generate(model, tokenizer, "Unos de mis deportes favoritos incluyen", do_sample=True, temperature=0.8)
    assert all(len(b._forward_pre_hooks) == 0 for b in model.model.layers)


def test_tutorial_optimize_vectors(tut):
    steering_opt, model, tokenizer, datapoint = tut
    layers = list(range(len(model.model.layers)))
    vectors, loss_info = steering_opt.optimize_vectors(
        model, [datapoint], layers,
        tokenizer=tokenizer,
        max_iters=2,
        lr=0.03,
        regularization_weight=0.1,
        sparsity_weight=0.1,
        entropy_weight=10,
        regularization_type="l1",
    )
    assert set(vectors) == set(layers)
    for key, value in loss_info.items():
        if isinstance(value, dict):
            for subkey, subvalue in value.items():
                assert isinstance(subvalue, float), (key, subkey)
    max_norm_layer = max(vectors.items(), key=lambda x: x[1].norm().item())[0]
    max_norm_vector = vectors[max_norm_layer]
    steering_hooks = [(max_norm_layer, steering_opt.make_steering_hook_hf(10 * max_norm_vector))]
    with steering_opt.hf_hooks_contextmanager(model, steering_hooks):
        _generate(model, tokenizer, prompt)


def test_tutorial_options(tut):
    steering_opt, model, tokenizer, datapoint = tut
    datapoints = [datapoint]
    layer = 10
    vector, loss_info = steering_opt.optimize_vector(
        model, datapoints, layer, tokenizer=tokenizer, max_iters=2, lr=0.1, max_norm=20)
    assert vector.norm() <= 20 + 1e-4
    vector, loss_info = steering_opt.optimize_vector(
        model, datapoints, layer, tokenizer=tokenizer, max_iters=2, lr=0.1, target_loss=3)
    vector, loss_info = steering_opt.optimize_vector(
        model, datapoints, layer, tokenizer=tokenizer, max_iters=2, lr=0.1, target_loss=3, vector_clamp=1)
    steering_hook = (layer, steering_opt.make_steering_hook_hf(vector, steering_opt.make_abl_mat(vector)))
    with steering_opt.hf_hooks_contextmanager(model, [steering_hook]):
        _generate(model, tokenizer, "My favorite programming languages are")
    vector, matrix, loss_info = steering_opt.optimize_vector(
        model, datapoints, layer, tokenizer=tokenizer, max_iters=2, lr=0.1,
        affine_rank=2, max_affine_norm=2, max_norm=1)
    assert matrix.shape == (576, 576) and torch.linalg.matrix_rank(matrix) <= 2
    steering_hook = (layer, steering_opt.make_steering_hook_hf(vector, matrix))
    with steering_opt.hf_hooks_contextmanager(model, [steering_hook]):
        _generate(model, tokenizer, "My favorite programming languages are")
    vector, loss_info = steering_opt.optimize_vector(
        model, datapoints, layer, tokenizer=tokenizer, lr=0.1, max_iters=3,
        target_loss=3, max_norm=30, noise_scale=0.1, target_loss_target_iters=5)
    vector, loss_info = steering_opt.optimize_vector(
        model, datapoints, layer, tokenizer=tokenizer, lr=0.1, max_iters=2,
        target_loss=2.5, do_output_constr=True, output_constr_lr=0.059, max_output_constr_iters=3)
    assert "output_constr_iters" in loss_info


def test_tutorial_sampling_and_logprobs(tut):
    steering_opt, model, tokenizer, datapoint = tut
    layer = 10
    vector, loss_info = steering_opt.optimize_vector(model, [datapoint], layer, tokenizer=tokenizer, max_iters=2,
                                                     lr=0.1)
    prompt2 = '"How dare you cheat on me with him!" Jim roared.'
    steering_hook = (layer, steering_opt.make_steering_hook_hf(vector))
    with steering_opt.hf_hooks_contextmanager(model, [steering_hook]):
        completions, per_token_probabilities = steering_opt.sample_most_likely_completions_hf(
            model, tokenizer, prompt2, k=5, iters=5, coldness=1)
    assert len(completions) == 5 and np.asarray(per_token_probabilities).shape == (5, 6)
    en_completion_logprob = steering_opt.get_completion_logprob_hf(model, prompt, en_completion, tokenizer).item()
    es_completion_logprob = steering_opt.get_completion_logprob_hf(model, prompt, es_completion, tokenizer,
                                                                   do_one_minus=True).item()
    assert en_completion_logprob < 0 and es_completion_logprob < 0
    vector, loss_info = steering_opt.optimize_vector(
        model, [datapoint], layer, tokenizer=tokenizer, lr=0.1, max_iters=2,
        target_loss=min(-en_completion_logprob, -es_completion_logprob), do_target_loss_sum=False)
    loss = loss_info["loss"]
    assert len(loss) == 1 and len(loss[0]) == 2 and len(loss[0][0]) == 1 and len(loss[0][1]) == 1
