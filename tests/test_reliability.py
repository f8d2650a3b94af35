"""Reliability: bad input is refused before any work, failures mid-run leave the model exactly as it was,
non-finite optimisation is detected and reported, the tokenizer is never mutated, saves are atomic.

The table :data:`CASES` is the bad-input battery: every public entry point, each case asserting the
exception type, that the message names the argument (and, where it is short, the value received), that
the model never ran a forward pass, and that the model is bitwise unchanged with no hook left behind.
The guarantees each test checks are listed in the README, "Guarantees".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

import steering_opt as so
from steering_opt import arch, persist
from steering_opt.engine import FastEngine
from steering_opt.jsonl import JSONLError, write_datapoints
from steering_opt.scale import Job, optimize_many

D = 64  # tiny models' hidden size
SHORT_CONTEXT = 16


# ------------------------------------------------------------------------------------ model state


def _hook_dicts(module: nn.Module) -> dict[str, int]:
    names = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
             "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")
    return {n: len(getattr(module, n, {}) or {}) for n in names if getattr(module, n, None)}


def hooks_left(model: nn.Module) -> list[str]:
    """Every module (and the global registries) holding a hook of any kind."""
    out = [f"{name or '<model>'}: {d}" for name, m in model.named_modules() if (d := _hook_dicts(m))]
    mod = torch.nn.modules.module
    for g in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
              "_global_backward_pre_hooks"):
        if getattr(mod, g, None):
            out.append(f"global {g}")
    return out


@dataclasses.dataclass
class ModelState:
    """Everything a call could change on a model, to compare bitwise afterwards."""

    tensors: dict[str, torch.Tensor]
    requires_grad: list[bool]
    grads: list[torch.Tensor | None]
    training: list[bool]
    modules: list[int]
    config: dict[str, Any]
    generation_config: dict[str, Any] | None

    @classmethod
    def of(cls, model: nn.Module) -> ModelState:
        gc = getattr(model, "generation_config", None)
        return cls(
            tensors={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            requires_grad=[p.requires_grad for p in model.parameters()],
            grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
            training=[m.training for m in model.modules()],
            modules=[id(m) for m in model.modules()],
            config=model.config.to_dict(),
            generation_config=gc.to_dict() if gc is not None else None,
        )

    def assert_same(self, model: nn.Module) -> None:
        now = ModelState.of(model)
        assert now.tensors.keys() == self.tensors.keys(), "the model's parameters/buffers changed"
        changed = [k for k, v in self.tensors.items() if not (v.dtype == now.tensors[k].dtype and
                                                              torch.equal(v, now.tensors[k]))]
        assert not changed, f"tensors changed: {changed[:5]}"
        assert now.requires_grad == self.requires_grad, "requires_grad flags changed"
        assert [g is None for g in now.grads] == [g is None for g in self.grads], ".grad attributes changed"
        assert all(a is None or torch.equal(a, b) for a, b in zip(self.grads, now.grads)), ".grad values changed"
        assert now.training == self.training, "train/eval flags changed"
        assert now.modules == self.modules, "the module tree changed"
        assert now.config == self.config, "model.config changed"
        assert now.generation_config == self.generation_config, "model.generation_config changed"
        assert not hooks_left(model), f"hooks left behind: {hooks_left(model)}"


@contextlib.contextmanager
def forward_counter(*models: nn.Module) -> Iterator[dict[str, int]]:
    """Count forward passes (of the model or its input embeddings); removes its own hooks on exit."""
    count = {"n": 0}

    def bump(*_: Any) -> None:
        count["n"] += 1

    handles = []
    for m in models:
        handles.append(m.register_forward_pre_hook(bump))
        handles.append(m.get_input_embeddings().register_forward_pre_hook(bump))
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def untouched(*models: nn.Module, forwards: bool = False) -> Iterator[None]:
    """Assert the models come out exactly as they went in (and, unless ``forwards``, never ran)."""
    states = [ModelState.of(m) for m in models]
    with forward_counter(*models) as count:
        yield
    for m, s in zip(models, states):
        s.assert_same(m)
    if not forwards:
        assert count["n"] == 0, f"{count['n']} forward passes ran before the bad input was refused"


# ---------------------------------------------------------------------------------------- fixtures


class Ctx:
    """Everything the bad-input cases need (built once per module)."""

    def __init__(self, tokenizer: Any, tmp: Path):
        self.tok = tokenizer
        self.model = make_tiny_model("llama", len(tokenizer))
        self.short = make_tiny_model("gpt2", len(tokenizer), n_positions=SHORT_CONTEXT)  # learned positions
        self.dp = so.TrainingDatapoint("Hello there", src_completions=["no"], dst_completions=["yes"])
        self.long_dp = so.TrainingDatapoint("word " * 30, dst_completions=["yes"])
        self.long = "word " * 30
        self.v = torch.randn(D)
        self.vec = so.SteeringVector({1: self.v.clone()})
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "not_a_save").mkdir(exist_ok=True)
        (tmp / "not_a_save" / "notes.txt").write_text("precious\n")
        (tmp / "vector.txt").write_text("hello\n")
        so.save({"a": self.vec, "b": self.vec * 2}, tmp / "set", model=self.model)
        self.jsonl = tmp / "dp.jsonl"
        write_datapoints([self.dp], self.jsonl)

    def jsonl_with(self, text: str, name: str = "x.jsonl") -> Path:
        p = self.tmp / name
        p.write_text(text, encoding="utf-8")
        return p


@pytest.fixture(scope="module")
def ctx(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    return Ctx(tokenizer, tmp_path_factory.mktemp("reliability"))


# ------------------------------------------------------------------------------------ the battery


@dataclasses.dataclass
class Case:
    id: str
    call: Callable[[Ctx], Any]
    exc: type[BaseException]
    names: tuple[str, ...]  # substrings the message must contain (the argument; the value where short)


def C(id: str, call: Callable[[Ctx], Any], exc: type[BaseException], *names: str) -> Case:
    return Case(id, call, exc, names)


def ov(c: Ctx, **kw: Any) -> Any:
    args = dict(tokenizer=c.tok, max_iters=1, lr=0.1)
    args.update(kw)
    return so.optimize_vector(args.pop("model", c.model), args.pop("datapoints", [c.dp]), args.pop("layer", 1),
                              **args)


def ovs(c: Ctx, **kw: Any) -> Any:
    args = dict(tokenizer=c.tok, max_iters=1)
    args.update(kw)
    return so.optimize_vectors(c.model, args.pop("datapoints", [c.dp]), args.pop("layers", [1, 2]), **args)


def mb(c: Ctx, **kw: Any) -> Any:
    args = dict(dst_completions=["yes"], max_iters=1)
    args.update(kw)
    return so.optimize_vector_minibatch_hf(c.model, args.pop("tokenizer", c.tok), args.pop("prompts", ["hi", "yo"]),
                                           args.pop("layer", 1), **args)


def TD(**kw: Any) -> so.TrainingDatapoint:
    args = dict(prompt="Hi", dst_completions=["yes"])
    args.update(kw)
    return so.TrainingDatapoint(**args)


def enter(cm: Any) -> None:
    with cm:
        raise AssertionError("the context manager should have refused to start")


def tsv(c: Ctx, samples: Any = (("I love it", "I hate it"),), **kw: Any) -> Any:
    args = dict(layers=[1])
    args.update(kw)
    return so.train_steering_vector(args.pop("model", c.model), c.tok, list(samples) if isinstance(samples, tuple)
                                    else samples, **args)


def ev(c: Ctx, steering: Any = None, prompts: Any = ("Hi",), **kw: Any) -> Any:
    args = dict(neutral_prompts=None, generate=False, fluency_lang=None, promote=["yes"])
    args.update(kw)
    return so.evaluate(args.pop("model", c.model), c.tok, steering, list(prompts) if isinstance(prompts, tuple)
                       else prompts, **args)


def many(c: Ctx, jobs: Any = None, **kw: Any) -> Any:
    args = dict(tokenizer=c.tok)
    args.update(kw)
    return optimize_many(c.model, jobs if jobs is not None else [Job([c.dp], 1, max_iters=1)], **args)


NAN, INF = float("nan"), float("inf")

CASES: list[Case] = [
    # --- optimize_vector: datapoints, layers, tokenizer, model
    C("ov-datapoints-empty", lambda c: ov(c, datapoints=[]), ValueError, "`datapoints`", "[]"),
    C("ov-datapoints-str", lambda c: ov(c, datapoints="hello"), ValueError, "`datapoints`", "'hello'"),
    C("ov-datapoints-item", lambda c: ov(c, datapoints=[c.dp, "x"]), TypeError, "`datapoints[1]`", "str"),
    C("ov-layer-too-big", lambda c: ov(c, layer=99), ValueError, "layer=99", "4 layers"),
    C("ov-layer-too-negative", lambda c: ov(c, layer=-5), ValueError, "layer=-5"),
    C("ov-layer-str", lambda c: ov(c, layer="1"), TypeError, "layer", "'1'"),
    C("ov-layer-float", lambda c: ov(c, layer=1.0), TypeError, "layer", "1.0"),
    C("ov-layer-none", lambda c: ov(c, layer=None), TypeError, "layer", "None"),
    C("ov-layer-duplicate", lambda c: ov(c, layer=[1, 1]), ValueError, "`layer`", "duplicate", "[1, 1]"),
    C("ov-layer-duplicate-negative", lambda c: ov(c, layer=[1, -3]), ValueError, "`layer`", "duplicate"),
    C("ov-layer-empty-list", lambda c: ov(c, layer=[]), ValueError, "`layer`", "empty"),
    C("ov-tokenizer-missing", lambda c: ov(c, tokenizer=None), ValueError, "`tokenizer`"),
    C("ov-tokenizer-wrong-type", lambda c: ov(c, tokenizer="gpt2"), TypeError, "`tokenizer`", "str"),
    C("ov-model-none", lambda c: ov(c, model=None), TypeError, "`model`", "NoneType"),
    C("ov-model-without-blocks", lambda c: ov(c, model=nn.Sequential(nn.Linear(4, 4))), arch.ArchitectureError,
      "decoder blocks", "layer_config"),
    # --- optimize_vector: numbers
    C("ov-lr-zero", lambda c: ov(c, lr=0), ValueError, "`lr`", "got 0"),
    C("ov-lr-negative", lambda c: ov(c, lr=-0.1), ValueError, "`lr`", "-0.1"),
    C("ov-lr-nan", lambda c: ov(c, lr=NAN), ValueError, "`lr`", "nan"),
    C("ov-lr-str", lambda c: ov(c, lr="0.1"), ValueError, "`lr`", "'0.1'"),
    C("ov-lr-overflow", lambda c: ov(c, lr=1e38), ValueError, "`lr`", "1e+38", "overflow"),
    C("ov-max-iters-negative", lambda c: ov(c, max_iters=-1), ValueError, "`max_iters`", "-1"),
    C("ov-max-iters-float", lambda c: ov(c, max_iters=2.5), ValueError, "`max_iters`", "2.5"),
    C("ov-max-norm-zero", lambda c: ov(c, max_norm=0), ValueError, "`max_norm`", "got 0"),
    C("ov-max-norm-negative", lambda c: ov(c, max_norm=-3), ValueError, "`max_norm`", "-3"),
    C("ov-coldness-zero", lambda c: ov(c, coldness=0), ValueError, "`coldness`", "got 0"),
    C("ov-starting-norm-zero", lambda c: ov(c, starting_norm=0.0), ValueError, "`starting_norm`", "0.0"),
    C("ov-noise-negative", lambda c: ov(c, noise_scale=-1.0), ValueError, "`noise_scale`", "-1.0"),
    C("ov-eps-negative", lambda c: ov(c, eps=-1.0), ValueError, "`eps`", "-1.0"),
    C("ov-target-nan", lambda c: ov(c, target_loss=NAN), ValueError, "`target_loss`", "nan"),
    C("ov-target-str", lambda c: ov(c, target_loss="3"), ValueError, "`target_loss`", "'3'"),
    C("ov-target-iters-zero", lambda c: ov(c, target_loss_target_iters=0), ValueError, "`target_loss_target_iters`"),
    C("ov-engine", lambda c: ov(c, engine="turbo"), ValueError, "`engine`", "'turbo'"),
    C("ov-max-batch-tokens", lambda c: ov(c, max_batch_tokens=0), ValueError, "`max_batch_tokens`", "got 0"),
    # --- optimize_vector: clamp / affine / starting vector
    C("ov-affine-rank-zero", lambda c: ov(c, affine_rank=0), ValueError, "`affine_rank`", "got 0", "[1, 64]"),
    C("ov-affine-rank-too-big", lambda c: ov(c, affine_rank=D + 1), ValueError, "`affine_rank`", "65"),
    C("ov-affine-rank-float", lambda c: ov(c, affine_rank=1.0), ValueError, "`affine_rank`", "1.0"),
    C("ov-affine-and-clamp", lambda c: ov(c, affine_rank=1, vector_clamp=1.0), ValueError, "`vector_clamp`",
      "`affine_rank`"),
    C("ov-max-affine-norm-zero", lambda c: ov(c, affine_rank=1, max_affine_norm=0), ValueError, "`max_affine_norm`"),
    C("ov-starting-affine-norm", lambda c: ov(c, affine_rank=1, starting_affine_norm=-1.0), ValueError,
      "`starting_affine_norm`", "-1.0"),
    C("ov-clamp-zero-vector", lambda c: ov(c, vector_clamp=1.0, starting_vec=torch.zeros(D)), ValueError,
      "`vector_clamp`", "`starting_vec`", "zero"),
    C("ov-clamp-nan", lambda c: ov(c, vector_clamp=NAN), ValueError, "`vector_clamp`", "nan"),
    C("ov-starting-vec-shape", lambda c: ov(c, starting_vec=torch.ones(32)), ValueError, "`starting_vec`", "(64,)",
      "(32,)"),
    C("ov-starting-vec-2d", lambda c: ov(c, starting_vec=torch.ones(1, D)), ValueError, "`starting_vec`", "(1, 64)"),
    C("ov-starting-vec-nan", lambda c: ov(c, starting_vec=torch.full((D,), NAN)), ValueError, "`starting_vec`", "NaN"),
    C("ov-starting-vec-inf", lambda c: ov(c, starting_vec=torch.full((D,), INF)), ValueError, "`starting_vec`",
      "infinite"),
    C("ov-starting-vec-list", lambda c: ov(c, starting_vec=[0.0] * D), TypeError, "`starting_vec`", "list"),
    C("ov-starting-vec-meta", lambda c: ov(c, starting_vec=torch.ones(D, device="meta")), ValueError,
      "`starting_vec`", "meta"),
    # --- optimize_vector: output-constrained phase
    C("ov-output-constr-lr", lambda c: ov(c, do_output_constr=True, output_constr_lr=0.0), ValueError,
      "`output_constr_lr`"),
    C("ov-output-constr-iters", lambda c: ov(c, do_output_constr=True, max_output_constr_iters=-1), ValueError,
      "`max_output_constr_iters`", "-1"),
    C("ov-output-constr-patience", lambda c: ov(c, do_output_constr=True, output_constr_patience=0), ValueError,
      "`output_constr_patience`"),
    # --- optimize_vector: data that does not fit the model
    C("ov-context-too-long", lambda c: ov(c, model=c.short, datapoints=[c.long_dp]), ValueError, "datapoints[0]",
      "context (16 tokens)"),
    C("ov-token-out-of-range", lambda c: ov(c, datapoints=[TD(token=50)]), ValueError, "token", "50"),
    C("ov-token-slice-step", lambda c: ov(c, datapoints=[TD(token=slice(0, 4, 2))]), ValueError, "token", "step"),
    # --- TrainingDatapoint
    C("dp-prompt-empty", lambda c: TD(prompt=""), ValueError, "`prompt`", "empty"),
    C("dp-prompt-int", lambda c: TD(prompt=3), TypeError, "`prompt`", "int"),
    C("dp-prompt-none", lambda c: TD(prompt=None), TypeError, "`prompt`", "NoneType"),
    C("dp-no-completions", lambda c: TD(dst_completions=[]), ValueError, "`src_completions`", "`dst_completions`"),
    C("dp-completion-empty", lambda c: TD(dst_completions=["ok", ""]), ValueError, "`dst_completions[1]`", "empty"),
    C("dp-completion-int", lambda c: TD(src_completions=[3]), TypeError, "`src_completions[0]`", "int"),
    C("dp-completions-str", lambda c: TD(dst_completions="yes"), TypeError, "`dst_completions`", "'yes'"),
    C("dp-completions-int", lambda c: TD(dst_completions=5), TypeError, "`dst_completions`", "int"),
    C("dp-targets-length", lambda c: TD(dst_completions_target_losses=[1.0, 2.0]), ValueError,
      "`dst_completions_target_losses`", "2 entries"),
    C("dp-targets-str", lambda c: TD(dst_completions_target_losses=["x"]), TypeError,
      "`dst_completions_target_losses[0]`", "'x'"),
    C("dp-targets-nan", lambda c: TD(dst_completions_target_losses=[NAN]), ValueError,
      "`dst_completions_target_losses[0]`", "nan"),
    C("dp-targets-scalar", lambda c: TD(dst_completions_target_losses=3.0), TypeError,
      "`dst_completions_target_losses`", "3.0"),
    C("dp-token-float", lambda c: TD(token=1.5), TypeError, "`token`", "1.5"),
    C("dp-token-bool", lambda c: TD(token=True), TypeError, "`token`", "True"),
    C("dp-is-negative-str", lambda c: TD(is_negative="no"), TypeError, "`is_negative`", "'no'"),
    # --- optimize_vectors
    C("ovs-layers-empty", lambda c: ovs(c, layers=[]), ValueError, "`layers`", "empty"),
    C("ovs-layers-range", lambda c: ovs(c, layers=[1, 9]), ValueError, "layers=9"),
    C("ovs-layers-duplicate", lambda c: ovs(c, layers=[2, 2]), ValueError, "`layers`", "duplicate"),
    C("ovs-layers-type", lambda c: ovs(c, layers=["1"]), TypeError, "layers", "'1'"),
    C("ovs-regularization-type", lambda c: ovs(c, regularization_type="l2"), ValueError, "`regularization_type`",
      "'l2'"),
    C("ovs-entropy-negative", lambda c: ovs(c, entropy_weight=-1.0), ValueError, "`entropy_weight`", "-1.0"),
    C("ovs-sparsity-nan", lambda c: ovs(c, sparsity_weight=NAN), ValueError, "`sparsity_weight`", "nan"),
    C("ovs-coldness", lambda c: ovs(c, coldness=-1), ValueError, "`coldness`", "-1"),
    C("ovs-tokenizer", lambda c: ovs(c, tokenizer=None), ValueError, "`tokenizer`"),
    C("ovs-lr", lambda c: ovs(c, lr=0), ValueError, "`lr`"),
    # --- optimize_vector_minibatch_hf
    C("mb-prompts-empty", lambda c: mb(c, prompts=[]), ValueError, "`prompts`", "[]"),
    C("mb-prompts-str", lambda c: mb(c, prompts="hi"), ValueError, "`prompts`", "'hi'"),
    C("mb-prompt-empty", lambda c: mb(c, prompts=["ok", ""]), ValueError, "`prompts[1]`", "empty"),
    C("mb-prompt-int", lambda c: mb(c, prompts=["ok", 3]), TypeError, "`prompts[1]`", "int"),
    C("mb-dst-str", lambda c: mb(c, dst_completions="yes"), TypeError, "`dst_completions`", "'yes'"),
    C("mb-no-completions", lambda c: mb(c, dst_completions=None), ValueError, "`src_completions`",
      "`dst_completions`"),
    C("mb-minibatch-size", lambda c: mb(c, minibatch_size=0), ValueError, "`minibatch_size`", "got 0"),
    C("mb-max-iters-negative", lambda c: mb(c, max_iters=-1), ValueError, "`max_iters`", "-1"),
    C("mb-lr", lambda c: mb(c, lr=-1.0), ValueError, "`lr`", "-1.0"),
    C("mb-affine-rank", lambda c: mb(c, affine_rank=0), ValueError, "`affine_rank`"),
    C("mb-tokenizer", lambda c: mb(c, tokenizer=None), ValueError, "`tokenizer`"),
    C("mb-layer", lambda c: mb(c, layer=7), ValueError, "layer=7"),
    C("mb-clamp", lambda c: mb(c, vector_clamp=INF), ValueError, "`vector_clamp`", "inf"),
    # --- hooks
    C("hook-vector-list", lambda c: so.make_steering_hook_hf([0.0] * D), TypeError, "`vector`", "list"),
    C("hook-vector-2d", lambda c: so.make_steering_hook_hf(torch.ones(2, D)), ValueError, "`vector`", "(2, 64)"),
    C("hook-vector-int", lambda c: so.make_steering_hook_hf(torch.ones(D, dtype=torch.long)), TypeError, "`vector`",
      "int64"),
    C("hook-vector-nan", lambda c: so.make_steering_hook_hf(torch.full((D,), NAN)), ValueError, "`vector`", "NaN"),
    C("hook-clamp-zero", lambda c: so.make_steering_hook_hf(torch.zeros(D), clamp=1.0), ValueError, "`clamp`",
      "`vector`"),
    C("hook-matrix-shape", lambda c: so.make_steering_hook_hf(c.v, torch.zeros(3, 3)), ValueError, "`matrix`",
      "(64, 64)", "(3, 3)"),
    C("hook-factors-shape", lambda c: so.make_steering_hook_hf(c.v, (torch.zeros(2, D), torch.zeros(2, 8))),
      ValueError, "matrix[1]", "(2, 8)"),
    C("hook-token-empty-list", lambda c: so.make_steering_hook_hf(c.v, token=[]), ValueError, "`token`", "empty"),
    C("hook-token-empty-slice", lambda c: so.make_steering_hook_hf(c.v, token=slice(5, 2)), ValueError, "`token`",
      "no position"),
    C("apply-token-empty", lambda c: so.SteeringVector({1: c.v}).apply(c.model, token_indices=slice(-1, -3))
      .__enter__(),
      ValueError, "`token_indices`", "no position"),
    C("abl-mat-zero", lambda c: so.make_abl_mat(torch.zeros(D)), ValueError, "`vector`", "non-zero"),
    C("abl-mat-nan", lambda c: so.make_abl_mat(torch.full((D,), NAN)), ValueError, "`vector`", "finite"),
    C("hooks-cm-layer", lambda c: enter(so.hf_hooks_contextmanager(c.model, [(99, so.make_steering_hook_hf(c.v))])),
      ValueError, "layer=99"),
    C("hooks-cm-partial", lambda c: enter(so.hf_hooks_contextmanager(
        c.model, [(1, so.make_steering_hook_hf(c.v)), (9, so.make_steering_hook_hf(c.v))])), ValueError, "layer=9"),
    C("hooks-cm-hidden-size", lambda c: enter(so.hf_hooks_contextmanager(c.model, [(1, so.make_steering_hook_hf(
        torch.ones(32)))])), ValueError, "`hook_infos[0]`", "size 32", "64"),
    C("hooks-cm-not-callable", lambda c: enter(so.hf_hooks_contextmanager(c.model, [(1, 5)])), TypeError,
      "`hook_infos[0]`", "callable"),
    C("hooks-cm-not-pair", lambda c: enter(so.hf_hooks_contextmanager(c.model, [1])), TypeError, "`hook_infos[0]`"),
    C("hooks-cm-site", lambda c: enter(so.hf_hooks_contextmanager(c.model, [(1, so.make_steering_hook_hf(c.v))],
                                                                  site="resid")), ValueError, "site", "'resid'"),
    # --- sampling
    C("logprob-prompt-empty", lambda c: so.get_completion_logprob_hf(c.model, "", "yes", c.tok), ValueError,
      "`prompt`", "empty"),
    C("logprob-completion-empty", lambda c: so.get_completion_logprob_hf(c.model, "Hi", "", c.tok), ValueError,
      "`completion`"),
    C("logprob-completion-int", lambda c: so.get_completion_logprob_hf(c.model, "Hi", 3, c.tok), TypeError,
      "`completion`", "int"),
    C("logprob-tokenizer", lambda c: so.get_completion_logprob_hf(c.model, "Hi", "yes", None), ValueError,
      "`tokenizer`"),
    C("logprob-coldness", lambda c: so.get_completion_logprob_hf(c.model, "Hi", "yes", c.tok, coldness=INF),
      ValueError, "`coldness`", "inf"),
    C("logprob-context", lambda c: so.get_completion_logprob_hf(c.short, c.long, "yes", c.tok), ValueError,
      "`prompt` + `completion`", "context (16 tokens)"),
    C("sample-k", lambda c: so.sample_most_likely_completions_hf(c.model, c.tok, "Hi", k=0), ValueError, "`k`",
      "got 0"),
    C("sample-iters", lambda c: so.sample_most_likely_completions_hf(c.model, c.tok, "Hi", iters=-1), ValueError,
      "`iters`", "-1"),
    C("sample-prompt-empty", lambda c: so.sample_most_likely_completions_hf(c.model, c.tok, ""), ValueError,
      "`dst_prompt`", "empty"),
    C("sample-src-prompt-int", lambda c: so.sample_most_likely_completions_hf(c.model, c.tok, "Hi", src_prompt=5),
      TypeError, "`src_prompt`", "int"),
    C("sample-coldness", lambda c: so.sample_most_likely_completions_hf(c.model, c.tok, "Hi", coldness=NAN),
      ValueError, "`coldness`", "nan"),
    C("sample-context", lambda c: so.sample_most_likely_completions_hf(c.short, c.tok, c.long), ValueError,
      "`dst_prompt`", "context (16 tokens)"),
    C("sample-tokenizer", lambda c: so.sample_most_likely_completions_hf(c.model, None, "Hi"), TypeError,
      "`tokenizer`"),
    # --- SteeringVector
    C("sv-empty", lambda c: so.SteeringVector({}), ValueError, "`layer_activations`"),
    C("sv-key-str", lambda c: so.SteeringVector({"1": c.v}), TypeError, "`layer_activations`", "'1'"),
    C("sv-value-list", lambda c: so.SteeringVector({1: [0.0] * D}), TypeError, "`layer_activations[1]`", "list"),
    C("sv-value-int", lambda c: so.SteeringVector({1: torch.ones(D, dtype=torch.long)}), TypeError,
      "`layer_activations[1]`", "int64"),
    C("sv-shapes", lambda c: so.SteeringVector({1: c.v, 2: torch.ones(8)}), ValueError, "same shape"),
    C("sv-layer-type", lambda c: so.SteeringVector({1: c.v}, layer_type="resid"), ValueError, "layer_type",
      "'resid'"),
    C("sv-clamp-and-affine", lambda c: so.SteeringVector({1: c.v}, clamp=1.0, affine={1: (c.v[None], c.v[None])}),
      ValueError, "clamp", "affine"),
    C("sv-from-optimization", lambda c: so.SteeringVector.from_optimization(c.v, {}), ValueError, "`layers`"),
    C("sv-add-clamp", lambda c: c.vec + so.SteeringVector({1: c.v}, clamp=1.0), ValueError, "clamp"),
    C("sv-add-tensor", lambda c: c.vec + c.v, TypeError, "SteeringVector"),
    C("apply-hidden-size", lambda c: enter(so.SteeringVector({1: torch.ones(32)}).apply(c.model)), ValueError,
      "hidden size 32", "64"),
    C("apply-layer", lambda c: enter(so.SteeringVector({9: c.v}).apply(c.model)), ValueError, "layer=9"),
    C("apply-partial", lambda c: enter(so.SteeringVector({1: c.v, 9: c.v}).apply(c.model)), ValueError, "layer=9"),
    C("apply-nan", lambda c: enter(so.SteeringVector({1: torch.full((D,), NAN)}).apply(c.model)), ValueError,
      "layer 1", "NaN"),
    C("apply-clamp-zero", lambda c: enter(so.SteeringVector({1: torch.zeros(D)}, clamp=1.0).apply(c.model)),
      ValueError, "clamp", "zero"),
    C("apply-multiplier", lambda c: enter(c.vec.apply(c.model, multiplier="2")), TypeError, "`multiplier`", "'2'"),
    C("apply-min-token-index", lambda c: enter(c.vec.apply(c.model, min_token_index=-1)), ValueError,
      "`min_token_index`", "-1"),
    C("apply-injection-mode", lambda c: enter(c.vec.apply(c.model, injection_mode="middle")), ValueError,
      "`injection_mode`", "'middle'"),
    C("apply-token-indices-str", lambda c: enter(c.vec.apply(c.model, token_indices="last")), TypeError,
      "`token_indices`", "str"),
    C("apply-token-indices-step", lambda c: enter(c.vec.apply(c.model, token_indices=slice(0, 4, 2))), ValueError,
      "`token_indices`", "step"),
    C("apply-operator", lambda c: enter(c.vec.apply(c.model, operator=5)), TypeError, "`operator`", "int"),
    C("apply-model", lambda c: enter(c.vec.apply("model")), TypeError, "`model`", "str"),
    # --- contrastive
    C("tsv-empty", lambda c: tsv(c, []), ValueError, "`training_samples`", "empty"),
    C("tsv-triple", lambda c: tsv(c, [("a", "b", "c")]), TypeError, "`training_samples[0]`", "length 3"),
    C("tsv-empty-text", lambda c: tsv(c, [("", "b")]), ValueError, "training_samples[0] (positive)", "empty"),
    C("tsv-layers-range", lambda c: tsv(c, layers=[9]), ValueError, "layers=9"),
    C("tsv-layers-str", lambda c: tsv(c, layers="1"), TypeError, "`layers`", "'1'"),
    C("tsv-layer-type", lambda c: tsv(c, layer_type="resid"), ValueError, "`layer_type`", "'resid'"),
    C("tsv-batch-size", lambda c: tsv(c, batch_size=0), ValueError, "`batch_size`", "got 0"),
    C("tsv-read-index-range", lambda c: tsv(c, read_token_index=99), ValueError, "`read_token_index`", "99"),
    C("tsv-read-index-str", lambda c: tsv(c, read_token_index="last"), TypeError, "`read_token_index`", "'last'"),
    C("tsv-aggregator", lambda c: tsv(c, aggregator=5), TypeError, "`aggregator`", "int"),
    C("tsv-context", lambda c: tsv(c, [(c.long, "b")], model=c.short), ValueError, "training_samples[0] (positive)",
      "context (16 tokens)"),
    C("logistic-C", lambda c: so.logistic_aggregator(C=0), ValueError, "`C`", "got 0"),
    C("aggregate-layers", lambda c: so.aggregate_activations({1: torch.ones(2, D)}, {2: torch.ones(2, D)}),
      ValueError, "`pos_acts`", "`neg_acts`"),
    # --- injectors
    C("injector-strength", lambda c: so.ActivationInjector(c.model, c.vec, strength="x"), TypeError, "`strength`",
      "'x'"),
    C("injector-mode", lambda c: so.ActivationInjector(c.model, c.vec, injection_mode="x"), ValueError,
      "`injection_mode`", "'x'"),
    C("injector-raw-tensor", lambda c: so.ActivationInjector(c.model, c.v), ValueError, "`vectors`", "`layer`"),
    C("injector-nan", lambda c: enter(so.ActivationInjector(c.model, so.SteeringVector({1: torch.full((D,), NAN)}))),
      ValueError, "NaN"),
    C("multi-empty", lambda c: so.MultiVectorInjector(c.model, {}), TypeError, "`vector_sets`"),
    C("multi-strength-name", lambda c: so.MultiVectorInjector(c.model, {"a": c.vec}, strengths={"b": 1.0}),
      ValueError, "`strengths`", "'b'"),
    C("multi-set-strength", lambda c: so.MultiVectorInjector(c.model, {"a": c.vec}).set_strength("b", 1.0), KeyError,
      "'b'"),
    C("activation-hook-layer", lambda c: so.ActivationHook(c.model, 10), ValueError, "layer=10"),
    C("activation-hook-component", lambda c: so.ActivationHook(c.model, 1, component="x"), ValueError,
      "`component`", "'x'"),
    C("activation-hook-position", lambda c: so.ActivationHook(c.model, 1, token_position="x"), ValueError,
      "`token_position`", "'x'"),
    C("generate-prompt-empty", lambda c: so.generate_with_steering(c.model, c.tok, "", None), ValueError, "prompt",
      "empty"),
    C("generate-hidden-size", lambda c: so.generate_with_steering(c.model, c.tok, "Hi", torch.ones(32), layer=1),
      ValueError, "hidden size 32"),
    C("generate-multiplier", lambda c: so.generate_with_steering(c.model, c.tok, "Hi", c.vec, multiplier=NAN),
      TypeError, "`multiplier`", "nan"),
    C("generate-context", lambda c: so.generate_with_steering(c.short, c.tok, c.long, None), ValueError, "prompt",
      "context (16 tokens)"),
    # --- save / load / export
    C("save-tensor", lambda c: so.save(c.v, c.tmp / "s1"), TypeError, "SteeringVector", "Tensor"),
    C("save-nan", lambda c: so.save(so.SteeringVector({1: torch.full((D,), NAN)}), c.tmp / "s2"), ValueError,
      "layer 1", "NaN"),
    C("save-suffix", lambda c: so.save(c.vec, c.tmp / "v.pt"), ValueError, "'.pt'"),
    C("save-empty-set", lambda c: so.save({}, c.tmp / "s3"), ValueError, "empty"),
    C("save-set-name", lambda c: so.save({"": c.vec}, c.tmp / "s4"), TypeError, "names", "''"),
    C("save-foreign-folder", lambda c: so.save(c.vec, c.tmp / "not_a_save"), FileExistsError, "not_a_save",
      "not a steering_opt save"),
    C("save-metadata", lambda c: so.save(c.vec, c.tmp / "s5", metadata={"x": object()}), TypeError, "metadata",
      "object"),
    C("load-missing", lambda c: so.load(c.tmp / "nope"), FileNotFoundError, "nope"),
    C("load-unknown-type", lambda c: so.load(c.tmp / "vector.txt"), so.SteeringFileError, "vector.txt", "'.txt'"),
    C("load-wrong-model", lambda c: so.load(c.tmp / "set", model=c.short), ValueError, "LlamaForCausalLM",
      "GPT2LMHeadModel", "allow_mismatch"),
    C("load-vector-of-set", lambda c: persist.load_vector(c.tmp / "set"), so.SteeringFileError, "set", "'a'"),
    C("export-gguf-layer", lambda c: so.export_gguf(c.vec, c.tmp / "v.gguf"), ValueError, "layer(s) [1]"),
    C("export-npy-layers", lambda c: so.export_tensors(so.SteeringVector({2: c.v, 3: c.v}), c.tmp / "v.npy"),
      ValueError, ".npy", "[2, 3]"),
    C("export-gguf-suffix", lambda c: so.export_gguf(so.SteeringVector({2: c.v}), c.tmp / "v.bin"), ValueError,
      "'.gguf'"),
    # --- JSONL
    C("jsonl-missing", lambda c: so.load_datapoints(c.tmp / "missing.jsonl"), FileNotFoundError, "missing.jsonl"),
    C("jsonl-folder", lambda c: so.load_datapoints(c.tmp), JSONLError, "folder"),
    C("jsonl-bad-json", lambda c: so.load_datapoints(c.jsonl_with('{"prompt": "a", "dst_completions": ["b"]}\n{"pr')),
      JSONLError, "x.jsonl:2:", "invalid JSON"),
    C("jsonl-unknown-key", lambda c: so.load_datapoints(c.jsonl_with('{"prompt": "a", "dst_completion": ["b"]}\n')),
      JSONLError, "x.jsonl:1:", "'dst_completion'", "did you mean 'dst_completions'"),
    C("jsonl-empty", lambda c: so.load_datapoints(c.jsonl_with("\n\n")), JSONLError, "x.jsonl", "empty"),
    C("jsonl-pair-missing", lambda c: so.load_contrast_pairs(c.jsonl_with('{"positive": "a"}\n')), JSONLError,
      "x.jsonl:1:", "'negative'"),
    C("jsonl-big-int", lambda c: so.load_datapoints(c.jsonl_with("\n" + "1" * 5000 + "\n")), JSONLError, "x.jsonl:2:"),
    C("jsonl-target-overflow", lambda c: so.load_datapoints(c.jsonl_with(
        '{"prompt": "a", "dst_completions": ["b"], "dst_completions_target_losses": [1' + "0" * 400 + ']}\n')),
      JSONLError, "x.jsonl:1:", "dst_completions_target_losses"),
    # --- evaluate / sweep / auto_steer
    C("eval-prompts-empty", lambda c: ev(c, prompts=[]), ValueError, "`prompts`", "[]"),
    C("eval-prompt-empty", lambda c: ev(c, prompts=["ok", ""]), ValueError, "`prompts[1]`", "empty"),
    C("eval-multiplier", lambda c: ev(c, c.vec, multiplier="x"), TypeError, "`multiplier`", "'x'"),
    C("eval-hidden-size", lambda c: ev(c, so.SteeringVector({1: torch.ones(32)})), ValueError, "`steering`",
      "hidden size 32"),
    C("eval-nan-steering", lambda c: ev(c, so.SteeringVector({1: torch.full((D,), NAN)})), ValueError, "`steering`",
      "NaN"),
    C("eval-steering-type", lambda c: ev(c, "vector"), TypeError, "`steering`", "str"),
    C("eval-promote-str", lambda c: ev(c, promote="yes"), TypeError, "`promote`", "single str"),
    C("eval-max-new-tokens", lambda c: ev(c, max_new_tokens=0), ValueError, "`max_new_tokens`", "got 0"),
    C("eval-top-p", lambda c: ev(c, top_p=0), ValueError, "`top_p`", "got 0"),
    C("eval-kl-positions", lambda c: ev(c, kl_positions="x"), ValueError, "`kl_positions`", "'x'"),
    C("eval-context", lambda c: ev(c, model=c.short, prompts=[c.long]), ValueError, "prompt", "context (16 tokens)"),
    C("completion-logprobs-empty", lambda c: so.completion_logprobs(c.model, c.tok, ["Hi"], []), ValueError,
      "`completions`"),
    C("kl-positions", lambda c: so.kl_divergence(c.model, c.tok, ["Hi"], c.vec, positions="x"), ValueError,
      "`positions`", "'x'"),
    C("perplexity-lengths", lambda c: so.perplexity(c.model, c.tok, ["Hi", "Yo"], ["a"]), ValueError,
      "`completions`"),
    C("auto-steer-empty", lambda c: so.auto_steer(c.model, c.tok, []), ValueError, "`datapoints`"),
    C("auto-steer-item", lambda c: so.auto_steer(c.model, c.tok, ["x"]), TypeError, "`datapoints[0]`", "str"),
    C("auto-steer-layers", lambda c: so.auto_steer(c.model, c.tok, [c.dp], layers=[10]), ValueError, "layers=10"),
    C("auto-steer-budget", lambda c: so.auto_steer(c.model, c.tok, [c.dp], time_budget_s=0), ValueError,
      "`time_budget_s`", "got 0"),
    C("auto-steer-norms", lambda c: so.auto_steer(c.model, c.tok, [c.dp], norm_fractions=[-1.0]), ValueError,
      "`norm_fractions`"),
    C("sweep-empty", lambda c: so.sweep(c.model, c.tok, []), ValueError, "`train`"),
    C("sweep-method", lambda c: so.sweep(c.model, c.tok, [c.dp], method="x"), ValueError, "`method`", "'x'"),
    # --- optimize_many
    C("many-empty", lambda c: many(c, []), ValueError, "`jobs`", "[]"),
    C("many-single-job", lambda c: many(c, Job([c.dp], 1)), ValueError, "`jobs`"),
    C("many-item", lambda c: many(c, ["x"]), TypeError, "`jobs[0]`", "str"),
    C("many-lr", lambda c: many(c, [Job([c.dp], 1), Job([c.dp], 1, lr=-1)]), ValueError, "jobs[1]", "`lr`", "-1"),
    C("many-lr-overflow", lambda c: many(c, [Job([c.dp], 1, lr=1e38)]), ValueError, "jobs[0]", "`lr`", "1e+38"),
    C("many-layer", lambda c: many(c, [Job([c.dp], 10)]), ValueError, "jobs[0]", "layer=10"),
    C("many-starting-vec", lambda c: many(c, [Job([c.dp], 1, starting_vec=torch.full((D,), NAN))]), ValueError,
      "jobs[0]", "`starting_vec`", "NaN"),
    C("many-affine-clamp", lambda c: many(c, [Job([c.dp], 1, affine_rank=1, vector_clamp=1.0)]), ValueError,
      "jobs[0]", "`vector_clamp`"),
    C("many-tokenizer", lambda c: many(c, tokenizer=None), ValueError, "`tokenizer`"),
    C("many-batch-tokens", lambda c: many(c, max_batch_tokens=0), ValueError, "`max_batch_tokens`", "got 0"),
    C("many-context", lambda c: optimize_many(c.short, [Job([c.long_dp], 1)], tokenizer=c.tok), ValueError, "jobs[0]",
      "context (16 tokens)"),
    # --- arch
    C("arch-layer-str", lambda c: so.resolve_layer(c.model, "1"), TypeError, "layer", "'1'"),
    C("arch-layer-range", lambda c: so.resolve_layer(c.model, 4), ValueError, "layer=4", "-4..3"),
    C("arch-site", lambda c: so.get_site_module(c.model, 1, "resid"), ValueError, "site", "'resid'",
      "decoder_block"),
    C("arch-blocks", lambda c: so.get_blocks(nn.Sequential(nn.Linear(2, 2))), arch.ArchitectureError,
      "decoder blocks", "layer_config"),
    C("arch-hidden-size", lambda c: so.hidden_size(nn.Linear(2, 2)), arch.ArchitectureError, "hidden size"),
    C("arch-layer-config-path", lambda c: so.get_site_module(c.model, 1, layer_config="model.nope.{num}"),
      ValueError, "layer_config", "'model.nope.1'"),
    C("arch-layer-config-type", lambda c: so.get_site_module(c.model, 1, layer_config=5), TypeError,
      "layer_config", "int"),
    C("arch-layer-config-site", lambda c: so.get_site_module(c.model, 1, "mlp", layer_config="model.layers.{num}"),
      ValueError, "site='mlp'", "layer_config"),
]


def test_battery_is_big_and_distinct() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx) -> None:
    """Refused with the documented exception type, a message naming the argument, before any forward pass,
    with the model bitwise unchanged and no hook left behind."""
    with untouched(ctx.model, ctx.short):
        with pytest.raises(case.exc) as info:
            case.call(ctx)
    msg = str(info.value)
    missing = [n for n in case.names if n not in msg]
    assert not missing, f"message {msg!r} does not mention {missing}"


# ------------------------------------------------------------------------- numerical failure


class _NaNAt:
    """Wrap FastEngine.run: evaluation number ``k`` (0-based) returns NaN losses (``mode="loss"``), or its
    gradients are replaced by NaN so that the next step makes the parameters NaN (``mode="grad"``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, k: int, mode: str = "loss", rows: set[int] | None = None):
        self.k, self.mode, self.calls = k, mode, 0
        real = FastEngine.run

        def run(engine: FastEngine, spec_fn: Any, **kw: Any) -> torch.Tensor:
            out = real(engine, spec_fn, **kw)
            i, self.calls = self.calls, self.calls + 1
            if i == self.k:
                if self.mode == "loss":
                    seq = kw.get("subset") or range(len(out))
                    hit = torch.tensor([rows is None or s in rows for s in seq])
                    return torch.where(hit, torch.full_like(out, math.nan), out)
                for t in _spec_tensors(spec_fn, engine):
                    if t.grad is not None:
                        t.grad.fill_(math.nan)
            return out

        monkeypatch.setattr(FastEngine, "run", run)


