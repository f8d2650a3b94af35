"""steering_opt.evaluate and steering_opt.scorers: every metric against hand-computed values on tiny
models and fixed strings, batching/padding invariance, steering forms, state restoration, errors."""

from __future__ import annotations

import math

import pytest
import torch

from steering_opt import SteeringVector, get_completion_logprob, hf_hooks_contextmanager, make_steering_hook_hf
from steering_opt.arch import get_blocks
from steering_opt.evaluate import (
    Evaluator,
    completion_logprobs,
    evaluate,
    format_prompt,
    generate,
    kl_divergence,
    perplexity,
    steering_context,
)
from steering_opt.scorers import (
    KeywordScorer,
    LanguageScorer,
    RefusalScorer,
    SentimentScorer,
    distinct_n,
    get_scorer,
    real_word_fraction,
    repetition_rate,
    words,
)

PROMPTS = ["The cat sat on", "A short and simple prompt about the weather in the mountains", "Hello"]
D = 64


def _vec(seed: int, scale: float = 4.0, layer: int = 1) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({layer: torch.randn(D, generator=g) * scale})


def _state(model: torch.nn.Module) -> tuple:
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return (hooks, model.training, tuple(p.requires_grad for p in model.parameters()))


# ------------------------------------------------------------------------------------ text metrics


def test_words_and_distinct_n_hand_values() -> None:
    assert words("I'm fine, 2 cups! Don’t") == ["i'm", "fine", "2", "cups", "don't"]
    assert distinct_n("the cat the cat", 2) == pytest.approx(2 / 3)  # (the,cat) (cat,the) (the,cat)
    assert distinct_n("the cat the cat", 1) == pytest.approx(2 / 4)
    assert distinct_n("one two three four", 2) == 1.0
    assert distinct_n("alone", 2) == 0.0  # too short to judge
    assert distinct_n("", 2) == 0.0
    with pytest.raises(ValueError, match="`n`"):
        distinct_n("a b", 0)
    with pytest.raises(TypeError, match="`text`"):
        distinct_n(None)  # type: ignore[arg-type]


def test_repetition_rate_hand_values() -> None:
    # 4-grams of "a b c d a b c d": abcd bcda cdab dabc abcd -> 5 grams, 4 unique -> 1/5 repeated
    assert repetition_rate("a b c d a b c d") == pytest.approx(0.2)
    assert repetition_rate("a b c d e f") == 0.0
    assert repetition_rate("a b") == 0.0
    assert repetition_rate("x x x x x x", n=1) == pytest.approx(5 / 6)


def test_real_word_fraction_fixed_strings() -> None:
    pytest.importorskip("wordfreq")
    assert real_word_fraction("the cat xqzvw", "en") == pytest.approx(2 / 3)
    assert real_word_fraction("I'm sorry, but I can't help with that request.", "en") == 1.0
    assert real_word_fraction("una taza de harina", "es") == 1.0
    assert real_word_fraction("", "en") == 0.0
    assert real_word_fraction("...!!", "en") == 0.0


# ----------------------------------------------------------------------------------------- scorers


def test_language_scorer_fixed_strings() -> None:
    pytest.importorskip("py3langid")
    s = LanguageScorer("es")
    assert s("Me gusta mucho la playa y el mar.") == 1.0
    assert s("¿Dónde está la biblioteca de la ciudad?") == 1.0
    assert s("I like the beach and the sea very much.") == 0.0
    assert s("") == 0.0 and s("  a ") == 0.0  # too short
    assert s.label("Where is the library?") == "en"
    assert LanguageScorer("en", candidates=["en", "es"])("The weather is nice today.") == 1.0
    with pytest.raises(ValueError, match="candidates"):
        LanguageScorer("es", candidates=["en", "fr"])
    with pytest.raises(TypeError, match="`completion`"):
        s(3)  # type: ignore[arg-type]


def test_sentiment_scorer_fixed_strings() -> None:
    pytest.importorskip("vaderSentiment")
    neg, pos = SentimentScorer("negative"), SentimentScorer("positive")
    bad = "It was terrible, I hated every minute of it."
    good = "It was wonderful, I loved every minute of it."
    neutral = "The table is made of wood."
    assert neg(bad) == 1.0 and neg(good) == 0.0 and neg(neutral) == 0.0
    assert pos(good) == 1.0 and pos(bad) == 0.0 and pos(neutral) == 0.0
    assert neg.compound(bad) < -0.05 < 0.05 < pos.compound(good)
    with pytest.raises(ValueError, match="`target`"):
        SentimentScorer("angry")


