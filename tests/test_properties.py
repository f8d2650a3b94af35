"""Property tests: random sequences of API calls — valid, invalid, or interrupted by an error or a
KeyboardInterrupt raised inside the model — on a tiny model in a random train/eval and requires_grad state
leave its state_dict bitwise equal, no hook on any module (forward / pre / with-kwargs / backward, and the
global registries), its requires_grad and training flags, config and generation config unchanged; only
documented exceptions escape; an optimiser never returns a non-finite vector, nor a non-finite loss
without saying so (``status == "nonfinite"``).
"""

from __future__ import annotations

import functools
import math
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import ModelState, hooks_left
from torch import nn

import steering_opt as so
from steering_opt.scale import Job, optimize_many

D = 64
PROPS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


class Injected(Exception):
    """An error raised inside the model by the test (stands for a failing user hook, OOM, ...)."""


#: What a call may raise: argument errors (documented), and what the test injects.
ALLOWED = (ValueError, TypeError, KeyError, Injected, KeyboardInterrupt)


@functools.cache
def _model(arch: str, vocab: int) -> nn.Module:
    return make_tiny_model(arch, vocab)


def pick(draw: Callable, valid: list[Any], invalid: list[Any] = ()) -> Any:  # type: ignore[assignment]
    """Mostly a valid value; an invalid one about one time in eight (several per call would hide each other)."""
    if invalid and draw(st.sampled_from([False] * 7 + [True])):  # (hypothesis favours 0 in integers(0, 7))
        return draw(st.sampled_from(list(invalid)))
    return draw(st.sampled_from(list(valid)))


def _dp(draw: Callable) -> so.TrainingDatapoint:
    prompt = pick(draw, ["Hi", "The cat sat on the", "Tell me a story about a dog"])
    dst = draw(st.lists(st.sampled_from([" yes", " mat", " once upon a time"]), max_size=2))
    src = draw(st.lists(st.sampled_from([" no", " hat"]), min_size=0 if dst else 1, max_size=2))
    return so.TrainingDatapoint(prompt, src_completions=src, dst_completions=dst,
                                token=pick(draw, [None, None, -1, slice(0, 2), [0, 1]]),
                                is_negative=draw(st.booleans()))


def _layer(draw: Callable) -> int:
    return pick(draw, [0, 1, 2, 3, -1, -4], [4, -5])


def _vec(draw: Callable) -> torch.Tensor:
    return pick(draw, [torch.randn(D), 5 * torch.randn(D)],
                [torch.zeros(D), torch.full((D,), math.nan), torch.ones(32), torch.full((D,), 1e30)])


def _check_result(vec: torch.Tensor, info: dict[str, Any]) -> None:
    assert torch.isfinite(vec).all(), "an optimiser returned a non-finite vector"
    loss = info["loss"]
    flat = [x for a in loss for b in a for x in b] if isinstance(loss, list) else [loss]
    if info["status"] != "nonfinite":
        assert all(math.isfinite(x) for x in flat), f"non-finite loss {loss} with status {info['status']!r}"


# ------------------------------------------------------------------------------------ operations


def op_optimize_vector(m: nn.Module, tok: Any, draw: Callable) -> None:
    kind = draw(st.sampled_from(["additive", "clamp", "affine", "multi-layer"]))
    kw: dict[str, Any] = dict(max_iters=pick(draw, [0, 1, 2], [-1]), lr=pick(draw, [0.1, 10.0], [-1, 0]),
                              seed=draw(st.integers(0, 3)), engine=pick(draw, ["fast", "fast", "reference"]))
    if kind == "clamp":
        kw["vector_clamp"] = pick(draw, [1.0, 0.0, -2.0], [math.nan])
    if kind == "affine":
        kw["affine_rank"] = pick(draw, [1, 2], [0, D + 1])
    if draw(st.integers(0, 3)) == 0:
        kw["starting_vec"] = _vec(draw)
    if draw(st.booleans()):
        kw["noise_scale"] = 0.1
    if draw(st.booleans()):
        kw.update(target_loss=pick(draw, [0.5, 1e6]), do_output_constr=draw(st.booleans()), max_output_constr_iters=2)
    layer = [_layer(draw), _layer(draw)] if kind == "multi-layer" else _layer(draw)
    out = so.optimize_vector(m, [_dp(draw) for _ in range(draw(st.integers(1, 2)))], layer, tokenizer=tok, **kw)
    _check_result(out[0], out[-1])
    if kind == "affine":
        assert torch.isfinite(out[1]).all()


def op_optimize_vectors(m: nn.Module, tok: Any, draw: Callable) -> None:
    layers = pick(draw, [[0], [1, 3], [0, 2, 3]], [[], [3, 3], [1, 5]])
    vecs, info = so.optimize_vectors(m, [_dp(draw)], layers, tokenizer=tok, max_iters=draw(st.integers(0, 2)),
                                     lr=0.1, entropy_weight=pick(draw, [0.0, 1.0], [-1.0]),
                                     regularization_weight=0.1, sparsity_weight=0.1, seed=0)
    for v in vecs.values():
        _check_result(v, info)


