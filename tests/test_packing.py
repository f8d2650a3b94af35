"""Packed scoring batches (steering_opt.packing): completions after one shared prompt, logits only where needed.

Exactness against one full forward per (prompt, completion) on every tiny architecture, with and without the
upper-blocks view and steering; the fallback to one completion per row; the row and batch limits.
"""

from __future__ import annotations

import pytest
import torch

from steering_opt import SteeringVector, packing
from steering_opt.evaluate import Evaluator
from steering_opt.passes import UpperBlocks, logprob_batches, token_logprobs, upper_blocks


def _pairs(tokenizer) -> list[tuple[list[int], list[int]]]:
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("The cat sat on"), enc("A longer prompt about the weather in the high mountains"), enc("Hi")]
    comps = [enc(" the mat and slept"), enc(" blue"), [], enc(" a dog ran far away from home today")]
    return [(p, c) for p in prompts for c in comps]


def _reference(model, pairs) -> list[torch.Tensor]:
    out = []
    for p, c in pairs:
        if not c:
            out.append(torch.zeros(0))
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c]), use_cache=False).logits[0].float()
        lp = torch.log_softmax(logits[len(p) - 1: len(p) - 1 + len(c)], -1)
        out.append(lp.gather(-1, torch.tensor(c)[:, None])[:, 0])
    return out


def test_packed_token_logprobs_are_exact(tiny_model, tokenizer) -> None:
    tiny_model.eval()
    pairs = _pairs(tokenizer)
    ref = _reference(tiny_model, pairs)
    for share in (False, True):
        got = token_logprobs(tiny_model, tokenizer, pairs, batch_size=4, share_prompts=share)
        for (_, c), a, b in zip(pairs, got, ref):
            assert a.shape == (len(c),)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    rows = [r for b in logprob_batches(tiny_model, pairs, 4, share_prompts=True) for r in b]
    assert sorted(i for r in rows for i in r) == [i for i, (_, c) in enumerate(pairs) if c]  # each once, no empty
    if packing.tree_mask_ok(tiny_model, 64):
        assert max(map(len, rows)) == 3  # the three non-empty completions of a prompt share one row


def test_packed_rows_through_the_upper_blocks_under_steering(tiny_model, tokenizer) -> None:
    """Packed rows fed through UpperBlocks (stored lower blocks, truncated view) with a vector at block 1 give
    the full model's numbers under the same steering."""
    tiny_model.eval()
    pairs = _pairs(tokenizer)
    d = tiny_model.config.hidden_size
    vec = SteeringVector({1: torch.randn(d, generator=torch.Generator().manual_seed(0)) * 4})
    with vec.apply(tiny_model):
        ref = _reference(tiny_model, pairs)
    upper = upper_blocks(tiny_model, 1, {})
    if upper is None:
        pytest.skip("this architecture cannot run a truncated model exactly")
    assert isinstance(upper, UpperBlocks)
    for _ in range(2):  # the second time the lower blocks come from the store
        with upper.feeding(), vec.apply(tiny_model):
            got = token_logprobs(tiny_model, tokenizer, pairs, batch_size=8, share_prompts=True, forward=upper.forward)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(upper.store) == len(logprob_batches(tiny_model, pairs, 8, share_prompts=True))


def test_no_packing_where_the_mask_would_not_be_exact(tiny_llama, tokenizer) -> None:
    pairs = _pairs(tokenizer)
    assert any(len(r) > 1 for b in logprob_batches(tiny_llama, pairs, 8, share_prompts=True) for r in b)
    tiny_llama.config.sliding_window = 4  # shorter than a packed row: the tree mask would not reproduce it
    try:
        assert all(len(r) == 1 for b in logprob_batches(tiny_llama, pairs, 8, share_prompts=True) for r in b)
    finally:
        tiny_llama.config.sliding_window = None
    assert all(len(r) == 1 for b in logprob_batches(tiny_llama, pairs, 8, share_prompts=False) for r in b)
    with pytest.raises(ValueError, match=r"pairs\[0\]"):
        token_logprobs(tiny_llama, tokenizer, [([], [5])], batch_size=1)


