"""Plots: the PCA figure of contrastive activations (as in the blog post), loss curves, layer norms, for vectors from
both methods; PNG output; matplotlib imported lazily."""

from __future__ import annotations

import subprocess
import sys

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import steering_opt as so  # noqa: E402
from steering_opt.contrastive import contrastive_vector, extract_activations  # noqa: E402
from steering_opt.plots import pca_project, plot_layer_norms, plot_loss_curve, plot_pca  # noqa: E402
from steering_opt.vector import SteeringVector  # noqa: E402

PAIRS = [("I love this, thank you!", "I hate this."), ("What a wonderful day", "What a terrible day it is"),
         ("Please, after you.", "Move."), ("Thanks so much for your help", "Whatever")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_importing_the_package_does_not_import_matplotlib():
    code = "import sys, steering_opt; assert 'matplotlib' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_pca_project_equals_hand_pca():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 10, generator=g) @ torch.randn(10, 10, generator=g)
    coords, mean, comps, ratio = pca_project(x, 2)
    xc = (x - x.mean(0)).double()
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    for k in range(2):
        u = evecs[:, -1 - k]
        assert abs(abs(float(u @ comps[k])) - 1) < 1e-8
        torch.testing.assert_close(coords[:, k].abs(), (xc @ u).abs(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ratio, evals.flip(0)[:2] / evals.sum())


def test_plot_pca_for_both_kinds_of_vector(tiny_llama, tokenizer, tmp_path):
    pos, neg = extract_activations(tiny_llama, tokenizer, PAIRS, layers=[1, 2])
    caa = contrastive_vector(tiny_llama, tokenizer, PAIRS, layers=[1, 2])
    dp = so.TrainingDatapoint("The cat sat on the", src_completions=[" mat"], dst_completions=[" roof"])
    v, info = so.optimize_vector(tiny_llama, [dp], 2, tokenizer=tokenizer, max_iters=2, lr=0.5, seed=0)
    opt = SteeringVector.from_optimization(v, info, 2)
    for steering in (caa, opt, v, None):
        path = tmp_path / f"pca_{id(steering)}.png"
        fig = plot_pca(pos, neg, layer=2, steering=steering, multiplier=2.0, save_path=path)
        assert path.read_bytes()[:8] == PNG_MAGIC
        ax = fig.axes[0]
        assert "PC1" in ax.get_xlabel() and "layer 2" in ax.get_title()
        labels = ax.get_legend_handles_labels()[1]
        assert "Positive centroid" in labels and ("steering vector (projected, x2)" in labels) == (steering is not None)
    # the plotted points are the PCA coordinates of the activations
    fig = plot_pca(pos[1], neg[1])
    coords, *_ = pca_project(torch.cat([pos[1], neg[1]]))
    points = fig.axes[0].collections[0].get_offsets()
    torch.testing.assert_close(torch.as_tensor(points.data, dtype=torch.float64), coords[: len(PAIRS)].double())


def test_plot_pca_errors(tiny_llama, tokenizer):
    pos, neg = extract_activations(tiny_llama, tokenizer, PAIRS[:2], layers=[1, 2])
    with pytest.raises(ValueError, match="pass `layer`"):
        plot_pca(pos, neg)
    with pytest.raises(ValueError, match="`layer`=3 is not in `positive`"):
        plot_pca(pos, neg, layer=3)
    with pytest.raises(ValueError, match="width 5"):
        plot_pca(pos, neg, layer=1, steering=torch.ones(5))
    with pytest.raises(ValueError, match="`steering` has layers \\[3\\]"):
        plot_pca(pos, neg, layer=1, steering=SteeringVector({3: torch.ones(64)}))
    with pytest.raises(TypeError, match="must be a tensor \\(n, d\\)"):
        plot_pca([1, 2], neg, layer=1)


def test_loss_curve_and_layer_norms_from_optimiser_info(tiny_llama, tokenizer, tmp_path):
    dp = so.TrainingDatapoint("The cat sat on the", src_completions=[" mat"], dst_completions=[" roof"])
    _, info = so.optimize_vector(tiny_llama, [dp], 1, tokenizer=tokenizer, max_iters=4, lr=0.5, seed=0)
    fig = plot_loss_curve(info, target_loss=1.0, save_path=tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == pytest.approx(info["loss_history"])
    assert fig.axes[0].get_ylabel() == "loss (nats)"
    fig = plot_loss_curve({"run a": info, "run b": [3.0, 2.0, 1.0]})
    assert [ln.get_label() for ln in fig.axes[0].lines] == ["run a", "run b"]

    vecs, info2 = so.optimize_vectors(tiny_llama, [dp], [0, 1, 2], tokenizer=tokenizer, max_iters=2, lr=0.1, seed=0)
    fig = plot_layer_norms(info2, save_path=tmp_path / "norms.png")
    assert (tmp_path / "norms.png").read_bytes()[:8] == PNG_MAGIC
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([info2["norms"][k] for k in (0, 1, 2)])
    caa = contrastive_vector(tiny_llama, tokenizer, PAIRS, layers=[1, 3])
    fig = plot_layer_norms({"optimised": info2, "CAA": caa})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "2", "3"]
    assert len(fig.axes[0].patches) == 5
    with pytest.raises(ValueError, match="no 'loss_history'"):
        plot_loss_curve({"loss": 3})
    with pytest.raises(TypeError, match="must be optimize_vectors' info"):
        plot_layer_norms([1, 2])