def test_keyword_scorer_word_boundaries_regex_and_counts() -> None:
    s = KeywordScorer(["wedding", "bride"])
    assert s("The Wedding was lovely.") == 1.0
    assert s("Weddings are fun") == 0.0  # word boundary: 'wedding' is not 'weddings'
    assert KeywordScorer(["wed"])("the wedding") == 0.0
    assert KeywordScorer([r"wedd?ings?"], regex=True)("Weddings are fun") == 1.0
    assert KeywordScorer(["Bride"], case_sensitive=True)("the bride") == 0.0
    two = KeywordScorer(["wedding", "bride", "groom"], min_matches=2)
    assert two("the bride smiled") == 0.0 and two("the bride and groom") == 1.0
    assert two.matches("bride, groom, bride") == ["bride", "groom"]
    with pytest.raises(ValueError, match="`keywords`"):
        KeywordScorer("wedding")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`min_matches`"):
        KeywordScorer(["a"], min_matches=2)


def test_refusal_scorer_fixed_strings() -> None:
    s = RefusalScorer()
    assert s("I'm sorry, but I can't help with that request.") == 1.0
    assert s("I’m sorry, I cannot do that.") == 1.0  # curly apostrophe
    assert s("Sure! Here is a recipe for pancakes.") == 0.0
    late = "Sure, here is a long answer about the moon and the tides and the stars. " * 2 + "I can't say more."
    assert s(late) == 0.0 and RefusalScorer(within_chars=None)(late) == 1.0


def test_get_scorer_specs() -> None:
    assert isinstance(get_scorer("refusal"), RefusalScorer)
    assert get_scorer("language:es").lang == "es" and get_scorer("spanish").lang == "es"
    assert get_scorer("sentiment:negative").target == "negative" and get_scorer("positive").target == "positive"
    assert get_scorer("keywords:wedding, bride").keywords == ["wedding", "bride"]
    assert get_scorer("regex:wedd?ing")("a weding") == 1.0
    fn = lambda c, p: 1.0  # noqa: E731
    assert get_scorer(fn) is fn
    with pytest.raises(ValueError, match="unknown scorer spec"):
        get_scorer("funny")
    with pytest.raises(TypeError, match="`scorer`"):
        get_scorer(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- model metrics


def test_kl_identical_is_zero_and_matches_hand_computation(tiny_llama, tokenizer) -> None:
    assert kl_divergence(tiny_llama, tokenizer, PROMPTS, None) == 0.0
    zero = SteeringVector({1: torch.zeros(D)})
    assert kl_divergence(tiny_llama, tokenizer, PROMPTS, zero) == pytest.approx(0.0, abs=1e-7)
    vec = _vec(0)
    got = kl_divergence(tiny_llama, tokenizer, PROMPTS, vec, multiplier=2.0)
    # by hand: every position of every prompt, one prompt at a time, no padding
    kls = []
    for p in PROMPTS:
        ids = tokenizer(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lu = torch.log_softmax(tiny_llama(ids).logits[0].float(), -1)
            with vec.apply(tiny_llama, multiplier=2.0):
                ls = torch.log_softmax(tiny_llama(ids).logits[0].float(), -1)
        kls.append((lu.exp() * (lu - ls)).sum(-1))
    assert got > 1e-4
    assert got == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)
    last = kl_divergence(tiny_llama, tokenizer, PROMPTS, vec, multiplier=2.0, positions="last")
    assert last == pytest.approx(float(torch.stack([k[-1] for k in kls]).mean()), rel=1e-4)


def test_perplexity_is_exp_of_mean_nll(tiny_llama, tokenizer) -> None:
    comps = [" on the mat today", " and the sun was shining", "!"]
    got = perplexity(tiny_llama, tokenizer, PROMPTS, comps, batch_size=2)
    for p, c, g in zip(PROMPTS, comps, got):
        p_ids = tokenizer(p)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = tiny_llama(torch.tensor([p_ids + c_ids])).logits[0].float()
        lp = torch.log_softmax(logits[len(p_ids) - 1:-1], -1).gather(-1, torch.tensor(c_ids)[:, None])[:, 0]
        assert g == pytest.approx(math.exp(-float(lp.mean())), rel=1e-4)
    assert math.isnan(perplexity(tiny_llama, tokenizer, ["Hi"], [""])[0])
    with pytest.raises(ValueError, match="`completions`"):
        perplexity(tiny_llama, tokenizer, PROMPTS, comps[:2])


def test_completion_logprobs_match_reference_and_batching(tiny_llama, tokenizer) -> None:
    comps = [" yes", " no thank you very much"]
    vec = _vec(1)
    for steering in (None, vec):
        got = completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, steering, batch_size=16)
        one = completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, steering, batch_size=1)
        assert got.shape == (3, 2)
        assert torch.allclose(got, one, atol=1e-4)
        for i, p in enumerate(PROMPTS):
            for j, c in enumerate(comps):
                with steering_context(tiny_llama, steering):
                    ref = get_completion_logprob(tiny_llama, p, c, tokenizer)
                assert float(got[i, j]) == pytest.approx(float(ref), abs=1e-4)
    per_tok = completion_logprobs(tiny_llama, tokenizer, PROMPTS[:1], comps, per_token=True)
    n_tok = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in comps]
    summed = completion_logprobs(tiny_llama, tokenizer, PROMPTS[:1], comps)
    assert torch.allclose(per_tok[0] * torch.tensor(n_tok, dtype=torch.float32), summed[0], atol=1e-4)