def _spec_tensors(spec_fn: Any, engine: FastEngine) -> list[torch.Tensor]:
    """The trainable tensors behind a loop's spec_fn: its ``{layer: [Steering, ...]}`` closure cell."""
    from steering_opt.parameterization import Steering

    out: dict[int, torch.Tensor] = {}
    for cell in getattr(spec_fn, "__closure__", None) or ():
        obj = cell.cell_contents
        if isinstance(obj, dict):
            for ps in obj.values():
                for p in ps if isinstance(ps, list) else ():
                    if isinstance(p, Steering):
                        out.update({id(t): t for t in p.parameters()})
    return list(out.values())


@pytest.mark.parametrize("k", [0, 1, 3])
def test_nonfinite_loss_restores_last_finite_vector(monkeypatch: pytest.MonkeyPatch, tiny_llama: nn.Module,
                                                     tokenizer: Any, k: int) -> None:
    """NaN loss at evaluation k: status 'nonfinite', the vector is exactly the one after k-1 steps (the last
    finite state) with its loss; NaN at the very first evaluation reports a NaN loss, never a made-up one."""
    dp = so.TrainingDatapoint("The cat sat on the", src_completions=[" mat"], dst_completions=[" hat", " dog"])
    kw = dict(tokenizer=tokenizer, lr=0.3, seed=3)
    state = ModelState.of(tiny_llama)
    _NaNAt(monkeypatch, k)
    vec, info = so.optimize_vector(tiny_llama, [dp], 1, max_iters=6, **kw)
    state.assert_same(tiny_llama)
    assert info["status"] == "nonfinite"
    assert torch.isfinite(vec).all()
    monkeypatch.undo()
    if k == 0:
        start, _ = so.optimize_vector(tiny_llama, [dp], 1, max_iters=0, **kw)
        assert torch.equal(vec, start)
        assert math.isnan(info["loss"]) and info["loss_history"] == []
        return
    ref, ref_info = so.optimize_vector(tiny_llama, [dp], 1, max_iters=k - 1, **kw)
    assert torch.equal(vec, ref)
    assert info["loss"] == pytest.approx(ref_info["loss"], abs=1e-6)
    assert info["loss_history"] == pytest.approx(ref_info["loss_history"], abs=1e-6)
    assert info["norm"] == pytest.approx(float(ref.norm()))