def op_minibatch(m: nn.Module, tok: Any, draw: Callable) -> None:
    prompts = pick(draw, [["A"], ["A", "B c"], ["A", "B c", "D e f g"]], [[], ["A", ""]])
    vec, info = so.optimize_vector_minibatch_hf(m, tok, prompts, _layer(draw), dst_completions=[" x"],
                                                minibatch_size=pick(draw, [1, 2, 5], [0]),
                                                max_iters=draw(st.integers(0, 3)), lr=0.1, seed=0)
    _check_result(vec, info)


def op_optimize_many(m: nn.Module, tok: Any, draw: Callable) -> None:
    jobs = [Job([_dp(draw)], _layer(draw), max_iters=draw(st.integers(0, 2)), lr=pick(draw, [0.1], [-1.0]), seed=i,
                vector_clamp=pick(draw, [None, 1.0]), noise_scale=pick(draw, [None, 0.1]))
            for i in range(draw(st.integers(1, 3)))]
    for out in optimize_many(m, jobs, tokenizer=tok):
        _check_result(out[0], out[-1])


def _forward(m: nn.Module, tok: Any, draw: Callable) -> None:
    m(input_ids=torch.tensor([tok("Hello there friend")["input_ids"]]))
    if draw(st.integers(0, 3)) == 0:
        raise Injected("raised inside the with block")


def op_hooks(m: nn.Module, tok: Any, draw: Callable) -> None:
    v = _vec(draw)
    matrix = pick(draw, ["none", "none", "abl"], ["bad"])
    mat = None if matrix == "none" else so.make_abl_mat(v) if matrix == "abl" else torch.zeros(3, 3)
    hooks = [(_layer(draw), so.make_steering_hook_hf(v, mat, token=pick(draw, [None, -1, slice(1, 3)])))
             for _ in range(draw(st.integers(1, 3)))]
    with so.hf_hooks_contextmanager(m, hooks):
        _forward(m, tok, draw)


def op_apply(m: nn.Module, tok: Any, draw: Callable) -> None:
    layers = pick(draw, [[0], [1, 3], [2]], [[7], [1, 7]])
    vec = so.SteeringVector({x: _vec(draw) for x in layers}, layer_type=draw(st.sampled_from(list(so.SITES))),
                            clamp=pick(draw, [None, None, 0.5]))
    if draw(st.booleans()):
        with vec.apply(m, multiplier=pick(draw, [1.0, -2.0], [math.nan]),
                       injection_mode=pick(draw, ["all", "last", "generated"], ["nope"])):
            _forward(m, tok, draw)
    else:
        handle = vec.patch(m, token_indices=pick(draw, [None, [0, -1], slice(1, None)], ["bad"]))
        try:
            _forward(m, tok, draw)
        finally:
            handle.remove()


def op_contrastive(m: nn.Module, tok: Any, draw: Callable) -> None:
    pairs = pick(draw, [[("I love it", "I hate it")], [("I love it", "I hate it"), ("Great", "Awful stuff")]],
                 [[], [("", "x")]])
    so.train_steering_vector(m, tok, pairs, layers=pick(draw, [None, [1], [0, 3]], [[9]]),
                             layer_type=pick(draw, ["decoder_block", "mlp", "self_attn"]),
                             batch_size=pick(draw, [1, 3], [0]), read_token_index=pick(draw, [-1, 0], [50]),
                             aggregator=pick(draw, [None, so.pca_aggregator(), so.logistic_aggregator(max_iter=5)]))


def op_generate(m: nn.Module, tok: Any, draw: Callable) -> None:
    so.generate_with_steering(m, tok, pick(draw, ["Hi", ["Hi", "Hello there"]], [""]),
                              pick(draw, [None, so.SteeringVector({1: torch.ones(D)})]),
                              multiplier=pick(draw, [1.0, -1.0], [math.inf]), max_new_tokens=3,
                              injection_mode=pick(draw, ["all", "generated"]))


def op_sampling(m: nn.Module, tok: Any, draw: Callable) -> None:
    if draw(st.booleans()):
        so.get_completion_logprob_hf(m, pick(draw, ["Hi"], [""]), pick(draw, [" there"], [""]), tok,
                                     do_one_minus=draw(st.booleans()))
    else:
        so.sample_most_likely_completions_hf(m, tok, "Hi", src_prompt=pick(draw, [None, "Yo"]),
                                             k=pick(draw, [1, 3], [0]), iters=draw(st.integers(0, 2)))


def op_evaluate(m: nn.Module, tok: Any, draw: Callable) -> None:
    so.evaluate(m, tok, pick(draw, [None, so.SteeringVector({2: torch.ones(D)})], ["bad"]),
                pick(draw, [["Hi"], ["Hi", "Yo"]], [[]]), promote=[" yes"], suppress=[" no"],
                neutral_prompts=pick(draw, [None, ["The sky is"]]), generate=draw(st.booleans()),
                max_new_tokens=2, fluency_lang=None)