def test_steering_forms_are_equivalent(tiny_llama, tokenizer) -> None:
    a, b = _vec(2), _vec(3)
    comps = [" the end"]
    ref = completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, SteeringVector({1: a.layer_activations[1]
                                                                                     + 0.5 * b.layer_activations[1]}))
    both = completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, [a, (b, 0.5)])
    as_dict = completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, {1: a.layer_activations[1]})
    hook = make_steering_hook_hf(a.layer_activations[1])
    hooks = completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, [(1, hook)])
    single = completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, a)
    scaled = completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, (a, 2.0))
    doubled = completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, a, multiplier=2.0)
    assert torch.allclose(both, ref, atol=1e-4)
    assert torch.allclose(as_dict, single, atol=1e-5) and torch.allclose(hooks, single, atol=1e-5)
    assert torch.allclose(scaled, doubled, atol=1e-5)
    clamp = SteeringVector({1: a.layer_activations[1]}, clamp=1.0)
    assert not torch.equal(completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, clamp), single)
    with pytest.raises(ValueError, match="multiplier"):
        completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, [(1, make_steering_hook_hf(a.layer_activations[1]))],
                            multiplier=2.0)
    # affine steering (h + v + h Mᵀ, M = Lᵀ R) equals the tutorial hook with the dense matrix
    g = torch.Generator().manual_seed(9)
    left, right = torch.randn(2, D, generator=g) * 0.3, torch.randn(2, D, generator=g) * 0.3
    affine = SteeringVector({1: a.layer_activations[1]}, affine={1: (left, right)})
    dense = [(1, make_steering_hook_hf(a.layer_activations[1], left.T @ right))]
    assert torch.allclose(completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, affine),
                          completion_logprobs(tiny_llama, tokenizer, PROMPTS, comps, dense), atol=1e-4)


# ---------------------------------------------------------------------------------------- generate


def test_batched_greedy_generation_matches_one_by_one(tiny_llama, tokenizer) -> None:
    vec = _vec(4, scale=2.0)
    for steering in (None, vec):
        batched = generate(tiny_llama, tokenizer, PROMPTS, steering, max_new_tokens=6, batch_size=8)
        single = [generate(tiny_llama, tokenizer, [p], steering, max_new_tokens=6)[0] for p in PROMPTS]
        assert batched == single
    # and it equals a plain HF generate under the same hooks
    ids = tokenizer(PROMPTS[0], return_tensors="pt")
    with hf_hooks_contextmanager(tiny_llama, [(1, make_steering_hook_hf(vec.layer_activations[1]))]):
        out = tiny_llama.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert batched[0] == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_sampled_generation_is_seeded_and_leaves_global_rng(tiny_llama, tokenizer) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(tiny_llama, tokenizer, PROMPTS, do_sample=True, seed=7, max_new_tokens=8)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(tiny_llama, tokenizer, PROMPTS, do_sample=True, seed=7, max_new_tokens=8)
    c = generate(tiny_llama, tokenizer, PROMPTS, do_sample=True, seed=8, max_new_tokens=8)
    assert a == b and a != c


def test_chat_prompts(tiny_llama, tokenizer) -> None:
    msgs = [{"role": "user", "content": "Tell me about the moon."}]
    text = format_prompt(tokenizer, msgs)
    assert text == tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert format_prompt(tokenizer, "Tell me about the moon.", chat=True) == text
    assert format_prompt(tokenizer, "plain") == "plain"
    assert generate(tiny_llama, tokenizer, [msgs], max_new_tokens=3) == \
        generate(tiny_llama, tokenizer, ["Tell me about the moon."], chat=True, max_new_tokens=3)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        format_prompt(tokenizer, [{"text": "hi"}])


