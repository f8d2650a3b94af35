"""Progress bars: ``progress=None`` follows whether a person is watching (stderr a terminal, or Jupyter) and the
STEERING_OPT_PROGRESS variable; forced on they draw on stderr, off they draw nothing; functions that run others
(sweep, auto_steer, optimize_many, evaluate) draw one overall bar and fold their inner runs' bars into it."""

from __future__ import annotations

import io
import re

import pytest
import torch

from steering_opt import TrainingDatapoint, progress
from steering_opt.contrastive import extract_activations
from steering_opt.evaluate import Evaluator, evaluate
from steering_opt.optimize import optimize
from steering_opt.progress import ENV_VAR, overall, progress_bar, show_progress
from steering_opt.scale import Job, optimize_many
from steering_opt.sweep import auto_steer, sweep
from steering_opt.vector import SteeringVector

DP = TrainingDatapoint("The weather today is", src_completions=[" sunny"], dst_completions=[" cold and wet"])
VAL = ["Tomorrow it will be", "In the morning the sky"]
PAIRS = [("I love it", "I hate it"), ("Thank you", "Go away"), ("Yes please", "No")]


class FakeStderr(io.StringIO):
    """A stderr that says whether it is a terminal, and keeps what was written."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch):
    """A function installing a FakeStderr (a terminal or not) as sys.stderr, outside Jupyter, with
    STEERING_OPT_PROGRESS unset. Called in the test itself: pytest re-installs its own stderr after setup."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(progress, "in_jupyter", lambda: False)

    def install(tty: bool) -> FakeStderr:
        fake = FakeStderr(tty)
        monkeypatch.setattr("sys.stderr", fake)
        return fake

    return install


def bars(text: str) -> list[str]:
    """The descriptions of the tqdm bars drawn in ``text`` (``desc: 40%|...``)."""
    return sorted({m.group(1) for m in re.finditer(r"(?:^|\r)([\w .\[\],-]+?):\s+\d+%\|", text)})


def test_default_follows_isatty(stderr) -> None:
    err = stderr(False)
    assert show_progress(None) is False
    err.tty = True
    assert show_progress(None) is True
    assert show_progress(False) is False and show_progress(True) is True


def test_default_is_on_in_jupyter(stderr, monkeypatch: pytest.MonkeyPatch) -> None:
    stderr(False)
    monkeypatch.setattr(progress, "in_jupyter", lambda: True)
    assert show_progress(None) is True  # (in a real kernel: tests/test_notebooks.py)
    assert show_progress(False) is False


def test_environment_variable_sets_the_default(stderr, monkeypatch: pytest.MonkeyPatch) -> None:
    err = stderr(False)
    for value, expected in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("no", False), ("off", False)):
        monkeypatch.setenv(ENV_VAR, value)
        err.tty = not expected
        assert show_progress(None) is expected, value
        assert show_progress(not expected) is (not expected)  # an explicit value wins
    monkeypatch.setenv(ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=ENV_VAR):
        show_progress(None)


def test_bad_progress_argument_is_refused_before_work(tiny_llama, tokenizer) -> None:
    with pytest.raises(TypeError, match="`progress` must be True, False or None"):
        sweep(tiny_llama, tokenizer, [DP], layers=[1], multipliers=[1.0], progress="yes")
    with pytest.raises(TypeError, match="`show_progress` must be True, False or None"):
        extract_activations(tiny_llama, tokenizer, PAIRS, layers=[1], show_progress=1)
    with pytest.raises(TypeError, match="`progress` must be True, False or None"):
        optimize_many(tiny_llama, tokenizer, [Job([DP], 1, max_iters=1)], progress="no")


def test_optimize_draws_on_stderr_when_on_and_nothing_when_off(tiny_llama, tokenizer, stderr) -> None:
    err = stderr(False)
    optimize(tiny_llama, tokenizer, [DP], 1, max_iters=3, lr=0.1, seed=0)  # None, not a terminal: nothing
    assert err.getvalue() == ""
    optimize(tiny_llama, tokenizer, [DP], 1, max_iters=3, lr=0.1, seed=0, progress=False)
    assert err.getvalue() == ""
    err.tty = True  # None, a terminal: a bar
    optimize(tiny_llama, tokenizer, [DP], 1, max_iters=3, lr=0.1, seed=0)
    out = err.getvalue()
    assert bars(out) == ["optimize"] and "0/4 " in out  # 3 steps + the final evaluation