def test_nonfinite_parameters_are_detected(monkeypatch: pytest.MonkeyPatch, tiny_llama: nn.Module,
                                           tokenizer: Any) -> None:
    """NaN gradients make the parameters NaN after a step: detected at the next evaluation, the last finite
    parameters (and, for affine steering, factors) are returned."""
    dp = so.TrainingDatapoint("The cat sat on the", dst_completions=[" hat"])
    kw = dict(tokenizer=tokenizer, lr=0.3, seed=1, affine_rank=2)
    _NaNAt(monkeypatch, 2, mode="grad")
    vec, mat, info = so.optimize_vector(tiny_llama, [dp], 1, max_iters=6, **kw)
    assert info["status"] == "nonfinite"
    monkeypatch.undo()
    ref, ref_mat, ref_info = so.optimize_vector(tiny_llama, [dp], 1, max_iters=2, **kw)
    assert torch.equal(vec, ref) and torch.equal(mat, ref_mat)
    assert torch.isfinite(mat).all()
    assert info["loss"] == pytest.approx(ref_info["loss"], abs=1e-6)


def test_huge_vectors_are_projected_not_zeroed(tiny_llama: nn.Module, tokenizer: Any) -> None:
    """‖v‖ ≈ 1e20 overflows a float32 norm: the cap still scales the vector to max_norm (it used to become
    zero, and clamp steering then failed in the middle of a forward pass)."""
    dp = so.TrainingDatapoint("The cat sat on the", dst_completions=[" hat"])
    for clamp in (None, 1.0):
        vec, info = so.optimize_vector(tiny_llama, [dp], 1, tokenizer=tokenizer, max_iters=2, starting_norm=1e20,
                                       max_norm=3.0, vector_clamp=clamp, seed=0)
        assert info["status"] == "max_iters" and float(vec.norm()) == pytest.approx(3.0, rel=1e-5)


