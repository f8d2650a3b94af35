"""Limits that must fail cleanly or not at all: many short completions (memory stays bounded, allocation
failures are retried in smaller chunks or explained), chunk building in linear time, and the generation
arguments (``seed``, ``temperature``) checked before any work."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model

import steering_opt.evaluate as ev
from steering_opt import arch
from steering_opt.data import DST, SRC, TokenizedCompletion
from steering_opt.engine import FastEngine, Objective, SteerSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from workloads import saved_bytes  # noqa: E402  (the benchmarks' measurement of saved activations)

ALLOC_ERROR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
               "you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")


def _short_seqs(n_datapoints: int, per_datapoint: int, vocab: int, prompt_len: int = 6,
                completion_len: int = 2) -> list[TokenizedCompletion]:
    """``per_datapoint`` random completions of ``completion_len`` tokens after each of ``n_datapoints`` prompts."""
    g = torch.Generator().manual_seed(0)
    out = []
    for d in range(n_datapoints):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        for j in range(per_datapoint):
            comp = torch.randint(3, vocab, (completion_len,), generator=g).tolist()
            out.append(TokenizedCompletion(datapoint=d, kind=DST if j % 2 else SRC, index=j, ids=prompt + comp,
                                           prompt_len=prompt_len, steer_positions=None, sign=1.0, target=None))
    return out


def _spec(v: torch.Tensor, layer: int) -> Any:
    return lambda idx: SteerSpec(rows={layer: v[None].expand(len(idx), -1)})


# ------------------------------------------------------------------------------------------ memory


def test_thousands_of_short_completions_keep_memory_bounded() -> None:
    """2,000 two-token completions of one prompt with the default budget: the packed rows stay short (their
    attention is quadratic), so what autograd saves is small, and the losses equal unpacked rows'."""
    model = make_tiny_model("llama", 512)
    seqs = _short_seqs(1, 2000, 512)
    v = torch.zeros(arch.hidden_size(model), requires_grad=True)
    eng = FastEngine(model, seqs, [1], Objective())
    saved = saved_bytes(lambda: eng.run(_spec(v, 1)), model)
    assert saved < 300 * 2**20, f"{saved / 2**20:.0f} MiB saved for backward"
    assert max(c.input_ids.shape[1] for chunks in eng._chunks.values() for c in chunks) <= 256
    grad = v.grad.clone()
    v.grad = None
    plain = FastEngine(model, seqs, [1], Objective(), share_prompts=False)
    torch.testing.assert_close(eng.run(_spec(v, 1)), plain.run(_spec(v, 1)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, v.grad / 2, rtol=1e-3, atol=1e-4)


def test_logits_of_one_chunk_are_bounded_by_the_vocabulary(tokenizer: Any) -> None:
    """Many completions with a large vocabulary: one chunk's ``(positions, vocab)`` logits stay <= 2**27
    elements (512 MiB in float32), and every completion is in exactly one chunk."""
    model = make_tiny_model("llama", len(tokenizer))
    seqs = _short_seqs(40, 100, len(tokenizer))
    eng = FastEngine(model, seqs, [1], Objective())
    chunks = eng._make_chunks(list(range(len(seqs))))
    assert max(len(c.targets) for c in chunks) * len(tokenizer) <= 2**27
    assert sorted(i for c in chunks for i in c.seq_idx) == list(range(len(seqs)))


def _failing_forward(monkeypatch: pytest.MonkeyPatch, max_tokens: int) -> list[int]:
    """Make every engine forward over more than ``max_tokens`` tokens fail like torch's CPU allocator; returns
    the list of failed sizes."""
    failed: list[int] = []
    real = FastEngine._forward

    def forward(self: FastEngine, chunk: Any, model: Any = None) -> Any:
        if chunk.input_ids.numel() > max_tokens:
            failed.append(chunk.input_ids.numel())
            raise RuntimeError(ALLOC_ERROR)
        return real(self, chunk, model)

    monkeypatch.setattr(FastEngine, "_forward", forward)
    return failed


def test_allocation_failure_is_retried_in_smaller_chunks(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    model = make_tiny_model("llama", 512)
    seqs = _short_seqs(6, 5, 512)
    v = torch.randn(arch.hidden_size(model), requires_grad=True)
    want = FastEngine(model, seqs, [2], Objective()).run(_spec(v, 2))
    want_grad = v.grad.clone()
    v.grad = None
    failed = _failing_forward(monkeypatch, 40)
    eng = FastEngine(model, seqs, [2], Objective())
    with caplog.at_level(logging.WARNING, logger="steering_opt.engine"):
        got = eng.run(_spec(v, 2))
    assert failed, "the allocation failure was not triggered"
    assert "max_batch_tokens" in caplog.text
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.grad, want_grad, rtol=1e-5, atol=1e-5)
    n_failed = len(failed)
    v.grad = None
    torch.testing.assert_close(eng.run(_spec(v, 2)), want, rtol=1e-5, atol=1e-5)
    assert len(failed) == n_failed  # the smaller chunks are kept: no failure on the next step
    torch.testing.assert_close(v.grad, want_grad, rtol=1e-5, atol=1e-5)


def test_allocation_failure_on_one_sequence_names_max_batch_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny_model("llama", 512)
    seqs = _short_seqs(2, 3, 512)
    _failing_forward(monkeypatch, 0)
    v = torch.zeros(arch.hidden_size(model), requires_grad=True)
    with pytest.raises(MemoryError, match="max_batch_tokens"):
        FastEngine(model, seqs, [1], Objective()).run(_spec(v, 1))
    assert v.grad is None


def test_allocation_failure_in_backward_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny_model("llama", 512)
    seqs = _short_seqs(2, 3, 512)
    v = torch.zeros(arch.hidden_size(model), requires_grad=True)

    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(ALLOC_ERROR)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    with pytest.raises(MemoryError, match=r"set max_batch_tokens=\d+"):
        FastEngine(model, seqs, [1], Objective()).run(_spec(v, 1))

    def other(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("some other failure")

    monkeypatch.setattr(torch.Tensor, "backward", other)
    with pytest.raises(RuntimeError, match="some other failure"):  # not an allocation failure: unchanged
        FastEngine(model, seqs, [1], Objective()).run(_spec(v, 1))


# ------------------------------------------------------------------------------------ chunk building


def test_chunk_building_is_linear_in_the_datapoints() -> None:
    """Building the chunks of 4x the datapoints takes ~4x as long (it was quadratic: 16x)."""
    model = make_tiny_model("llama", 512)

    def build_time(n: int) -> float:
        seqs = _short_seqs(n, 2, 512, prompt_len=8, completion_len=3)
        eng = FastEngine(model, seqs, [1], Objective(), max_batch_tokens=10**8)  # one chunk: worst case
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            chunks = eng._make_chunks(list(range(len(seqs))))
            best = min(best, time.perf_counter() - t)
        assert sum(len(c.seq_idx) for c in chunks) == len(seqs)
        return best

    small, large = build_time(1000), build_time(4000)
    assert large / small < 8, f"1000 datapoints: {small:.3f} s, 4000: {large:.3f} s"


# ----------------------------------------------------------------------------------- generation args


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "0", True, None])
def test_bad_seed_is_refused_before_any_work(seed: Any, monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> None:
    model = make_tiny_model("llama", len(tokenizer))

    def no_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(ev, "encode_prompts", no_work)
    for call in (lambda: ev.generate(model, tokenizer, ["Hi"], seed=seed),
                 lambda: ev.generate(model, tokenizer, ["Hi"], do_sample=True, seed=seed),
                 lambda: ev.evaluate(model, tokenizer, None, ["Hi"], seed=seed),
                 lambda: ev.Evaluator(model, tokenizer, ["Hi"], seed=seed)):
        with pytest.raises((TypeError, ValueError), match="`seed`"):
            call()


@pytest.mark.parametrize("temperature", [1e-300, 1e-5, -1.0, float("nan"), float("inf"), "1"])
def test_temperature_must_be_zero_or_at_least_1e_4(temperature: Any, tokenizer: Any) -> None:
    model = make_tiny_model("llama", len(tokenizer))
    for call in (lambda: ev.generate(model, tokenizer, ["Hi"], do_sample=True, temperature=temperature),
                 lambda: ev.evaluate(model, tokenizer, None, ["Hi"], do_sample=True, temperature=temperature)):
        with pytest.raises(ValueError, match="`temperature`"):
            call()


def test_temperature_zero_is_greedy(tokenizer: Any) -> None:
    model = make_tiny_model("llama", len(tokenizer))
    greedy = ev.generate(model, tokenizer, ["Hello there"], max_new_tokens=5)
    assert ev.generate(model, tokenizer, ["Hello there"], max_new_tokens=5, do_sample=True, temperature=0,
                       seed=3) == greedy


def test_largest_seed_wraps_per_batch(monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> None:
    """Batch ``b`` is seeded with ``(seed + b) mod 2**63``: the largest seed works, every seed given to torch
    stays in ``[0, 2**63)``, and the second batch is sampled like a first batch with seed 0."""
    model = make_tiny_model("llama", len(tokenizer))
    prompts = ["Hello there", "Hello world"]
    assert len(tokenizer(prompts[0]).input_ids) == len(tokenizer(prompts[1]).input_ids)  # batches keep order
    seeds: list[int] = []
    real = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda s: (seeds.append(s), real(s))[1])
    kw: dict[str, Any] = dict(max_new_tokens=6, do_sample=True, batch_size=1)
    texts = ev.generate(model, tokenizer, prompts, seed=2**63 - 1, **kw)
    assert seeds == [2**63 - 1, 0]
    assert len(texts) == 2
    assert texts[1] == ev.generate(model, tokenizer, prompts[1:], seed=0, **kw)[0]
    assert texts[1] != ev.generate(model, tokenizer, prompts[1:], seed=1, **kw)[0]
