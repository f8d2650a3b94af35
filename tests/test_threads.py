"""Concurrency: two threads using one model get exactly the results they get alone.

Every test runs two workers on one tiny model while a test-only hook on the input embeddings makes their
forward passes meet at a barrier, so each forward of one thread runs while the other thread is inside a forward
too (and has its own steering attached): the overlap is forced, not left to the scheduler. Each pair is
repeated :data:`REPS` times; results must equal the single-thread ones (vectors to 1e-6, generations
token for token), no call may raise, and the model must end bitwise as it started (weights, hooks,
``requires_grad``, ``.grad``, train/eval flags, config).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import ARCHS, SLIDING_OVERRIDES, make_tiny_model
from test_reliability import ModelState
from torch import nn

import steering_opt as so
from steering_opt import arch, hooks

REPS = 20
D = 64  # tiny models' hidden size


def run_pair(model: nn.Module, first: Callable[[], Any], second: Callable[[], Any]) -> list[Any]:
    """Run ``first`` and ``second`` in two threads whose forward passes of ``model`` start together.

    A plain (test-only) pre-hook on the input embeddings waits at a two-party barrier, so forward ``k`` of one
    thread starts with forward ``k`` of the other; a thread that finishes breaks the barrier, letting the other
    run on alone. Returns both results; re-raises the first exception of either thread.
    """
    barrier = threading.Barrier(2, timeout=30)

    def meet(*_: Any) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass

    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def work(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # reported to the test thread below
            errors.append(e)
        finally:
            barrier.abort()

    handle = model.get_input_embeddings().register_forward_pre_hook(meet)
    try:
        threads = [threading.Thread(target=work, args=(i, fn)) for i, fn in enumerate((first, second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a worker thread hung"
    finally:
        handle.remove()
    if errors:
        raise errors[0]
    return results


def _train_mode_with_trainable_weights(model: nn.Module) -> None:
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
        if i % 4 == 0:
            p.grad = torch.full_like(p, 0.5)
    model.train()


def _optimizer(model: nn.Module, tokenizer: Any, layer: int, dst: str, src: str) -> Callable[[], torch.Tensor]:
    tok = copy.deepcopy(tokenizer)  # a fast tokenizer must not be shared between threads
    dps = [so.TrainingDatapoint("The weather today is", src_completions=[src], dst_completions=[dst, " fine"])]

    def run() -> torch.Tensor:
        vec, _ = so.optimize_vector(model, dps, layer, tokenizer=tok, max_iters=3, lr=0.1, noise_scale=0.05,
                                    seed=7)
        return vec.detach().clone()

    return run


@pytest.mark.parametrize("train_mode", [False, True])
def test_two_optimisations_in_threads_match_running_alone(tokenizer: Any, train_mode: bool) -> None:
    model = make_tiny_model("qwen2", len(tokenizer))
    if train_mode:
        _train_mode_with_trainable_weights(model)
    state = ModelState.of(model)
    first = _optimizer(model, tokenizer, 2, " yes", " no")  # layer 2: the fast engine skips blocks 0-1
    second = _optimizer(model, tokenizer, 1, " rain", " sun")
    alone = [first(), second()]
    state.assert_same(model)
    for rep in range(REPS):
        together = run_pair(model, first, second)
        for a, b in zip(alone, together):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=f"repetition {rep}")
        state.assert_same(model)


def _plain_generate(model: nn.Module, ids: torch.Tensor) -> Callable[[], list[int]]:
    def run() -> list[int]:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 min_new_tokens=6, do_sample=False, pad_token_id=2)
        return out[0].tolist()

    return run


def test_steered_and_plain_generation_in_threads(tokenizer: Any) -> None:
    model = make_tiny_model("llama", len(tokenizer))
    state = ModelState.of(model)
    vec = so.SteeringVector({1: torch.randn(D, generator=torch.Generator().manual_seed(0)) * 8})
    tok = copy.deepcopy(tokenizer)

    def steered() -> str:
        return so.generate_with_steering(model, tok, "Once upon a time", vec, max_new_tokens=6, min_new_tokens=6)

    plain = _plain_generate(model, torch.tensor([tokenizer("Tell me a story")["input_ids"]]))
    alone = [steered(), plain()]
    assert so.generate_with_steering(model, tok, "Once upon a time", None, max_new_tokens=6,
                                     min_new_tokens=6) != alone[0], "the vector must change the text"
    for rep in range(REPS):
        assert run_pair(model, steered, plain) == alone, f"repetition {rep}"
    state.assert_same(model)


def test_apply_block_steers_only_its_own_thread(tokenizer: Any) -> None:
    """``SteeringVector.apply`` (a ``with`` block) steers the forwards of the thread that entered it only."""
    model = make_tiny_model("llama", len(tokenizer))
    state = ModelState.of(model)
    ids = torch.tensor([tokenizer("Hello there, how are")["input_ids"]])
    vec = so.SteeringVector({2: torch.ones(D) * 4})

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits

    def steered() -> torch.Tensor:
        with vec.apply(model):
            return logits()

    alone = [steered(), logits()]
    assert not torch.allclose(alone[0], alone[1])
    for rep in range(REPS):
        together = run_pair(model, steered, logits)
        for a, b in zip(alone, together):
            torch.testing.assert_close(b, a, atol=0, rtol=0, msg=f"repetition {rep}")
    state.assert_same(model)


def test_attach_scope(tiny_llama: nn.Module) -> None:
    """``attach`` hooks act on the attaching thread only; ``scope="global"`` hooks on every thread."""
    block = arch.get_blocks(tiny_llama)[0]
    seen: dict[str, list[int]] = {"thread": [], "global": []}

    def spec(kind: str) -> hooks.HookSpec:
        return block, lambda *_: seen[kind].append(threading.get_ident()), "pre"

    ids = torch.tensor([[1, 5, 6]])
    with hooks.attach([spec("thread")]) as scoped, hooks.attach([spec("global")], scope="global") as shared:
        assert scoped.thread == threading.get_ident() and shared.thread is None
        worker = threading.Thread(target=lambda: tiny_llama(input_ids=ids))
        worker.start()
        worker.join()
        tiny_llama(input_ids=ids)
    assert seen["thread"] == [threading.get_ident()]
    assert sorted(seen["global"]) == sorted([worker.ident, threading.get_ident()])
    with pytest.raises(ValueError, match="scope"):
        hooks.attach([spec("thread")], scope="process")


@pytest.mark.parametrize("arch_name", ARCHS)
def test_truncated_view_is_exact_and_leaves_the_model_alone(arch_name: str, left_tokenizer: Any) -> None:
    """The fast engine's view running only the upper blocks gives the full model's logits (left padding, and
    sliding-window layers where the architecture has them), and the model itself is never modified."""
    model = make_tiny_model(arch_name, len(left_tokenizer), **SLIDING_OVERRIDES.get(arch_name, {}))
    state = ModelState.of(model)
    blocks = arch.get_blocks(model)
    batch = dict(left_tokenizer(["one two three four five six", "seven eight"], padding=True, return_tensors="pt"))
    for start in range(1, arch.num_layers(model)):
        with torch.no_grad():
            (h,) = hooks.capture_inputs(model, [blocks[start]], {**batch, "use_cache": False})
            ref = model(**batch, use_cache=False).logits
            view = arch.truncated_view(model, start)
            assert len(arch.get_blocks(view)) == arch.num_layers(model) - start
            assert arch.get_blocks(model) is blocks and len(blocks) == arch.num_layers(model)

            def put(module: nn.Module, args: tuple, kwargs: dict, h: torch.Tensor = h) -> tuple[tuple, dict]:
                return arch.replace_hidden_states(args, kwargs, h)

            with hooks.attach([(blocks[start], put, "pre")]):
                out = view(**batch, use_cache=False).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=f"{arch_name} start={start}")
    state.assert_same(model)