def test_zero_clamp_vector_mid_run_is_nonfinite(monkeypatch: pytest.MonkeyPatch, tiny_llama: nn.Module,
                                                tokenizer: Any) -> None:
    """A clamp vector that reaches zero (its direction is undefined) stops the run like a NaN would, with the
    last usable vector, instead of an exception from inside the forward pass."""
    from steering_opt.loop import JobState

    dp = so.TrainingDatapoint("The cat sat on the", dst_completions=[" hat"])
    kw = dict(tokenizer=tokenizer, vector_clamp=1.0, lr=0.1, seed=2)
    real, calls = JobState.project, {"n": 0}

    def project(state: Any) -> None:
        real(state)
        calls["n"] += 1
        if calls["n"] == 3:  # the projection after step 2
            with torch.no_grad():
                for t in state.tensors:
                    t.zero_()

    monkeypatch.setattr(JobState, "project", project)
    vec, info = so.optimize_vector(tiny_llama, [dp], 1, max_iters=5, **kw)
    monkeypatch.undo()
    ref, ref_info = so.optimize_vector(tiny_llama, [dp], 1, max_iters=1, **kw)
    assert info["status"] == "nonfinite" and torch.equal(vec, ref)
    assert info["loss"] == pytest.approx(ref_info["loss"], abs=1e-6)