def op_injector(m: nn.Module, tok: Any, draw: Callable) -> None:
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    inj = so.MultiVectorInjector(m, {"a": so.SteeringVector({1: torch.ones(D)}),
                                     "b": so.SteeringVector({_layer(draw): torch.ones(D)})},
                                 injection_mode=pick(draw, ["all", "first"]))
    with inj, so.ActivationHook(m, pick(draw, [[0, 2], [1]], [[5]]),
                                component=pick(draw, ["residual", "mlp", "attn"])):
        for s in draw(st.lists(st.sampled_from([0.5, 2.0, 0.5, 2.0, math.nan]), max_size=2)):
            inj.set_strength(pick(draw, ["a", "b"], ["c"]), s)
            m(input_ids=ids)


def op_save_load(m: nn.Module, tok: Any, draw: Callable) -> None:
    vec = so.SteeringVector({pick(draw, [1, 2], [9]): _vec(draw)})
    with tempfile.TemporaryDirectory() as d:
        path = so.save(vec, Path(d) / draw(st.sampled_from(["v", "v.safetensors"])), model=m)
        so.load(path, model=m)


OPS: dict[str, Callable[[nn.Module, Any, Callable], None]] = {
    f.__name__.removeprefix("op_"): f for f in (
        op_optimize_vector, op_optimize_vectors, op_minibatch, op_optimize_many, op_hooks, op_apply, op_contrastive,
        op_generate, op_sampling, op_evaluate, op_injector, op_save_load)
}


def _random_state(m: nn.Module, draw: Callable) -> None:
    """A random starting state the library must leave alone."""
    rng = random.Random(draw(st.integers(0, 2**16), label="requires_grad pattern seed"))
    trainable = draw(st.sampled_from([0.0, 0.5, 1.0]), label="fraction of trainable weights")
    for p in m.parameters():
        p.requires_grad_(rng.random() < trainable)
    mode = draw(st.sampled_from(["eval", "train", "mixed"]))
    for i, mod in enumerate(m.modules()):
        mod.training = mode == "train" or (mode == "mixed" and i % 2 == 1)
    m.config.use_cache = draw(st.booleans())


def _run(m: nn.Module, tok: Any, name: str, draw: Callable) -> None:
    failure = draw(st.sampled_from([None, None, None, Injected, KeyboardInterrupt]), label=f"{name}: failure")
    handle = None
    if failure is not None:
        calls = {"n": 0}
        after = draw(st.integers(0, 4), label="after forward calls")

        def boom(*_: Any) -> None:
            calls["n"] += 1
            if calls["n"] > after:
                raise failure("injected inside the model")

        block = so.get_blocks(m)[draw(st.integers(0, 3), label="failing block")]
        handle = block.register_forward_pre_hook(boom)
    try:
        OPS[name](m, tok, draw)
    except ALLOWED:
        pass
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@PROPS
@given(data=st.data())
def test_random_call_sequences_leave_the_model_exactly_as_found(arch: str, tokenizer: Any,
                                                                data: st.DataObject) -> None:
    m = _model(arch, len(tokenizer))
    _random_state(m, data.draw)
    state = ModelState.of(m)
    names = data.draw(st.lists(st.sampled_from(list(OPS)), min_size=1, max_size=5), label="calls")
    for name in names:
        _run(m, tokenizer, name, data.draw)
        assert not hooks_left(m), f"hooks left after {name}: {hooks_left(m)}"
    state.assert_same(m)
    pad = tokenizer.pad_token
    assert tokenizer.pad_token == pad


@PROPS
@given(lr=st.floats(1e-4, 1e6), start=st.floats(1e-3, 1e32), max_norm=st.one_of(st.none(), st.floats(1e-3, 1e4)),
       coldness=st.floats(1e-2, 1e3), clamp=st.one_of(st.none(), st.floats(-1e3, 1e3)),
       iters=st.integers(0, 4))
def test_optimiser_never_returns_non_finite(tokenizer: Any, lr: float, start: float, max_norm: float | None,
                                            coldness: float, clamp: float | None, iters: int) -> None:
    """Extreme (but valid) settings: the vector is always finite and a non-finite loss is always reported."""
    m = _model("llama", len(tokenizer))
    state = ModelState.of(m)
    dp = so.TrainingDatapoint("The cat sat on the", src_completions=[" mat"], dst_completions=[" hat"])
    vec, info = so.optimize_vector(m, [dp], 1, tokenizer=tokenizer, lr=lr, starting_norm=start, max_norm=max_norm,
                                   coldness=coldness, vector_clamp=clamp, max_iters=iters, seed=0)
    _check_result(vec, info)
    assert info["status"] in ("max_iters", "nonfinite")
    state.assert_same(m)
