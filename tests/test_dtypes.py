"""Models in bfloat16 / float16: the loss is computed in float32, the vector is float32, both engines agree."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import steering_opt as so


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(dtype: torch.dtype, tokenizer) -> None:
    model = make_tiny_model("llama", len(tokenizer)).to(dtype)
    dp = so.TrainingDatapoint("The capital of France is", src_completions=[" Berlin"], dst_completions=[" Paris"])
    out = {}
    for engine in ("fast", "reference"):
        v, info = so.optimize_vector(model, [dp], 1, tokenizer=tokenizer, max_iters=3, lr=0.1, seed=0, engine=engine,
                                     vector_clamp=2.0)
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
        assert all(isinstance(x, float) and x == x for x in info["loss_history"])
        out[engine] = info["loss_history"]
    assert out["fast"] == pytest.approx(out["reference"], rel=2e-2)  # same maths; low-precision blocks
    assert next(model.parameters()).dtype == dtype
    hook = so.make_steering_hook_hf(v)
    with so.hf_hooks_contextmanager(model, [(1, hook)]):
        model.generate(**tokenizer("Hi", return_tensors="pt"), max_new_tokens=2, do_sample=False)