def test_nonfinite_in_optimize_vectors_and_minibatch(monkeypatch: pytest.MonkeyPatch, tiny_llama: nn.Module,
                                                     tokenizer: Any) -> None:
    dp = so.TrainingDatapoint("The cat sat on the", dst_completions=[" hat"])
    _NaNAt(monkeypatch, 2)
    vecs, info = so.optimize_vectors(tiny_llama, [dp], [1, 2], tokenizer=tokenizer, lr=0.3, max_iters=5, seed=0)
    assert info["status"] == "nonfinite"
    monkeypatch.undo()
    ref, ref_info = so.optimize_vectors(tiny_llama, [dp], [1, 2], tokenizer=tokenizer, lr=0.3, max_iters=1, seed=0)
    assert all(torch.equal(vecs[k], ref[k]) for k in ref)
    assert info["loss"] == pytest.approx(ref_info["loss"], abs=1e-6)

    _NaNAt(monkeypatch, 2)
    kw = dict(dst_completions=[" hat"], minibatch_size=1, lr=0.3, seed=0)
    vec, info = so.optimize_vector_minibatch_hf(tiny_llama, tokenizer, ["A cat", "A dog"], 1, max_iters=5, **kw)
    assert info["status"] == "nonfinite"
    monkeypatch.undo()
    ref, ref_info = so.optimize_vector_minibatch_hf(tiny_llama, tokenizer, ["A cat", "A dog"], 1, max_iters=1, **kw)
    assert torch.equal(vec, ref)
    assert info["loss"] == pytest.approx(ref_info["loss"], abs=1e-6)


