"""What the fast engine computes: cached lower layers, one copy of each prompt, logits only where needed,
chunking that does not change the result."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import steering_opt as so
from steering_opt import arch
from steering_opt.data import tokenize_datapoints
from steering_opt.engine import FastEngine, Objective, SteerSpec


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    dps = [
        so.TrainingDatapoint("A fairly long prompt about the weather in spring and summer.",
                             src_completions=[" It rains", " Sunny"], dst_completions=[" Llueve mucho hoy"]),
        so.TrainingDatapoint("Short one", dst_completions=[" ok"]),
    ]
    seqs = tokenize_datapoints(tokenizer, dps)
    return model, seqs


def _spec(v: torch.Tensor, layer: int):
    return lambda idx: SteerSpec(rows={layer: v[None].expand(len(idx), -1)})


def _count_calls(module: torch.nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    """Record the input shape of every *completed* forward of ``module``."""
    return module.register_forward_hook(lambda m, args, out: store.append(tuple(args[0].shape)))


def test_prompt_once_lower_blocks_cached_logits_only_where_needed(setup) -> None:
    model, seqs = setup
    eng = FastEngine(model, seqs, [2], Objective())
    v = torch.randn(arch.hidden_size(model), requires_grad=True)
    low, high, head = [], [], []
    handles = [_count_calls(arch.get_blocks(model)[0], low), _count_calls(arch.get_blocks(model)[2], high),
               _count_calls(model.get_output_embeddings(), head)]
    try:
        eng.run(_spec(v, 2))  # first step fills the cache: block 0 runs once
        eng.run(_spec(v, 2))
        eng.run(_spec(v, 2))
    finally:
        for h in handles:
            h.remove()
    assert len(low) == 1  # blocks below the steered layer ran once, in total
    assert len(high) == 3  # blocks from the steered layer up ran once per step
    # one row per datapoint, each prompt once: packed length = prompt + all its completions
    packed = max(seqs[0].prompt_len + sum(t.completion_len for t in seqs if t.datapoint == d) for d in (0, 1))
    assert high[0][0] == 2 and high[0][1] == packed
    n_tokens = sum(s.completion_len for s in seqs)
    assert all(shape[:2] == (1, n_tokens) for shape in head)  # logits only at predicting positions


@pytest.mark.parametrize("budget", [1, 40, 100000])
def test_chunking_does_not_change_losses_or_gradients(setup, budget: int) -> None:
    model, seqs = setup
    v = torch.randn(arch.hidden_size(model))
    results = []
    for b in (budget, 100000):
        vv = v.clone().requires_grad_(True)
        losses = FastEngine(model, seqs, [1, 3], Objective(), max_batch_tokens=b).run(
            lambda idx, vv=vv: SteerSpec(rows={1: vv[None].expand(len(idx), -1), 3: vv[None].expand(len(idx), -1)}))
        results.append((losses, vv.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_no_weight_gradients(tokenizer) -> None:
    model = make_tiny_model("llama", len(tokenizer))
    assert all(p.requires_grad for p in model.parameters())
    dp = so.TrainingDatapoint("Hello there", dst_completions=[" friend"])
    so.optimize_vector(model, [dp], 1, tokenizer=tokenizer, max_iters=2, lr=0.1, seed=0)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were computed
    assert all(p.requires_grad for p in model.parameters())  # and the flags are restored