def test_forced_on_with_stderr_captured(tiny_llama, tokenizer, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    optimize(tiny_llama, tokenizer, [DP], 1, max_iters=2, lr=0.1, seed=0, progress=True)
    assert bars(capsys.readouterr().err) == ["optimize"]
    optimize(tiny_llama, tokenizer, [DP], 1, max_iters=2, lr=0.1, seed=0)  # pytest's stderr is no terminal
    assert capsys.readouterr().err == ""


def test_sweep_draws_one_bar_over_configurations(tiny_llama, tokenizer, stderr) -> None:
    err = stderr(True)
    sweep(tiny_llama, tokenizer, [DP], layers=[1, 2], multipliers=[0.5, 1.0], validation_prompts=VAL,
          neutral_prompts=["A neutral sentence"], optimize_kwargs={"max_iters": 2})
    out = err.getvalue()
    assert bars(out) == ["sweep"], out  # the optimiser's and evaluator's bars are folded into it
    assert "0/2 " in out and "config" in out and "layer 1, additive" in out


def test_auto_steer_draws_one_bar_configuration_k_of_n(tiny_llama, tokenizer, stderr) -> None:
    kwargs = dict(validation_prompts=VAL, layers=[1, 2], multipliers=[1.0], norm_fractions=[None, 0.5],
                  neutral_prompts=None, optimize_kwargs={"max_iters": 1})
    err = stderr(True)
    auto_steer(tiny_llama, tokenizer, [DP], **kwargs)
    out = err.getvalue()
    assert bars(out) == ["auto_steer"], out  # not one bar per inner sweep
    assert "0/4 " in out  # 2 layers x 2 norm caps
    with overall(None, "outer", progress=False, unit="config") as outer:
        auto_steer(tiny_llama, tokenizer, [DP], **kwargs)
    assert outer.n == 4  # every configuration counted, through the inner sweeps


def test_optimize_many_draws_one_bar_over_all_groups(tiny_llama, tokenizer, stderr) -> None:
    err = stderr(True)
    jobs = [Job([DP], 1, max_iters=2), Job([DP], 2, max_iters=3), Job([DP], 1, max_iters=1, name="x")]
    optimize_many(tiny_llama, tokenizer, jobs)
    out = err.getvalue()
    assert bars(out) == ["optimize_many"], out  # two groups (layers 1 and 2), one bar
    assert "0/7 " in out  # (2 + 1) evaluations for layer 1's group, (3 + 1) for layer 2's
    with overall(None, "outer", progress=False, unit="eval") as outer:
        optimize_many(tiny_llama, tokenizer, jobs)
    assert outer.n == 7


def test_evaluate_bar_counts_the_planned_forward_passes(tiny_llama, tokenizer, stderr) -> None:
    vec = SteeringVector({1: torch.ones(64)})
    for generate in (False, True):
        ev = Evaluator(tiny_llama, tokenizer, VAL, promote=[" cold"], suppress=[" sunny"],
                       neutral_prompts=["A neutral sentence", "Another one"], generate=generate, max_new_tokens=3)
        planned = ev.planned_passes()
        with overall(None, "outer", progress=False, unit="pass") as outer:
            ev.evaluate(vec)  # progress=None inside an overall bar: reports to it
        assert outer.n == planned, generate  # baseline + steered
        assert ev.planned_passes() == planned // 2  # the baseline is cached now
    err = stderr(True)
    evaluate(tiny_llama, tokenizer, vec, VAL, promote=[" cold"], neutral_prompts=None, generate=False)
    out = err.getvalue()
    assert bars(out) == ["evaluate"] and "pass" in out


def test_contrastive_extraction_bar(tiny_llama, tokenizer, stderr) -> None:
    err = stderr(False)
    extract_activations(tiny_llama, tokenizer, PAIRS, layers=[1], batch_size=2)
    assert err.getvalue() == ""
    extract_activations(tiny_llama, tokenizer, PAIRS, layers=[1], batch_size=2, show_progress=True)
    out = err.getvalue()
    assert bars(out) == ["extract activations"] and "0/3 " in out  # 6 texts in batches of 2
    with overall(None, "outer", progress=False, unit="batch") as outer:
        extract_activations(tiny_llama, tokenizer, PAIRS, layers=[1], batch_size=2)
    assert outer.n == 3 and err.getvalue() == out  # inside an overall bar: silent, counted


def test_inner_bars_report_to_the_overall_bar_in_the_same_unit(stderr) -> None:
    err = stderr(True)
    with overall(10, "outer", unit="step") as outer:
        same = progress_bar(4, "inner", unit="step")  # progress=None inside: silent, forwards
        other = progress_bar(4, "inner2", unit="pass")  # another unit: silent, not forwarded
        forced = progress_bar(4, "forced", progress=False, unit="step")  # explicit: its own (off) bar
        for bar in (same, other, forced):
            bar.update(3)
            bar.close()
        progress.advance(2, "step")
        progress.advance(5, "pass")
        assert (outer.n, same.n, other.n) == (5, 3, 3)
    assert bars(err.getvalue()) == ["outer"]
    progress.advance(1, "step")  # outside any overall bar: nothing to report to
    assert outer.n == 5