# ---------------------------------------------------------------------------------------- evaluate


def test_evaluate_records_and_summary(tiny_llama, tokenizer) -> None:
    calls: list[tuple[str, str]] = []

    def scorer(completion: str, prompt: str) -> float:
        calls.append((completion, prompt))
        return float(len(words(completion)) % 2 == 0)

    before = _state(tiny_llama)
    vec = _vec(5)
    res = evaluate(tiny_llama, tokenizer, vec, PROMPTS, scorer=scorer, promote=[" yes"], suppress=[" no"],
                   max_new_tokens=5, neutral_prompts=["Neutral text here", "Another one"], fluency_lang=None)
    assert _state(tiny_llama) == before
    assert len(res.records) == 3 and len(calls) == 6  # steered + unsteered per prompt
    r = res.records[0]
    for key in ("prompt", "steered", "unsteered", "score", "success", "unsteered_success", "distinct2",
                "repetition", "fluent", "fluent_success", "perplexity", "promote_logprob", "suppress_logprob",
                "margin", "margin_gain"):
        assert key in r
    steered = generate(tiny_llama, tokenizer, PROMPTS, vec, max_new_tokens=5)
    assert [x["steered"] for x in res.records] == steered
    assert [x["unsteered"] for x in res.records] == generate(tiny_llama, tokenizer, PROMPTS, max_new_tokens=5)
    for x in res.records:
        assert x["distinct2"] == distinct_n(x["steered"], 2)
        assert x["fluent"] == (x["distinct2"] >= 0.75)  # no real-word check (fluency_lang=None)
        assert x["fluent_success"] == (x["fluent"] and x["success"])
        assert x["margin"] == pytest.approx(x["promote_logprob"] - x["suppress_logprob"])
    lp = completion_logprobs(tiny_llama, tokenizer, PROMPTS, [" yes", " no"], vec)
    lp0 = completion_logprobs(tiny_llama, tokenizer, PROMPTS, [" yes", " no"])
    gain = ((lp[:, 0] - lp[:, 1]) - (lp0[:, 0] - lp0[:, 1])).mean()
    assert res.summary["margin_gain"] == pytest.approx(float(gain), abs=1e-4)
    assert res.summary["success_rate"] == pytest.approx(sum(x["success"] for x in res.records) / 3)
    ppl = perplexity(tiny_llama, tokenizer, PROMPTS, steered)
    for x, p in zip(res.records, ppl):
        if not math.isnan(p):
            assert x["perplexity"] == pytest.approx(p, rel=1e-3)
    assert res.summary["kl"] == pytest.approx(
        kl_divergence(tiny_llama, tokenizer, ["Neutral text here", "Another one"], vec), rel=1e-5)
    assert "success_rate" in repr(res) and "steered" in res.show(1)


def test_evaluator_caches_the_unsteered_work(tiny_llama, tokenizer) -> None:
    ev = Evaluator(tiny_llama, tokenizer, PROMPTS, promote=[" yes"], max_new_tokens=3, fluency_lang=None,
                   neutral_prompts=None)
    base = ev.baseline()
    assert ev.baseline() is base
    r0 = ev.evaluate(None)
    assert r0.summary["margin_gain"] == pytest.approx(0.0, abs=1e-6) and r0.summary["kl"] is None
    assert [x["steered"] for x in r0.records] == [x["unsteered"] for x in r0.records]
    fast = Evaluator(tiny_llama, tokenizer, PROMPTS, promote=[" yes"], generate=False).evaluate(_vec(6))
    assert "steered" not in fast.records[0] and fast.summary["kl"] > 0 and "success_rate" not in fast.summary


def test_evaluate_restores_model_on_scorer_error(tiny_llama, tokenizer) -> None:
    tiny_llama.train()
    before = _state(tiny_llama)

    def boom(completion: str, prompt: str) -> float:
        raise RuntimeError("scorer failed")

    with pytest.raises(RuntimeError, match="scorer failed"):
        evaluate(tiny_llama, tokenizer, _vec(7), PROMPTS, scorer=boom, max_new_tokens=2, fluency_lang=None)
    assert _state(tiny_llama) == before and tiny_llama.training