def test_row_and_batch_limits() -> None:
    rows = packing.split_row(100, [200, 200, 200], max_tokens=10_000)
    assert rows == [[0, 1], [2]]  # at most max(256, 2 × (100 + 200)) = 600 tokens per row
    assert packing.split_row(10, [30] * 8, max_tokens=10_000) == [list(range(8))]  # 250 <= 256
    assert packing.split_row(100, [30, 30, 30], max_tokens=170) == [[0, 1], [2]]
    assert packing.split_row(10, [500], max_tokens=100) == [[0]]  # a row holds at least one completion
    got = packing.batches([50, 40, 40, 10], [5, 5, 5, 5], max_batch_tokens=120, max_positions=100, max_rows=3)
    assert got == [[0, 1], [2, 3]]  # 3 × 50 > 120
    assert packing.batches([10] * 5, [4] * 5, max_batch_tokens=10_000, max_positions=8) == [[0, 1], [2, 3], [4]]
    assert packing.batches([10] * 5, [1] * 5, max_batch_tokens=10_000, max_positions=99, max_rows=2) == \
        [[0, 1], [2, 3], [4]]


def test_evaluator_margins_do_not_depend_on_packing(tiny_model, tokenizer) -> None:
    d = tiny_model.config.hidden_size
    vec = SteeringVector({1: torch.randn(d, generator=torch.Generator().manual_seed(1)) * 4})
    out = {}
    for share in (False, True):
        ev = Evaluator(tiny_model, tokenizer, ["The cat sat on", "Hello there"], promote=[" mat", " blue sky"],
                       suppress=[" dog ran away"], neutral_prompts=["Once upon a time"], generate=False)
        ev.share_prompts = share
        out[share] = [ev.evaluate(vec, m).summary for m in (0.5, 2.0)]
    for a, b in zip(out[False], out[True]):
        for key in ("margin_gain", "promote_gain", "suppress_gain", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_baseline_stores_the_lower_blocks_of_the_layers_to_measure(tiny_model, tokenizer) -> None:
    """``Evaluator.baseline(layers)`` stores the residual stream entering those layers during its own unsteered
    passes: measuring a vector there then never runs the blocks below, with the same numbers."""
    from steering_opt.arch import get_blocks

    d = tiny_model.config.hidden_size
    vec = SteeringVector({2: torch.randn(d, generator=torch.Generator().manual_seed(2)) * 4})
    kw = dict(promote=[" mat", " blue sky"], suppress=[" dog"], neutral_prompts=["Once upon a time"], generate=False)
    plain = Evaluator(tiny_model, tokenizer, ["The cat sat on", "Hello there"], **kw)
    ref = plain.evaluate(vec, 1.5).summary
    ev = Evaluator(tiny_model, tokenizer, ["The cat sat on", "Hello there"], **kw)
    ev.baseline([1, 2])
    if ev._upper.get(2) is None:
        pytest.skip("this architecture cannot run a truncated model exactly")
    runs = []
    handle = get_blocks(tiny_model)[0].register_forward_pre_hook(lambda m, a: runs.append(1))
    try:
        got = ev.evaluate(vec, 1.5).summary
    finally:
        handle.remove()
    assert not runs  # block 0 never ran: the stored states fed block 2
    for key in ("margin_gain", "promote_gain", "suppress_gain", "kl"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key


def test_logprobs_when_the_head_is_not_called_as_a_module(tiny_llama, tokenizer, monkeypatch) -> None:
    """A model whose output embeddings never run as a module (the gather hook does not fire) returns full logits:
    token_logprobs indexes them instead, with the same numbers."""
    tiny_llama.eval()
    pairs = _pairs(tokenizer)
    ref = token_logprobs(tiny_llama, tokenizer, pairs, batch_size=8, share_prompts=True)
    unused = torch.nn.Linear(tiny_llama.config.hidden_size, 3)
    monkeypatch.setattr(tiny_llama, "get_output_embeddings", lambda: unused)
    got = token_logprobs(tiny_llama, tokenizer, pairs, batch_size=8, share_prompts=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