def test_nonfinite_job_does_not_affect_the_others(monkeypatch: pytest.MonkeyPatch, tiny_llama: nn.Module,
                                                  tokenizer: Any) -> None:
    """optimize_many: a job whose loss turns NaN stops as 'nonfinite' with its last finite vector and loss (as
    optimize_vector would); the job batched with it is unaffected. NaN at the first evaluation gives a NaN
    loss (never a made-up 0) and the finite initial vector."""
    dps = [so.TrainingDatapoint("The cat sat on the", dst_completions=[" hat"]),
           so.TrainingDatapoint("A dog ran to the", dst_completions=[" park"])]
    jobs = [Job(dps[:1], 1, max_iters=4, lr=0.1, seed=0), Job(dps[1:], 1, max_iters=4, lr=0.1, seed=1)]
    _NaNAt(monkeypatch, 2, rows={1})  # the third evaluation of job 1 (its sequence is the group's row 1)
    (v_ok, info_ok), (v_bad, info_bad) = optimize_many(tiny_llama, jobs, tokenizer=tokenizer)
    monkeypatch.undo()
    alone = [so.optimize_vector(tiny_llama, j.datapoints, j.layer, tokenizer=tokenizer, **j.kwargs()) for j in jobs]
    assert info_ok["status"] == "max_iters" and info_bad["status"] == "nonfinite"
    torch.testing.assert_close(v_ok, alone[0][0], rtol=1e-5, atol=1e-5)
    assert info_ok["loss"] == pytest.approx(alone[0][1]["loss"], rel=1e-4)
    j1 = dataclasses.replace(jobs[1], max_iters=1)  # the last finite state: after one step
    ref, ref_info = so.optimize_vector(tiny_llama, j1.datapoints, j1.layer, tokenizer=tokenizer, **j1.kwargs())
    torch.testing.assert_close(v_bad, ref, rtol=1e-5, atol=1e-5)
    assert info_bad["loss"] == pytest.approx(ref_info["loss"], rel=1e-4)

    _NaNAt(monkeypatch, 0)
    results = optimize_many(tiny_llama, jobs, tokenizer=tokenizer)
    for v, info in results:
        assert info["status"] == "nonfinite" and math.isnan(info["loss"]) and torch.isfinite(v).all()


