"""The objective is what DESIGN.md §3 says it is.

* The engines' per-completion losses equal a slow, obviously-correct computation written here from
  the model's full logits (promotion, suppression with ``do_one_minus`` True/False, coldness ≠ 1,
  ``normalize_token_length``), for both engines and several architectures.
* Their gradients w.r.t. the steering vector match central finite differences of that computation
  (float64 model, every coordinate).
* Completion tokens are the completion's own tokens, also when prompt and completion would merge
  into one token if tokenised together.
* ``get_completion_logprob_hf`` and ``sample_most_likely_completions_hf`` match hand computations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from torch import nn

import steering_opt as so
from steering_opt.data import DST, SRC, TokenizedCompletion, tokenize_datapoints
from steering_opt.engine import FastEngine, Objective, ReferenceEngine, SteerSpec

LAYER = 1
INIT = 0.3  # larger than the HF default so that probabilities (and the suppression loss) are not tiny


# ------------------------------------------------------------------------ obviously-correct loss


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, looked up independently of ``steering_opt.arch``."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError(f"no decoder blocks found in {type(model).__name__}")


def add_hook(vec: torch.Tensor, positions: list[int] | None):
    """Pre-hook adding ``vec`` to the block input at ``positions`` (None: all positions)."""

    def hook(module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        delta = vec.to(h).expand_as(h).clone()
        if positions is not None:
            keep = torch.zeros(h.shape[1], dtype=torch.bool)
            keep[positions] = True
            delta[:, ~keep] = 0
        h = h + delta
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": h}
        return (h, *args[1:]), kwargs

    return hook


def slow_loss(model: nn.Module, p_ids: list[int], c_ids: list[int], kind: int,
              steering: dict[int, torch.Tensor], *, positions: list[int] | None = None, coldness: float = 0.7,
              do_one_minus: bool = True, normalize: bool = False) -> torch.Tensor:
    """Loss of one completion from the full logits of one unbatched forward, in float64."""
    ids = torch.tensor([p_ids + c_ids])
    handles = [blocks(model)[layer].register_forward_pre_hook(add_hook(v, positions), with_kwargs=True)
               for layer, v in steering.items()]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0].double()
    finally:
        for h in handles:
            h.remove()
    probs = torch.softmax(coldness * logits, dim=-1)
    p = torch.stack([probs[len(p_ids) - 1 + t, c_ids[t]] for t in range(len(c_ids))])
    if kind == DST:
        loss = -torch.log(p).sum()
    elif do_one_minus:
        loss = -torch.log(1 - p).sum()
    else:
        loss = torch.log(p).sum()
    return loss / len(c_ids) if normalize else loss


def enc(tok, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


DATAPOINTS = [
    so.TrainingDatapoint("The capital of France is", src_completions=[" Paris, of course.", " Rome"],
                         dst_completions=[" Berlin"]),
    so.TrainingDatapoint("Say", src_completions=[" no"], dst_completions=[" yes please", " ok"]),
]

OBJECTIVES = [  # (coldness, do_one_minus, normalize_token_length)
    (0.7, True, False),
    (1.0, True, False),
    (0.5, False, False),
    (1.3, True, True),
    (0.7, False, True),
]


@pytest.fixture(scope="module")
def models(tokenizer):
    return {arch: make_tiny_model(arch, len(tokenizer), initializer_range=INIT) for arch in ("llama", "gpt2",
                                                                                               "gpt_neox")}


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("coldness,do_one_minus,normalize", OBJECTIVES)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_loss_equals_full_logits_computation(models, tokenizer, arch, coldness, do_one_minus, normalize, engine):
    model = models[arch]
    v = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 2
    vec, info = so.optimize_vector(model, DATAPOINTS, LAYER, tokenizer=tokenizer, max_iters=0, starting_vec=v,
                                   coldness=coldness, do_one_minus=do_one_minus,
                                   normalize_token_length=normalize, engine=engine)
    assert info["iters"] == 0 and len(info["loss_history"]) == 1
    torch.testing.assert_close(vec, v)
    expected = []
    for dp in DATAPOINTS:
        p_ids = enc(tokenizer, dp.prompt, True)
        expected.append([[float(slow_loss(model, p_ids, enc(tokenizer, c, False), kind, {LAYER: v},
                                          coldness=coldness, do_one_minus=do_one_minus, normalize=normalize))
                          for c in comps]
                         for kind, comps in ((SRC, dp.src_completions), (DST, dp.dst_completions))])
    got = info["completion_losses"]
    assert [[len(x) for x in d] for d in got] == [[2, 1], [1, 2]]
    for d in range(2):
        for j in range(2):
            np.testing.assert_allclose(got[d][j], expected[d][j], rtol=1e-5, atol=1e-7)
    total = sum(x for d in expected for j in d for x in j)
    assert info["loss"] == pytest.approx(total, rel=1e-5)
    assert info["loss_history"][0] == pytest.approx(total, rel=1e-5)
    # the suppression terms are really what the flag says (not silently the other variant)
    src = expected[0][0][0]
    assert (src > 0) if do_one_minus else (src < 0)


def test_suppression_loss_is_finite_and_accurate_when_p_is_close_to_one():
    """``-log(1 - p)`` from float32 log-probs (log1mexp): accurate for p near 1, finite (and large) at p ≈ 1."""
    obj = Objective(coldness=1.0)
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [40.0, 0.0, 0.0]],
                          requires_grad=True)
    logp = obj.token_logprobs(logits, torch.tensor([0, 0, 0, 0]))
    losses = obj.completion_losses(logp, torch.arange(4), torch.tensor([SRC] * 4), torch.ones(4))
    p = torch.softmax(logits.detach().double(), -1)[:, 0]
    torch.testing.assert_close(losses[:3].double(), -torch.log1p(-p[:3]), rtol=1e-3, atol=0)
    assert torch.isfinite(losses).all() and float(losses[3].detach()) > 20
    losses.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------- finite differences

FD_VOCAB = 300


@pytest.fixture(scope="module")
def fd_model():
    # GPT-2 is float64 throughout after .double() (Llama's RMSNorm and rotary run in float32).
    return make_tiny_model("gpt2", FD_VOCAB, seed=1, initializer_range=INIT).double()


def _fd_seqs() -> list[TokenizedCompletion]:
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, FD_VOCAB, (n,), generator=g).tolist()

    p1, p2 = ids(6), ids(4)
    tc = TokenizedCompletion
    return [
        tc(datapoint=0, kind=SRC, index=0, ids=p1 + ids(3), prompt_len=6, steer_positions=None, sign=1.0,
           target=None),
        tc(datapoint=0, kind=DST, index=0, ids=p1 + ids(2), prompt_len=6, steer_positions=None, sign=1.0,
           target=None),
        tc(datapoint=1, kind=SRC, index=0, ids=p2 + ids(2), prompt_len=4,
           steer_positions=[False, True, False, True, True, False], sign=-1.0, target=None),
        tc(datapoint=1, kind=DST, index=0, ids=p2 + ids(3), prompt_len=4, steer_positions=None, sign=-1.0,
           target=None),
    ]


@pytest.mark.parametrize("layers", [[LAYER], [0, 2]], ids=["one_layer", "two_layers_shared"])
@pytest.mark.parametrize("coldness,do_one_minus,normalize", [(0.7, True, False), (1.3, False, True)])
@pytest.mark.parametrize("engine_cls", [FastEngine, ReferenceEngine])
def test_gradient_matches_central_finite_differences(fd_model, engine_cls, coldness, do_one_minus, normalize,
                                                    layers):
    seqs = _fd_seqs()
    objective = Objective(coldness=coldness, do_one_minus=do_one_minus, normalize_token_length=normalize)
    engine = engine_cls(fd_model, seqs, layers, objective)
    v0 = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3

    def slow(i: int, v: torch.Tensor) -> float:
        s = seqs[i]
        pos = None if s.steer_positions is None else [t for t, f in enumerate(s.steer_positions) if f]
        return float(slow_loss(fd_model, s.ids[: s.prompt_len], s.ids[s.prompt_len:], s.kind,
                               {layer: s.sign * v for layer in layers}, positions=pos, coldness=coldness,
                               do_one_minus=do_one_minus, normalize=normalize))

    eps = 1e-3
    eye = torch.eye(64, dtype=torch.float64)
    for i in range(len(seqs)):
        v = v0.clone().requires_grad_(True)

        def spec(idx, v=v):
            return SteerSpec(rows={layer: torch.stack([seqs[j].sign * v for j in idx]) for layer in layers})

        loss = engine.run(spec, subset=[i])
        assert float(loss[0]) == pytest.approx(slow(i, v0), rel=1e-5)
        fd = torch.tensor([(slow(i, v0 + eps * e) - slow(i, v0 - eps * e)) / (2 * eps) for e in eye])
        grad = v.grad
        assert grad is not None and float(fd.norm()) > 1e-6
        rel = float((grad - fd).norm() / fd.norm())
        assert rel < 1e-4, f"sequence {i}: relative gradient error {rel:.2e}"


# ------------------------------------------------------------------------------- tokenisation


def test_completion_tokens_are_exact_when_the_boundary_would_merge(tokenizer):
    prompt, completion = "Say hel", "lo world"
    joint = enc(tokenizer, prompt + completion, True)
    p_ids, c_ids = enc(tokenizer, prompt, True), enc(tokenizer, completion, False)
    assert joint != p_ids + c_ids  # "hel" + "lo" merge into " hello" when tokenised together
    assert joint[len(p_ids):] != c_ids
    (seq,) = tokenize_datapoints(tokenizer, [so.TrainingDatapoint(prompt, dst_completions=[completion])])
    assert seq.ids[: seq.prompt_len] == p_ids
    assert seq.ids[seq.prompt_len:] == c_ids
    assert seq.completion_len == len(c_ids)


def test_loss_and_logprob_use_the_completions_own_tokens(tokenizer):
    model = make_tiny_model("llama", len(tokenizer), initializer_range=INIT)
    prompt, completion = "Say hel", "lo world"
    p_ids, c_ids = enc(tokenizer, prompt, True), enc(tokenizer, completion, False)
    v = torch.zeros(64)
    v[0] = 1.0
    _, info = so.optimize_vector(model, [so.TrainingDatapoint(prompt, dst_completions=[completion])], LAYER,
                                 tokenizer=tokenizer, max_iters=0, starting_vec=v)
    expected = float(slow_loss(model, p_ids, c_ids, DST, {LAYER: v}))
    assert info["loss"] == pytest.approx(expected, rel=1e-5)
    joint = enc(tokenizer, prompt + completion, True)
    wrong = float(slow_loss(model, p_ids, joint[len(p_ids):], DST, {LAYER: v}))
    assert abs(wrong - expected) > 1e-3
    lp = so.get_completion_logprob_hf(model, prompt, completion, tokenizer, coldness=0.7)
    assert float(lp) == pytest.approx(-float(slow_loss(model, p_ids, c_ids, DST, {})), rel=1e-5)


# ------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("coldness", [1.0, 0.6])
@pytest.mark.parametrize("do_one_minus", [False, True])
def test_get_completion_logprob_hf_matches_hand_computation(tokenizer, do_one_minus, coldness):
    model = make_tiny_model("gpt2", len(tokenizer), initializer_range=INIT)
    prompt, completion = "The capital of France is", " Paris, of course."
    p_ids, c_ids = enc(tokenizer, prompt, True), enc(tokenizer, completion, False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].double()
    probs = torch.softmax(coldness * logits, -1)
    p = torch.stack([probs[len(p_ids) - 1 + t, c] for t, c in enumerate(c_ids)])
    expected = torch.log(1 - p) if do_one_minus else torch.log(p)
    total, per_token = so.get_completion_logprob_hf(model, prompt, completion, tokenizer, coldness=coldness,
                                                    do_one_minus=do_one_minus, return_all_probs=True)
    assert float(total) == pytest.approx(float(expected.sum()), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(per_token, expected.numpy(), rtol=1e-5, atol=1e-7)
    # under a steering hook the steered model is measured
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
    with so.hf_hooks_contextmanager(model, [(LAYER, so.make_steering_hook_hf(v))]):
        steered = so.get_completion_logprob_hf(model, prompt, completion, tokenizer, coldness=coldness,
                                               do_one_minus=do_one_minus)
    hand = -float(slow_loss(model, p_ids, c_ids, SRC if do_one_minus else DST, {LAYER: v}, coldness=coldness,
                            do_one_minus=True))
    assert float(steered) == pytest.approx(hand, rel=1e-5)
    assert float(steered) != pytest.approx(float(total), rel=1e-2)


class _Biased(nn.Module):
    """A tiny model plus a logit bias that depends on the previous token (``{token: {next: bias}}``),
    so that chosen continuations dominate the beams."""

    def __init__(self, inner: nn.Module, transitions: dict[int, dict[int, float]], vocab: int):
        super().__init__()
        self.inner = inner
        self.transitions = transitions
        self.vocab = vocab

    def forward(self, input_ids=None, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        bias = torch.zeros(*input_ids.shape, self.vocab)
        for b in range(input_ids.shape[0]):
            for t in range(input_ids.shape[1]):
                for nxt, val in self.transitions.get(int(input_ids[b, t]), {}).items():
                    bias[b, t, nxt] = val
        out.logits = out.logits + bias
        return out


def _beam_search(model, prefix: list[int], k: int, iters: int, coldness: float):
    """Straightforward beam search: keep the k (beam, token) pairs with the highest next-token prob."""
    beams, probs = [[]], [[]]
    for _ in range(iters + 1):
        cand = []
        for b, pr in zip(beams, probs):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prefix + b])).logits[0, -1].double()
            p = torch.softmax(coldness * logits, -1)
            top = torch.topk(p, k).indices.tolist()  # the overall top k lie within each beam's top k
            cand += [(float(p[t]), b + [t], pr + [float(p[t])]) for t in top]
        cand.sort(key=lambda c: -c[0])
        beams, probs = [c[1] for c in cand[:k]], [c[2] for c in cand[:k]]
    return beams, np.array(probs)


def test_sample_most_likely_completions_handles_beams_that_retokenise_differently(tokenizer):
    hel, lo, world = enc(tokenizer, " hel", False)[0], enc(tokenizer, "lo", False)[0], \
        enc(tokenizer, " world", False)[0]
    k, iters, prompt = 4, 2, "Say"
    last = enc(tokenizer, prompt, True)[-1]
    transitions = {last: {hel: 9.0, world: 8.0}, hel: {lo: 9.0, hel: 7.0}, lo: {world: 9.0}, world: {hel: 8.0}}
    model = _Biased(make_tiny_model("llama", len(tokenizer), initializer_range=0.02), transitions,
                    len(tokenizer)).eval()
    completions, probs = so.sample_most_likely_completions_hf(model, tokenizer, prompt, k=k, iters=iters,
                                                              coldness=1.0)
    assert len(completions) == k
    assert probs.shape == (k, iters + 1)
    beams, expected = _beam_search(model, enc(tokenizer, prompt, True), k, iters, 1.0)
    assert completions == tokenizer.batch_decode(beams)
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    lengths = [len(enc(tokenizer, c, False)) for c in completions]
    assert any(n != iters + 1 for n in lengths), (completions, lengths)  # " hel"+"lo" -> " hello"
    _, logp = so.sample_most_likely_completions_hf(model, tokenizer, prompt, k=k, iters=iters, coldness=1.0,
                                                   return_log_probs=True, return_token_probs=False)
    np.testing.assert_allclose(logp, np.log(expected).sum(-1), rtol=1e-5)
