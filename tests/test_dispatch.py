"""Models dispatched by accelerate (``device_map`` with CPU and disk offload) optimise exactly like plain ones."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from conftest import make_tiny_model

import steering_opt as so
from steering_opt import arch


@pytest.fixture(scope="module")
def dp():
    return so.TrainingDatapoint("The quick brown fox jumps over the lazy dog. Then", src_completions=[" it sleeps"],
                                dst_completions=[" it runs away", " el zorro"])


def _dispatched(kind: str, base: torch.nn.Module, tmp_path) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if kind == "cpu_offload":
        return cpu_offload(model, execution_device=torch.device("cpu"))
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    device_map = {n: "cpu" for n in names}
    for i in range(arch.num_layers(model)):
        device_map[f"model.layers.{i}"] = "disk" if i % 2 else "cpu"
    return dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"))


@pytest.mark.parametrize("kind", ["cpu_offload", "disk_offload"])
def test_dispatched_model_matches_plain(kind: str, tokenizer, dp, tmp_path) -> None:
    base = make_tiny_model("llama", len(tokenizer))
    plain = so.optimize_vector(base, [dp], 1, tokenizer=tokenizer, max_iters=4, lr=0.1, seed=0)
    model = _dispatched(kind, base, tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters())  # weights really are offloaded
    assert arch.input_device(model).type == "cpu"
    for engine in ("fast", "reference"):
        v, info = so.optimize_vector(model, [dp], 1, tokenizer=tokenizer, max_iters=4, lr=0.1, seed=0, engine=engine)
        assert v.device.type == "cpu"  # the steered block's execution device, not "meta"
        torch.testing.assert_close(v, plain[0], rtol=1e-4, atol=1e-5)
        assert info["loss_history"] == pytest.approx(plain[1]["loss_history"], rel=1e-4)
    with so.hf_hooks_contextmanager(model, [(1, so.make_steering_hook_hf(v))]):
        out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 2