# ------------------------------------------------------------------ model integrity under failure


class Boom(Exception):
    pass


def _failing_hook(after: int, exc: type[BaseException]) -> Callable[..., None]:
    calls = {"n": 0}

    def hook(*_: Any) -> None:
        calls["n"] += 1
        if calls["n"] > after:
            raise exc("injected failure")

    return hook


def _odd_state(model: nn.Module) -> None:
    """A state the library must not 'fix': some modules in train mode, some weights trainable, no KV cache."""
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 == 0)
    for i, m in enumerate(model.modules()):
        m.training = i % 2 == 0
    model.config.use_cache = False


ENTRY_POINTS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "optimize_vector": lambda m, t: so.optimize_vector(
        m, [so.TrainingDatapoint("Hello there", src_completions=[" no"], dst_completions=[" yes", " sure"])], 1,
        tokenizer=t, max_iters=4, lr=0.1, noise_scale=0.05),
    "optimize_vector-output-constr": lambda m, t: so.optimize_vector(
        m, [so.TrainingDatapoint("Hello there", dst_completions=[" yes"])], 1, tokenizer=t, max_iters=2, lr=0.1,
        target_loss=100.0, do_output_constr=True, max_output_constr_iters=4),
    "optimize_vector-reference": lambda m, t: so.optimize_vector(
        m, [so.TrainingDatapoint("Hello there", dst_completions=[" yes"])], [1, 2], tokenizer=t, max_iters=3,
        engine="reference", vector_clamp=1.0),
    "optimize_vectors": lambda m, t: so.optimize_vectors(
        m, [so.TrainingDatapoint("Hello there", dst_completions=[" yes"])], [0, 2], tokenizer=t, max_iters=3),
    "minibatch": lambda m, t: so.optimize_vector_minibatch_hf(m, t, ["A", "B c", "D e f"], 2, dst_completions=[" x"],
                                                              minibatch_size=2, max_iters=4, affine_rank=1),
    "optimize_many": lambda m, t: optimize_many(m, [Job([so.TrainingDatapoint("Hi", dst_completions=[" yes"])], 1,
                                                        max_iters=3),
                                                    Job([so.TrainingDatapoint("Yo", dst_completions=[" no"])], 2,
                                                        max_iters=4, vector_clamp=1.0)], tokenizer=t),
    "train_steering_vector": lambda m, t: so.train_steering_vector(m, t, [("I love it", "I hate it")] * 3,
                                                                   layers=[1, 3], batch_size=2),
    "generate_with_steering": lambda m, t: so.generate_with_steering(m, t, ["Hi", "Hello there"],
                                                                     so.SteeringVector({1: torch.ones(D)}),
                                                                     max_new_tokens=4),
    "evaluate": lambda m, t: so.evaluate(m, t, so.SteeringVector({1: torch.ones(D)}), ["Hi", "Hello"],
                                         promote=[" yes"], neutral_prompts=["The sky"], max_new_tokens=3,
                                         fluency_lang=None),
    "logprob": lambda m, t: [so.get_completion_logprob_hf(m, "Hi", " there you go", t) for _ in range(3)],
    "sample": lambda m, t: so.sample_most_likely_completions_hf(m, t, "Hi", k=2, iters=3),
    "injector": lambda m, t: _inject(m, t),
}


def _inject(m: nn.Module, t: Any) -> None:
    ids = torch.tensor([t("Hello there")["input_ids"]])
    with so.MultiVectorInjector(m, {"a": so.SteeringVector({1: torch.ones(D)}),
                                    "b": so.SteeringVector({2: torch.ones(D)}, clamp=0.5)}) as inj, \
            so.ActivationHook(m, [0, 3]):
        for s in (0.5, 1.0, 2.0):
            inj.set_strength("a", s)
            m(input_ids=ids)