def test_real_word_fluency_uses_the_scorer_language(tiny_llama, tokenizer) -> None:
    pytest.importorskip("wordfreq")
    pytest.importorskip("py3langid")
    ev = Evaluator(tiny_llama, tokenizer, PROMPTS[:1], scorer="language:es", max_new_tokens=3, neutral_prompts=None)
    assert ev.fluency_lang == "es"
    r = ev.evaluate(None).records[0]
    assert r["real_words"] == pytest.approx(real_word_fraction(r["steered"], "es"))


def test_errors_name_the_argument_before_any_model_work(tiny_llama, tokenizer) -> None:
    def fail(*a: object, **k: object) -> None:
        raise AssertionError("the model ran before the arguments were checked")

    handle = tiny_llama.register_forward_pre_hook(fail)
    try:
        with pytest.raises(ValueError, match="`prompts`"):
            evaluate(tiny_llama, tokenizer, None, [])
        with pytest.raises(ValueError, match="`prompts`"):
            generate(tiny_llama, tokenizer, "just a string")
        with pytest.raises(TypeError, match="`prompts\\[1\\]`"):
            generate(tiny_llama, tokenizer, ["ok", 3])
        with pytest.raises(TypeError, match="`steering`"):
            evaluate(tiny_llama, tokenizer, "vector", PROMPTS)
        with pytest.raises(TypeError, match="`multiplier`"):
            evaluate(tiny_llama, tokenizer, None, PROMPTS, multiplier="2")
        with pytest.raises(ValueError, match="`max_new_tokens`"):
            generate(tiny_llama, tokenizer, PROMPTS, max_new_tokens=0)
        with pytest.raises(ValueError, match="`min_distinct2`"):
            evaluate(tiny_llama, tokenizer, None, PROMPTS, min_distinct2=2)
        with pytest.raises(TypeError, match="`promote`"):
            evaluate(tiny_llama, tokenizer, None, PROMPTS, promote=" yes")
        with pytest.raises(ValueError, match="`positions`"):
            kl_divergence(tiny_llama, tokenizer, PROMPTS, None, positions="first")
        with pytest.raises(ValueError, match="unknown scorer spec"):
            evaluate(tiny_llama, tokenizer, None, PROMPTS, scorer="nonsense")
        with pytest.raises(ValueError, match="hidden size"):
            evaluate(tiny_llama, tokenizer, SteeringVector({1: torch.ones(5)}), PROMPTS, generate=False)
    finally:
        handle.remove()


def test_scoring_from_the_lowest_steered_block_is_exact(tiny_model, tokenizer) -> None:
    """Evaluator runs the margin and KL passes from the lowest steered block on, on the unsteered residual stream
    stored at first use: the same numbers as the full model, for vectors, several strengths, raw hooks and a
    second vector at a higher layer; the model is left clean; layer 0 and other sites run the full model."""
    d = tiny_model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    low = SteeringVector({1: torch.randn(d, generator=g) * 4})
    high = SteeringVector({2: torch.randn(d, generator=g) * 4})
    at0 = SteeringVector({0: torch.randn(d, generator=g) * 4})
    hook = [(1, make_steering_hook_hf(torch.randn(d, generator=g) * 4))]
    cases = [(low, 1.0), (low, 2.5), ([low, high], 1.0), (hook, 1.0), (high, 0.5), (at0, 1.0), (low, -1.0)]
    got = {}
    for reuse in (False, True):
        ev = Evaluator(tiny_model, tokenizer, PROMPTS, promote=[" mat", " blue sky"], suppress=[" dog"],
                       neutral_prompts=["Once upon a time", "The weather is"], generate=False)
        ev.reuse_lower_blocks = reuse
        tiny_model.train(reuse)  # a model left in train mode (dropout) is measured in eval mode either way
        before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        got[reuse] = [ev.evaluate(s, m).summary for s, m in cases]
        assert tiny_model.training == reuse
        assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())
        assert not any(b._forward_pre_hooks or b._forward_hooks for b in get_blocks(tiny_model))
    stored = {k for k, u in ev._upper.items() if u is not None}
    assert stored <= {1, 2} and (1 in stored or not ev._upper)  # an architecture that cannot truncate: None
    for full, fast in zip(got[False], got[True]):
        for key in ("margin_gain", "promote_gain", "suppress_gain", "kl"):
            assert fast[key] == pytest.approx(full[key], rel=1e-4, abs=1e-5), key
    assert got[True][0]["margin_gain"] != pytest.approx(got[True][1]["margin_gain"])  # the strengths differ
