"""The project's own API takes ``(model, tokenizer, ...)`` first; ``optimize_many`` also keeps its earlier
``(model, jobs, tokenizer=...)`` form; every ``optimize_many`` result names its job in ``info["job"]``."""

from __future__ import annotations

import inspect

import pytest
import torch

from steering_opt import TrainingDatapoint, contrastive, evaluate, passes, sweep
from steering_opt.optimize import optimize
from steering_opt.scale import Job, optimize_many

DP = TrainingDatapoint("The weather today is", src_completions=[" sunny"], dst_completions=[" cold and wet"])

#: Public functions of the core that run a model with a tokenizer.
MODEL_AND_TOKENIZER = [
    optimize, optimize_many, sweep.sweep, sweep.auto_steer, sweep.residual_norms, evaluate.evaluate,
    evaluate.Evaluator.__init__, evaluate.generate, evaluate.completion_logprobs, evaluate.perplexity,
    evaluate.kl_divergence, contrastive.extract_activations, contrastive.contrastive_vector,
    passes.generate_ids, passes.token_logprobs, passes.next_token_logprobs, passes.eos_token_ids,
]


@pytest.mark.parametrize("fn", MODEL_AND_TOKENIZER, ids=lambda f: f.__qualname__)
def test_model_and_tokenizer_come_first(fn) -> None:
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    assert params[:2] == ["model", "tokenizer"], params


def test_optimize_many_call_forms_agree_and_name_every_job(tiny_llama, tokenizer) -> None:
    jobs = [Job([DP], 1, lr=0.1, max_iters=2, seed=0), Job([DP], 2, lr=0.1, max_iters=1, seed=1, name="second")]
    new = optimize_many(tiny_llama, tokenizer, jobs)
    for other in (optimize_many(tiny_llama, jobs, tokenizer=tokenizer),  # the earlier order
                  optimize_many(tiny_llama, tokenizer=tokenizer, jobs=jobs),
                  optimize_many(tiny_llama, tokenizer, jobs=jobs)):
        for a, b in zip(new, other):
            torch.testing.assert_close(a.vector, b.vector)
    assert [r.info["job"] for r in new] == [0, "second"]  # the index when a job has no name
    vector, info = new[0]
    assert info["job"] == 0 and vector.shape == (64,)


def test_optimize_many_call_form_errors(tiny_llama, tokenizer) -> None:
    jobs = [Job([DP], 1, max_iters=1)]
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        optimize_many(tiny_llama, jobs)
    with pytest.raises(TypeError, match="`tokenizer` twice"):
        optimize_many(tiny_llama, tokenizer, jobs, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="`jobs` twice"):
        optimize_many(tiny_llama, tokenizer, jobs, jobs=jobs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_iters'"):
        optimize_many(tiny_llama, tokenizer, jobs, max_iters=3)
    with pytest.raises(ValueError, match="`jobs` must be a non-empty list"):
        optimize_many(tiny_llama, tokenizer, [])
