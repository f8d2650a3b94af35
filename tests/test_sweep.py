"""steering_opt.sweep: train/validation split, sweeps (optimised, contrastive, custom), the criterion,
time budget, plots, residual norms and auto_steer — on tiny models."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from steering_opt import SteeringVector, TrainingDatapoint
from steering_opt.evaluate import Evaluator
from steering_opt.plots import plot_success_vs_strength, plot_sweep_heatmap
from steering_opt.scorers import distinct_n
from steering_opt.sweep import (
    GENERIC_CHAT_PROMPTS,
    GENERIC_PROMPTS,
    SweepResult,
    auto_steer,
    looks_like_chat,
    residual_norms,
    split_train_validation,
    sweep,
)

D = 64
FAST = {"max_iters": 2, "lr": 0.1}
DP = TrainingDatapoint("The weather today is", src_completions=[" sunny and warm"], dst_completions=[" cold and wet"])
VAL = ["Tomorrow it will be", "In the morning the sky"]
NEUTRAL = ["A neutral sentence"]


def _state(model: torch.nn.Module) -> tuple:
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return (hooks, model.training, tuple(p.requires_grad for p in model.parameters()))


def test_split_train_validation() -> None:
    items = list(range(10))
    tr, va = split_train_validation(items, 0.3, seed=1)
    assert len(va) == 3 and len(tr) == 7 and sorted(tr + va) == items
    assert split_train_validation(items, 0.3, seed=1) == (tr, va)
    assert split_train_validation(items, 0.3, seed=2) != (tr, va)
    assert [len(x) for x in split_train_validation([1, 2], 0.01)] == [1, 1]
    with pytest.raises(ValueError, match="`val_fraction`"):
        split_train_validation(items, 1.5)
    with pytest.raises(ValueError, match="at least 2"):
        split_train_validation([1], 0.5)
    for bad, exc in (("1", TypeError), (None, TypeError), (-1, ValueError), (2**63, ValueError)):
        with pytest.raises(exc, match="`seed`"):
            split_train_validation(items, 0.3, seed=bad)


@pytest.mark.parametrize("bad", ["0", None, 2**63])
def test_sweeps_refuse_bad_seeds_before_any_work(tiny_llama, tokenizer, bad) -> None:
    before = _state(tiny_llama)
    with pytest.raises((TypeError, ValueError), match="`seed`"):
        auto_steer(tiny_llama, tokenizer, [DP], layers=[1], validation_prompts=VAL, optimize_kwargs=FAST, seed=bad)
    with pytest.raises((TypeError, ValueError), match="`seed`"):
        sweep(tiny_llama, tokenizer, [DP], layers=[1], validation_prompts=VAL, optimize_kwargs=FAST, seed=bad)
    assert _state(tiny_llama) == before


def test_looks_like_chat(tokenizer) -> None:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert looks_like_chat(tokenizer, chat)
    assert not looks_like_chat(tokenizer, "The weather today is")
    assert len(GENERIC_PROMPTS) >= 8 and len(GENERIC_CHAT_PROMPTS) >= 8


def test_sweep_optimize_table_best_and_vectors(tiny_llama, tokenizer) -> None:
    before = _state(tiny_llama)
    res = sweep(tiny_llama, tokenizer, [DP], layers=[1, 2], multipliers=[0.0, 1.0, 2.0], validation_prompts=VAL,
                neutral_prompts=NEUTRAL, optimize_kwargs=FAST)
    assert _state(tiny_llama) == before
    assert isinstance(res, SweepResult) and res.criterion == "margin"
    assert len(res.table) == 6 and set(res.vectors) == {(1, "additive"), (2, "additive")}
    for row in res.table:
        for key in ("layer", "variant", "multiplier", "norm", "train_loss", "build_s", "kl", "margin_gain",
                    "margin_gain_per_token", "criterion"):
            assert key in row
        assert row["criterion"] == pytest.approx(row["margin_gain_per_token"] - row["kl"])
        if row["multiplier"] == 0.0:  # no steering: nothing changes
            assert row["kl"] == pytest.approx(0.0, abs=1e-6)
            assert row["margin_gain"] == pytest.approx(0.0, abs=1e-4)
    assert res.best is max(res.table, key=lambda r: (r["criterion"], -r["kl"], -abs(r["multiplier"])))
    # the table's numbers are reproducible by evaluating the returned vector directly
    best_vec = res.best_steering()
    ev = Evaluator(tiny_llama, tokenizer, VAL, promote=DP.dst_completions, suppress=DP.src_completions,
                   neutral_prompts=NEUTRAL, generate=False)
    direct = ev.evaluate(best_vec)
    assert direct.summary["margin_gain"] == pytest.approx(res.best["margin_gain"], abs=1e-4)
    assert direct.summary["kl"] == pytest.approx(res.best["kl"], rel=1e-4, abs=1e-7)
    vec = res.vectors[(res.best["layer"], "additive")]
    assert torch.allclose(best_vec.layer_activations[res.best["layer"]],
                          vec.layer_activations[res.best["layer"]] * res.best["multiplier"])
    assert best_vec.metadata["sweep_choice"]["layer"] == res.best["layer"]
    md = res.to_markdown()
    assert md.count("\n") == len(res.table) + 1 and "| layer |" in md


def test_sweep_norm_caps_and_clamps(tiny_llama, tokenizer) -> None:
    res = sweep(tiny_llama, tokenizer, [DP], layers=[1], multipliers=[1.0], max_norms=[None, 0.5], clamps=[2.0],
                validation_prompts=VAL, neutral_prompts=NEUTRAL, optimize_kwargs={"max_iters": 3, "lr": 1.0})
    by = {r["variant"]: r for r in res.table}
    assert set(by) == {"additive", "max_norm=0.5", "clamp=2"}
    assert by["max_norm=0.5"]["norm"] <= 0.5 + 1e-5 < by["additive"]["norm"]
    assert res.vectors[(1, "clamp=2")].clamp == 2.0 and res.vectors[(1, "additive")].clamp is None


def test_sweep_with_scorer_generates_and_ranks_by_fluent_success(tiny_llama, tokenizer) -> None:
    def scorer(completion: str, prompt: str) -> float:
        return 1.0

    res = sweep(tiny_llama, tokenizer, [DP], layers=[1], multipliers=[0.5, 1.0], validation_prompts=VAL,
                neutral_prompts=NEUTRAL, scorer=scorer, optimize_kwargs=FAST, max_new_tokens=4)
    assert res.criterion == "fluent_success"
    for row in res.table:
        assert row["criterion"] == row["fluent_success_rate"]
        assert row["success_rate"] == 1.0
    assert res.baseline["success_rate"] == 1.0
    # ties on the criterion go to the lower KL
    top = [r for r in res.table if r["criterion"] == res.best["criterion"]]
    assert res.best["kl"] == min(r["kl"] for r in top)


def test_sweep_custom_method_and_criterion(tiny_llama, tokenizer) -> None:
    g = torch.Generator().manual_seed(0)
    made: list[tuple[int, dict]] = []

    def method(model, tok, train, layer, **opts):
        made.append((layer, opts))
        return SteeringVector({layer: torch.randn(D, generator=g)})

    res = sweep(tiny_llama, tokenizer, [DP], layers=[0, 3], multipliers=[1.0, 3.0], method=method,
                validation_prompts=VAL, neutral_prompts=NEUTRAL, criterion=lambda r: -r["kl"])
    assert [m[0] for m in made] == [0, 3]
    assert all(r["margin_gain"] is not None for r in res.table)  # promote/suppress from the datapoint
    assert res.best["kl"] == min(r["kl"] for r in res.table)
    assert res.criterion == "custom"


def test_sweep_splits_several_datapoints_into_train_and_validation(tiny_llama, tokenizer) -> None:
    dps = [TrainingDatapoint(f"Sentence number {i} is", src_completions=[" short"], dst_completions=[" long"])
           for i in range(4)]
    res = sweep(tiny_llama, tokenizer, dps, layers=[1], multipliers=[1.0], val_fraction=0.5, neutral_prompts=None,
                optimize_kwargs=FAST)
    assert len(res.validation_prompts) == 2
    assert set(res.validation_prompts) <= {dp.prompt for dp in dps}
    res1 = sweep(tiny_llama, tokenizer, [DP], layers=[1], multipliers=[1.0], neutral_prompts=None,
                 optimize_kwargs=FAST)
    assert res1.validation_prompts == list(GENERIC_PROMPTS) and not res1.chat
    chat_dp = TrainingDatapoint(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                              add_generation_prompt=True), dst_completions=["No."])
    for method in ("optimize", lambda model, tok, train, layer: SteeringVector({layer: torch.ones(D)})):
        res2 = sweep(tiny_llama, tokenizer, [chat_dp], layers=[1], multipliers=[1.0], neutral_prompts=None,
                     method=method, optimize_kwargs=FAST)
        assert res2.chat and res2.validation_prompts == list(GENERIC_CHAT_PROMPTS)


def test_sweep_time_budget_stops_early(tiny_llama, tokenizer) -> None:
    res = sweep(tiny_llama, tokenizer, [DP], layers=[0, 1, 2, 3], multipliers=[1.0], validation_prompts=VAL,
                neutral_prompts=NEUTRAL, optimize_kwargs=FAST, time_budget_s=1e-3)
    assert {r["layer"] for r in res.table} == {0}
    assert any("time budget" in n for n in res.notes)


def test_sweep_errors_before_work(tiny_llama, tokenizer) -> None:
    with pytest.raises(ValueError, match="`train`"):
        sweep(tiny_llama, tokenizer, [], layers=[1])
    with pytest.raises(TypeError, match=r"`train\[0\]`"):
        sweep(tiny_llama, tokenizer, ["text"], layers=[1])
    with pytest.raises(ValueError, match="`method`"):
        sweep(tiny_llama, tokenizer, [DP], layers=[1], method="magic")
    with pytest.raises(ValueError, match="duplicates"):
        sweep(tiny_llama, tokenizer, [DP], layers=[1, 1])
    with pytest.raises(ValueError, match="layers"):
        sweep(tiny_llama, tokenizer, [DP], layers=[99])
    with pytest.raises(ValueError, match="`multipliers`"):
        sweep(tiny_llama, tokenizer, [DP], layers=[1], multipliers=[])
    with pytest.raises(ValueError, match="`max_norms`"):
        sweep(tiny_llama, tokenizer, [DP], layers=[1], max_norms=[-1.0])
    with pytest.raises(ValueError, match="needs a `scorer`"):
        sweep(tiny_llama, tokenizer, [DP], layers=[1], criterion="fluent_success")
    with pytest.raises(ValueError, match="`time_budget_s`"):
        sweep(tiny_llama, tokenizer, [DP], layers=[1], time_budget_s=0)
    with pytest.raises(ValueError, match="`criterion`"):
        sweep(tiny_llama, tokenizer, [DP], layers=[1], criterion="best")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plots_return_figures_and_save_png(tiny_llama, tokenizer, tmp_path) -> None:
    res = sweep(tiny_llama, tokenizer, [DP], layers=[1, 2], multipliers=[0.5, 1.0], validation_prompts=VAL,
                neutral_prompts=NEUTRAL, optimize_kwargs=FAST)
    for fn, name in ((plot_sweep_heatmap, "heat.png"), (plot_success_vs_strength, "strength.png")):
        fig = fn(res, save_path=tmp_path / name)
        assert hasattr(fig, "savefig")
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = res.plot_heatmap("kl")
    assert fig.axes[0].get_title().startswith("kl")
    assert res.plot_strength("margin_gain").axes[0].get_ylabel() == "margin_gain"
    with pytest.raises(ValueError, match="unknown metric"):
        res.plot_heatmap("nope")
    with pytest.raises(TypeError, match="SweepResult"):
        plot_sweep_heatmap({"table": []})


def test_residual_norms_match_hidden_states(tiny_llama, tokenizer) -> None:
    got = residual_norms(tiny_llama, tokenizer, VAL, [1, -1])
    n = tiny_llama.config.num_hidden_layers
    assert set(got) == {1, n - 1}
    norms = []
    for p in VAL:
        with torch.no_grad():
            hs = tiny_llama(**tokenizer(p, return_tensors="pt"), output_hidden_states=True).hidden_states
        norms.append(hs[1][0, 1:].norm(dim=-1))
    assert got[1] == pytest.approx(float(torch.cat(norms).median()), rel=1e-5)


def test_auto_steer_returns_scaled_vector_and_table(tiny_llama, tokenizer) -> None:
    before = _state(tiny_llama)
    vec, report = auto_steer(tiny_llama, tokenizer, [DP], validation_prompts=VAL, layers=[1, 2],
                             multipliers=[0.5, 1.0], norm_fractions=[None, 0.5], neutral_prompts=NEUTRAL,
                             optimize_kwargs=FAST, strength_finalists=2, kl_budget=None, repetition_check=None)
    assert _state(tiny_llama) == before
    assert isinstance(vec, SteeringVector) and vec.metadata["method"] == "auto_steer"
    # every (layer, cap) at strength 1, the two best of those (strength_finalists=2) also at 0.5
    assert report.criterion == "margin"
    at_one = sorted((r for r in report.table if r["multiplier"] == 1.0), key=lambda r: r["criterion"], reverse=True)
    assert len(at_one) == 4
    assert sorted((r["layer"], r["variant"]) for r in report.table if r["multiplier"] == 0.5) == \
        sorted((r["layer"], r["variant"]) for r in at_one[:2])
    _, full = auto_steer(tiny_llama, tokenizer, [DP], validation_prompts=VAL, layers=[1, 2], multipliers=[0.5, 1.0],
                         norm_fractions=[None, 0.5], neutral_prompts=NEUTRAL, optimize_kwargs=FAST,
                         strength_finalists=None, repetition_check=None)
    assert len(full.table) == 2 * 2 * 2
    b = report.best
    assert b is max(report.table, key=lambda r: (r["criterion"], -r["kl"], -abs(r["multiplier"])))
    raw = report.vectors[(b["layer"], b["variant"])]
    assert torch.allclose(vec.layer_activations[b["layer"]], raw.layer_activations[b["layer"]] * b["multiplier"])
    capped = [r for r in report.table if r["norm_fraction"] == 0.5]
    norms = residual_norms(tiny_llama, tokenizer, VAL[:4], [1, 2])
    for r in capped:
        assert r["norm"] <= 0.5 * norms[r["layer"]] + 1e-4


def test_auto_steer_kl_budget_ranks_rows_over_it_last(tiny_llama, tokenizer) -> None:
    kw = dict(validation_prompts=VAL, layers=[1, 2], multipliers=[0.5, 1.0, 2.0], neutral_prompts=NEUTRAL,
              optimize_kwargs=FAST, strength_finalists=None, repetition_check=None)
    _, free = auto_steer(tiny_llama, tokenizer, [DP], **kw)
    kls = sorted(r["kl"] for r in free.table)
    _, none_fit = auto_steer(tiny_llama, tokenizer, [DP], kl_budget=kls[0] / 2, **kw)
    assert none_fit.best["kl"] == pytest.approx(kls[0])  # nothing within: the smallest KL
    assert all(r["criterion"] == -math.inf for r in none_fit.table)
    mid = kls[len(kls) // 2]
    _, some = auto_steer(tiny_llama, tokenizer, [DP], kl_budget=mid, **kw)
    within = [r for r in free.table if r["kl"] <= mid]
    assert some.best["kl"] <= mid
    assert (some.best["layer"], some.best["multiplier"]) == max(
        ((r["layer"], r["multiplier"]) for r in within), key=lambda k: next(
            r["criterion"] for r in free.table if (r["layer"], r["multiplier"]) == k))
    fig = none_fit.plot_heatmap()  # cells over the budget are left blank, the figure still draws
    assert fig.axes and fig.axes[0].images
    with pytest.raises(ValueError, match="kl_budget"):
        auto_steer(tiny_llama, tokenizer, [DP], kl_budget=0, **kw)


def test_auto_steer_does_not_measure_strengths_above_one_over_the_budget(tiny_llama, tokenizer) -> None:
    kw = dict(validation_prompts=VAL, layers=[1, 2], multipliers=[0.5, 1.0, 1.5, 2.0], neutral_prompts=NEUTRAL,
              optimize_kwargs=FAST, repetition_check=None)
    _, free = auto_steer(tiny_llama, tokenizer, [DP], kl_budget=None, strength_finalists=None, **kw)
    kl = {(r["layer"], r["multiplier"]): r["kl"] for r in free.table}
    best_layer = max((r for r in free.table if r["multiplier"] == 1.0), key=lambda r: r["criterion"])["layer"]
    budget = (kl[(best_layer, 1.0)] + kl[(best_layer, 1.5)]) / 2  # x1 within, x1.5 over: x2 is skipped
    _, rep = auto_steer(tiny_llama, tokenizer, [DP], kl_budget=budget, kl_weight=1.0, **kw)
    measured = {(r["layer"], r["multiplier"]) for r in rep.table}
    top = max((r for r in rep.table if r["multiplier"] == 1.0), key=lambda r: r["criterion"])["layer"]
    others = [m for layer, m in measured if layer == top and m != 1.0]
    assert top == best_layer and kl[(top, 1.0)] <= budget < kl[(top, 1.5)]
    assert sorted(others) == [0.5, 1.5] and any("x2 not measured" in n for n in rep.notes)
    assert {layer for layer, m in measured if m != 1.0} == {top}  # strength_finalists=1: one layer
    assert len(measured) == len(rep.table)


def test_auto_steer_ranking_by_margin_within_the_budget_skips_weaker_strengths(tiny_llama, tokenizer) -> None:
    """kl_weight=0, no scorer: x0.5 cannot beat a positive-margin x1 within the budget, so it is not measured;
    with a KL penalty (or x1 over the budget) it is."""
    kw = dict(validation_prompts=VAL, layers=[1, 2], multipliers=[0.5, 1.0, 2.0], neutral_prompts=NEUTRAL,
              optimize_kwargs=FAST, repetition_check=None)
    _, rep = auto_steer(tiny_llama, tokenizer, [DP], kl_budget=1e6, **kw)
    top = max((r for r in rep.table if r["multiplier"] == 1.0), key=lambda r: r["criterion"])
    assert top["margin_gain"] > 0 and top["kl"] <= 1e6
    assert sorted(r["multiplier"] for r in rep.table if r["layer"] == top["layer"]) == [1.0, 2.0]
    assert any(f"layer {top['layer']}, additive: x0.5 not measured (x1 is within kl_budget;" in n for n in rep.notes)
    _, penalised = auto_steer(tiny_llama, tokenizer, [DP], kl_budget=1e6, kl_weight=0.5, **kw)
    assert 0.5 in {r["multiplier"] for r in penalised.table} and not any("x0.5" in n for n in penalised.notes)
    _, over = auto_steer(tiny_llama, tokenizer, [DP], kl_budget=top["kl"] / 2, **kw)
    assert 0.5 in {r["multiplier"] for r in over.table}


def test_auto_steer_calibrates_the_chosen_strength_down_to_calibrate_kl(tiny_llama, tokenizer) -> None:
    kw = dict(validation_prompts=VAL, layers=[1, 2], multipliers=[1.0], neutral_prompts=NEUTRAL,
              optimize_kwargs=FAST, kl_budget=None, repetition_check=None)
    before = _state(tiny_llama)
    _, kept = auto_steer(tiny_llama, tokenizer, [DP], calibrate_kl=None, **kw)
    chosen = kept.best
    assert chosen["stage"] != "calibrate" and not any("calibrate_kl" in n for n in kept.notes)
    target = chosen["kl"] / 3
    vec, rep = auto_steer(tiny_llama, tokenizer, [DP], calibrate_kl=target, **kw)
    assert _state(tiny_llama) == before
    b = rep.best
    assert b["stage"] == "calibrate" and b is rep.table[-1]
    assert (b["layer"], b["variant"]) == (chosen["layer"], chosen["variant"]) and 0 < b["multiplier"] < 1
    assert b["kl"] == pytest.approx(target, rel=0.05)  # the evaluator's KL, on the same neutral prompts
    assert any(n.startswith("calibrate_kl: x1 (KL") and "lowered to" in n for n in rep.notes)
    raw = rep.vectors[(b["layer"], b["variant"])]
    assert torch.allclose(vec.layer_activations[b["layer"]], raw.layer_activations[b["layer"]] * b["multiplier"])
    # a choice already within calibrate_kl is kept as it is
    _, within = auto_steer(tiny_llama, tokenizer, [DP], calibrate_kl=chosen["kl"] * 2, **kw)
    assert within.best["multiplier"] == 1.0 and within.best["stage"] != "calibrate"
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises((ValueError, TypeError), match="calibrate_kl"):
            auto_steer(tiny_llama, tokenizer, [DP], calibrate_kl=bad, **kw)


def test_auto_steer_repetition_check_steps_the_strength_down(tiny_llama, tokenizer) -> None:
    """Without a scorer the choice generates on the first validation prompts; while over a quarter of them repeat
    themselves it is measured at x0.75, then x0.5 of its strength (tiny random models loop, so it steps down)."""
    kw = dict(validation_prompts=VAL, layers=[1, 2], multipliers=[1.0, 2.0], neutral_prompts=NEUTRAL,
              optimize_kwargs=FAST, kl_budget=None)
    before = _state(tiny_llama)
    _, plain = auto_steer(tiny_llama, tokenizer, [DP], repetition_check=None, **kw)
    vec, rep = auto_steer(tiny_llama, tokenizer, [DP], repetition_check=2, **kw)
    assert _state(tiny_llama) == before
    first, key = plain.best, (plain.best["layer"], plain.best["variant"])
    checked = [r for r in rep.table if "non_repetitive_rate" in r]
    assert [r["multiplier"] for r in checked] == [first["multiplier"] * f for f in (1.0, 0.75, 0.5)][:len(checked)]
    assert all((r["layer"], r["variant"]) == key for r in checked)
    assert all(r["stage"] == "repetition check" for r in checked[1:])
    # each rate is the share of continuations with distinct-2 >= 0.75 on the first two validation prompts
    gen = Evaluator(tiny_llama, tokenizer, VAL[:2], neutral_prompts=None, max_new_tokens=32, fluency_lang=None)
    for r in checked:
        texts = [x["steered"] for x in gen.evaluate(rep.vectors[key], r["multiplier"]).records]
        assert r["non_repetitive_rate"] == sum(distinct_n(x, 2) >= 0.75 for x in texts) / 2
    passing = [r for r in checked if r["non_repetitive_rate"] >= 0.75]
    assert rep.best is (passing[0] if passing else max(checked, key=lambda r: r["non_repetitive_rate"]))
    assert len(passing) <= 1 and (not passing or passing[0] is checked[-1])  # it stops at the first that passes
    assert (rep.best is checked[0]) == (not any(n.startswith("repetition check:") for n in rep.notes))
    raw = rep.vectors[key]
    assert torch.allclose(vec.layer_activations[key[0]], raw.layer_activations[key[0]] * rep.best["multiplier"])
    for bad in (-1, 1.5, "3"):
        with pytest.raises((ValueError, TypeError), match="repetition_check"):
            auto_steer(tiny_llama, tokenizer, [DP], repetition_check=bad, **kw)


def test_auto_steer_with_scorer_and_budget(tiny_llama, tokenizer) -> None:
    def scorer(completion: str, prompt: str) -> float:
        return float("e" in completion)

    vec, report = auto_steer(tiny_llama, tokenizer, DP, validation_prompts=VAL, scorer=scorer, layers=[1, 2],
                             multipliers=[1.0], neutral_prompts=NEUTRAL, optimize_kwargs=FAST)
    assert report.criterion == "fluent_success"
    judged = [r for r in report.table if r.get("fluent_success_rate") is not None]
    assert judged and report.best in judged
    assert report.best["fluent_success_rate"] == max(r["fluent_success_rate"] for r in judged)
    _, short = auto_steer(tiny_llama, tokenizer, [DP], validation_prompts=VAL, layers=[0, 1, 2, 3],
                          multipliers=[1.0], neutral_prompts=NEUTRAL, optimize_kwargs=FAST, time_budget_s=1e-3)
    assert {r["layer"] for r in short.table} == {0} and short.notes
    with pytest.raises(ValueError, match="`datapoints`"):
        auto_steer(tiny_llama, tokenizer, [])
    with pytest.raises(TypeError, match=r"`datapoints\[0\]`"):
        auto_steer(tiny_llama, tokenizer, ["x"])
    with pytest.raises(ValueError, match="`time_budget_s`"):
        auto_steer(tiny_llama, tokenizer, [DP], time_budget_s=-1)


def test_auto_steer_screens_then_finishes_and_counts_configurations(tiny_llama, tokenizer, monkeypatch) -> None:
    import contextlib

    from steering_opt import sweep as sweep_module

    bars = []
    real = sweep_module.overall

    @contextlib.contextmanager
    def spy(*args, **kwargs):
        with real(*args, **kwargs) as bar:
            bars.append(bar)
            yield bar

    monkeypatch.setattr(sweep_module, "overall", spy)
    _, report = auto_steer(tiny_llama, tokenizer, [DP], validation_prompts=VAL, layers=[0, 1, 2],
                           multipliers=[0.5, 1.0], neutral_prompts=NEUTRAL, screen_steps=2, finalists=1,
                           optimize_kwargs={"lr": 0.1, "max_iters": 5, "plateau_patience": None}, progress=False,
                           repetition_check=None)
    (bar,) = bars
    assert bar.n == bar.total == 3 + 1  # three screened configurations, one finished
    stages = {(r["layer"], r["stage"], r["steps"]) for r in report.table}
    assert len(report.table) == 2 + 2 and sum(s == "finish" for _, s, _ in stages) == 1  # screened at x1 only
    assert {steps for _, s, steps in stages if s == "screen"} == {2}
    assert [steps for _, s, steps in stages if s == "finish"] == [5]
    assert report.best is max(report.table, key=lambda r: (r["criterion"], -r["kl"], -abs(r["multiplier"])))


@pytest.mark.skipif(importlib.util.find_spec("steering_opt.contrastive") is None, reason="contrastive.py not landed")
def test_sweep_contrastive(tiny_llama, tokenizer) -> None:
    from steering_opt.contrastive import ContrastPair

    pairs = [ContrastPair("The weather is cold and wet", "The weather is sunny and warm"),
             ContrastPair("It rained all day", "It was bright all day")]
    res = sweep(tiny_llama, tokenizer, pairs, method="contrastive", layers=[1, 2], multipliers=[1.0],
                max_norms=[None, 1.0], validation_prompts=VAL, neutral_prompts=NEUTRAL, promote=[" cold"],
                suppress=[" warm"])
    assert len(res.table) == 4
    capped = [r for r in res.table if r["variant"] == "max_norm=1"]
    assert all(r["norm"] <= 1.0 + 1e-5 for r in capped)
    assert all(not math.isnan(r["kl"]) for r in res.table)