@pytest.mark.parametrize("failure", ["none", "error", "interrupt"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_model_restored_on_return_raise_and_interrupt(entry: str, failure: str, tokenizer: Any) -> None:
    """Whether the call returns, raises inside the model, or is interrupted (KeyboardInterrupt) in the middle,
    the model keeps its weights bitwise, hooks, requires_grad flags, train/eval flags, config (use_cache) and
    generation config."""
    model = make_tiny_model("qwen2" if entry in ("optimize_vector", "evaluate") else "llama", len(tokenizer))
    _odd_state(model)
    state = ModelState.of(model)
    tok_state = copy.deepcopy(tokenizer.__dict__.get("init_kwargs")), tokenizer.padding_side, tokenizer.pad_token
    handle = None
    if failure != "none":
        exc = Boom if failure == "error" else KeyboardInterrupt
        handle = so.get_blocks(model)[3].register_forward_pre_hook(_failing_hook(2, exc))
    try:
        if failure == "none":
            ENTRY_POINTS[entry](model, tokenizer)
        else:
            with pytest.raises(Boom if failure == "error" else KeyboardInterrupt):
                ENTRY_POINTS[entry](model, tokenizer)
    finally:
        if handle is not None:
            handle.remove()
    state.assert_same(model)
    assert (copy.deepcopy(tokenizer.__dict__.get("init_kwargs")), tokenizer.padding_side,
            tokenizer.pad_token) == tok_state


def test_interrupt_inside_truncated_forward_restores_blocks(tiny_model: nn.Module, tokenizer: Any) -> None:
    """Every architecture: an interrupt while the fast engine runs only the upper blocks puts the block list
    and the per-layer config (e.g. layer_types) back."""
    state = ModelState.of(tiny_model)
    blocks = so.get_blocks(tiny_model)
    handle = blocks[2].register_forward_pre_hook(_failing_hook(1, KeyboardInterrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            so.optimize_vector(tiny_model, [so.TrainingDatapoint("Hi there", dst_completions=[" yes"])], 2,
                               tokenizer=tokenizer, max_iters=3)
    finally:
        handle.remove()
    assert so.get_blocks(tiny_model) is blocks
    state.assert_same(tiny_model)


# --------------------------------------------------------------------------- tokenizer, devices


def test_tokenizer_without_pad_token_is_handled_and_not_mutated(tiny_llama: nn.Module, tokenizer: Any) -> None:
    """Batched entry points work with a tokenizer that has no pad token, and never give it one."""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    assert tok.pad_token is None
    side = tok.padding_side
    dps = [so.TrainingDatapoint("Hi", dst_completions=[" yes", " sure thing"]),
           so.TrainingDatapoint("A longer prompt here", src_completions=[" no"])]
    vec, info = so.optimize_vector(tiny_llama, dps, 1, tokenizer=tok, max_iters=1)
    ref, ref_info = so.optimize_vector(tiny_llama, dps, 1, tokenizer=tokenizer, max_iters=1, seed=0)
    vec, info = so.optimize_vector(tiny_llama, dps, 1, tokenizer=tok, max_iters=1, seed=0)
    assert torch.equal(vec, ref)
    so.optimize_vector_minibatch_hf(tiny_llama, tok, ["A", "B c d"], 1, dst_completions=[" x"], max_iters=1)
    optimize_many(tiny_llama, [Job(dps, 1, max_iters=1)], tokenizer=tok)
    so.train_steering_vector(tiny_llama, tok, [("a b c", "d")], layers=[1], batch_size=2)
    so.generate_with_steering(tiny_llama, tok, ["Hi", "A longer prompt"], None, max_new_tokens=2)
    so.completion_logprobs(tiny_llama, tok, ["Hi", "A longer prompt"], [" yes"])
    so.evaluate(tiny_llama, tok, so.SteeringVector({1: vec}), ["Hi", "A b c"], neutral_prompts=["x y z"],
                max_new_tokens=2, fluency_lang=None)
    so.sample_most_likely_completions_hf(tiny_llama, tok, "Hi", k=2, iters=1)
    assert tok.pad_token is None and tok.padding_side == side


def test_vector_dtype_and_device_are_cast(tokenizer: Any) -> None:
    """Vectors of another dtype are cast to the model's: a float64/float16 starting vector, a float64 hook
    vector on a bfloat16 model, a float16 SteeringVector; the model's dtype is never changed."""
    model = make_tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    state = ModelState.of(model)
    dp = so.TrainingDatapoint("Hello there", dst_completions=[" yes"])
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        vec, info = so.optimize_vector(model, [dp], 1, tokenizer=tokenizer, max_iters=2,
                                       starting_vec=torch.ones(D, dtype=dtype))
        assert vec.dtype == torch.float32 and torch.isfinite(vec).all() and info["status"] == "max_iters"
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    v64 = torch.randn(D, dtype=torch.float64)
    with so.hf_hooks_contextmanager(model, [(1, so.make_steering_hook_hf(v64))]):
        a = model(input_ids=ids).logits
    with so.hf_hooks_contextmanager(model, [(1, so.make_steering_hook_hf(v64.to(torch.bfloat16)))]):
        b = model(input_ids=ids).logits
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    with so.SteeringVector({1: v64.half()}).apply(model):
        c = model(input_ids=ids).logits
    assert c.dtype == torch.bfloat16
    state.assert_same(model)


# ----------------------------------------------------------------------------------- atomic saves


class _Crash(Exception):
    pass


def _crash_after_partial_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make safetensors/numpy/gguf/text writers write half a file, then fail."""
    import numpy as np
    import safetensors.torch

    real_save_file = safetensors.torch.save_file

    def save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise _Crash("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)

    def savez(f: Any, **arrays: Any) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise _Crash("disk full")

    monkeypatch.setattr(np, "savez", savez)

    real_torch_save = torch.save

    def torch_save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        real_torch_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:20])
        raise _Crash("disk full")

    monkeypatch.setattr(torch, "save", torch_save)

    import gguf

    def write_tensors(self: Any, *a: Any, **k: Any) -> None:
        raise _Crash("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_tensors)


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_failed_save_never_destroys_the_previous_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A save/export that fails half-way (or is interrupted) leaves the previous file byte-for-byte, loadable,
    and no temporary file behind."""
    old, new = so.SteeringVector({2: torch.ones(D)}), so.SteeringVector({2: -torch.ones(D), 3: torch.ones(D)})
    targets: dict[str, tuple[Callable[[so.SteeringVector, Path], Any], Callable[[Path], Any]]] = {
        "folder": (lambda v, p: so.save(v, p), so.load),
        "single.safetensors": (lambda v, p: so.save(v, p), so.load),
        "set": (lambda v, p: so.save({"x": v, "y": v}, p), so.load),
        "export.gguf": (lambda v, p: so.export_gguf(v, p), so.import_gguf),
        "export.pt": (lambda v, p: so.export_tensors(v, p), so.load),
        "export.npz": (lambda v, p: so.export_tensors(v, p), so.load),
        "data.jsonl": (lambda v, p: write_datapoints([so.TrainingDatapoint(f"v{len(v.layers)}", dst_completions=["a"])]
                                                     * 3, p), so.load_datapoints),
    }
    for name, (write, read) in targets.items():
        path = tmp_path / name
        write(old, path)
        before, loaded = _snapshot(path), read(path)
        with monkeypatch.context() as mp:
            _crash_after_partial_write(mp)
            def write_text(self: Path, *a: Any, real: Callable[..., int] = Path.write_text, **k: Any) -> int:
                real(self, "half")
                raise KeyboardInterrupt

            mp.setattr(Path, "write_text", write_text)
            with pytest.raises((_Crash, KeyboardInterrupt)):
                write(new, path)
        assert _snapshot(path) == before, name
        again = read(path)
        if isinstance(loaded, so.SteeringVector):
            assert again.layers == loaded.layers
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], name


def test_failed_final_rename_puts_the_old_folder_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    old, new = so.SteeringVector({2: torch.ones(D)}), so.SteeringVector({2: -torch.ones(D)})
    path = tmp_path / "vec"
    so.save(old, path)
    before = _snapshot(path)
    real_rename = os.rename
    calls = {"n": 0}

    def rename(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # old -> backup worked; the new folder -> target fails
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        so.save(new, path)
    monkeypatch.undo()
    assert _snapshot(path) == before
    assert torch.equal(so.load(path).layer_activations[2], torch.ones(D))
    assert [p.name for p in tmp_path.iterdir()] == ["vec"]


def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    lines = ['{"prompt": "a", "dst_completions": ["b"]}', "", '{"prompt": "a", "dst_completions": []}']
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(JSONLError) as info:
        so.load_datapoints(p)
    assert info.value.line == 3 and info.value.path == str(p)
    assert re.match(rf"{re.escape(str(p))}:3: ", str(info.value))
    assert json.loads(lines[0])  # the good line is fine on its own
