"""Plots: contrastive activations in PCA space (as in the Llama-3 steering blog post), loss curves, layer norms, sweeps.

matplotlib is an optional extra (``pip install "steering-opt[plot]"``) imported only when a plot is
made. Every function draws on ``ax`` if given, else on a new :class:`matplotlib.figure.Figure` that is
not registered with pyplot (no global state, nothing to close, any backend); it returns the figure
and, with ``save_path``, also writes it (PNG or any format matplotlib infers from the suffix).

In Jupyter a returned figure displays once, as a PNG, as the cell's result: the new figures are a
:class:`~matplotlib.figure.Figure` subclass with ``_repr_png_``, so no ``%matplotlib inline`` or pyplot is
needed (with the inline backend active, its PNG formatter shows it instead, still once). With ``ax=``, the
figure is yours: if pyplot made it, Jupyter already shows it at the end of the cell, so end the line with
``;`` to avoid a second copy.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .vector import SteeringVector

if TYPE_CHECKING:  # steering_opt.sweep imports this module (SweepResult's plot methods)
    from .sweep import SweepResult

__all__ = ["pca_project", "plot_layer_norms", "plot_loss_curve", "plot_pca", "plot_success_vs_strength",
           "plot_sweep_heatmap"]

_POS_COLOR, _NEG_COLOR, _VEC_COLOR = "tab:blue", "tab:red", "tab:green"


_FIGURE_CLASS: Any = None


def _notebook_figure() -> Any:
    """``NotebookFigure``: a pyplot-free Figure that Jupyter displays as a PNG (``_repr_png_``), made on first use
    so that matplotlib stays optional; reachable as ``steering_opt.plots.NotebookFigure`` (pickling)."""
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        try:
            from matplotlib.figure import Figure
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("steering_opt.plots needs matplotlib: pip install 'steering-opt[plot]'") from e

        def _repr_png_(self: Any) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=100)
            return buf.getvalue()

        _FIGURE_CLASS = type("NotebookFigure", (Figure,), {"__module__": __name__, "_repr_png_": _repr_png_,
                                                            "__doc__": "A Figure that Jupyter shows as a PNG."})
    return _FIGURE_CLASS


def __getattr__(name: str) -> Any:
    if name == "NotebookFigure":
        return _notebook_figure()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _figure_and_ax(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    cls = _notebook_figure()
    if ax is not None:
        return ax.figure, ax
    fig = cls(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _finish(fig: Any, save_path: str | Path | None) -> Any:
    if save_path is not None:
        fig.savefig(str(save_path), dpi=120)
    return fig


def pca_project(x: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of the rows of ``x`` ``(n, d)`` (centred, like scikit-learn's ``PCA``), by SVD in float64.

    Returns:
        ``(coords (n, k), mean (d,), components (k, d), explained_variance_ratio (k,))``; the sign of each
        component is fixed so that its largest-magnitude entry is positive (deterministic output).
    """
    x = x.detach().double().cpu()
    mean = x.mean(0)
    xc = x - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    k = min(k, vh.shape[0])
    comps = vh[:k]
    signs = torch.sign(comps[torch.arange(k), comps.abs().argmax(1)])
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    var = s**2
    ratio = var[:k] / var.sum() if var.sum() > 0 else torch.zeros(k, dtype=var.dtype)
    return xc @ comps.T, mean, comps, ratio


def _layer_acts(acts: Any, layer: int | None, name: str) -> tuple[torch.Tensor, int | None]:
    if isinstance(acts, Mapping):
        if layer is None:
            if len(acts) != 1:
                raise ValueError(f"`{name}` holds layers {sorted(acts)}: pass `layer` to choose one")
            layer = next(iter(acts))
        if layer not in acts:
            raise ValueError(f"`layer`={layer} is not in `{name}` (layers {sorted(acts)})")
        acts = acts[layer]
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2 or acts.shape[0] == 0:
        shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else ""
        raise TypeError(f"`{name}` must be a tensor (n, d) or a dict {{layer: tensor (n, d)}} (extract_activations' "
                        f"output), got {type(acts).__name__}{shape}")
    return acts.float(), layer


def plot_pca(
    positive: torch.Tensor | Mapping[int, torch.Tensor],
    negative: torch.Tensor | Mapping[int, torch.Tensor],
    layer: int | None = None,
    steering: SteeringVector | torch.Tensor | None = None,
    *,
    multiplier: float = 1.0,
    labels: tuple[str, str] = ("Positive", "Negative"),
    title: str | None = None,
    ax: Any = None,
    save_path: str | Path | None = None,
    figsize: tuple[float, float] = (7.0, 6.0),
) -> Any:
    """Positive and negative activations in the plane of their first two principal components.

    Draws both point clouds, their centroids (stars) and the centroid difference (the mean-difference
    steering vector) as an arrow from the negative to the positive centroid; with ``steering``, also that
    vector's projection on the plane (times ``multiplier``) from the negative centroid, so a vector from
    any method (e.g. an optimised one) can be compared with the data.

    Args:
        positive, negative: ``(n, d)`` tensors, or ``{layer: (n, d)}`` dicts from
            :func:`~steering_opt.contrastive.extract_activations` (then ``layer`` picks one; optional when
            there is a single layer).
        layer: the layer to show (also selects the layer of a multi-layer ``steering`` vector).
        steering: a :class:`SteeringVector` (its vector at ``layer``) or a tensor ``(d,)``.
        multiplier: scales the drawn steering arrow.
        labels, title, ax, save_path, figsize: presentation; ``save_path`` writes the figure (e.g. ``.png``).

    Returns:
        The matplotlib ``Figure``.
    """
    pos, layer = _layer_acts(positive, layer, "positive")
    neg, _ = _layer_acts(negative, layer, "negative")
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"positive and negative activations have widths {pos.shape[1]} and {neg.shape[1]}")
    vec = None
    if steering is not None:
        if isinstance(steering, SteeringVector):
            layers = steering.layers
            key = layer if layer is not None else (layers[0] if len(layers) == 1 else None)
            if key not in steering.layer_activations:
                raise ValueError(f"`steering` has layers {layers}; pass `layer` naming one of them")
            vec = steering.layer_activations[key]
        elif isinstance(steering, torch.Tensor) and steering.dim() == 1:
            vec = steering
        else:
            raise TypeError(f"`steering` must be a SteeringVector or a tensor (d,), got {type(steering).__name__}")
        if vec.shape[0] != pos.shape[1]:
            raise ValueError(f"`steering` has width {vec.shape[0]}, the activations {pos.shape[1]}")
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real):
        raise TypeError(f"`multiplier` must be a number, got {multiplier!r}")

    fig, ax = _figure_and_ax(ax, figsize)
    coords, mean, comps, ratio = pca_project(torch.cat([pos, neg]), 2)
    if coords.shape[1] < 2:
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1], dtype=coords.dtype)], 1)
        comps = torch.cat([comps, torch.zeros(2 - comps.shape[0], comps.shape[1], dtype=comps.dtype)])
        ratio = torch.cat([ratio, torch.zeros(2 - ratio.shape[0], dtype=ratio.dtype)])
    p, n = coords[: len(pos)].numpy(), coords[len(pos):].numpy()
    ax.scatter(p[:, 0], p[:, 1], c=_POS_COLOR, label=labels[0], alpha=0.8)
    ax.scatter(n[:, 0], n[:, 1], c=_NEG_COLOR, label=labels[1], alpha=0.8)
    pc, nc = p.mean(0), n.mean(0)
    ax.scatter(*pc, c="darkblue", s=250, marker="*", label=f"{labels[0]} centroid", edgecolors="white")
    ax.scatter(*nc, c="darkred", s=250, marker="*", label=f"{labels[1]} centroid", edgecolors="white")
    _arrow(ax, nc, pc, "black", "mean difference")
    if vec is not None:
        proj = (vec.double().cpu() * float(multiplier)) @ comps.T
        scaled = "" if multiplier == 1 else f", x{multiplier:g}"
        _arrow(ax, nc, nc + proj.numpy(), _VEC_COLOR, f"steering vector (projected{scaled})")
    ax.set_xlabel(f"PC1 ({100 * float(ratio[0]):.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * float(ratio[1]):.1f}% of variance)")
    ax.set_title(title if title is not None else "PCA of activations" + (f", layer {layer}" if layer is not None
                                                                          else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _finish(fig, save_path)


def _arrow(ax: Any, start: Any, end: Any, color: str, label: str) -> None:
    from matplotlib.lines import Line2D

    ax.annotate("", xy=(float(end[0]), float(end[1])), xytext=(float(start[0]), float(start[1])),
                arrowprops=dict(arrowstyle="-|>", color=color, lw=2, mutation_scale=18))
    ax.add_line(Line2D([float(start[0])], [float(start[1])], color=color, lw=2, label=label))
    ax.update_datalim([tuple(map(float, start[:2])), tuple(map(float, end[:2]))])
    ax.autoscale_view()


def _history(obj: Any, name: str) -> list[float]:
    if isinstance(obj, Mapping):
        if "loss_history" not in obj:
            raise ValueError(f"`{name}` has no 'loss_history' (keys: {sorted(obj)}); pass optimize_vector's info")
        obj = obj["loss_history"]
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence) or len(obj) == 0 or \
            not all(isinstance(x, numbers.Real) for x in obj):
        raise TypeError(f"`{name}` must be an info dict with 'loss_history' or a non-empty list of numbers")
    return [float(x) for x in obj]


def plot_loss_curve(
    info: Mapping[str, Any] | Sequence[float],
    *,
    target_loss: float | None = None,
    log_y: bool = False,
    title: str | None = None,
    ax: Any = None,
    save_path: str | Path | None = None,
    figsize: tuple[float, float] = (7.0, 4.0),
) -> Any:
    """The loss (nats) at every evaluation of an optimisation, from ``info['loss_history']``.

    Args:
        info: the ``info`` dict of :func:`~steering_opt.optimize.optimize_vector` /
            :func:`~steering_opt.optimize.optimize_vectors`, a list of losses, or ``{label: info}`` to
            compare several runs on one axis.
        target_loss: draw this level as a dashed line.
        log_y: logarithmic loss axis.

    Returns:
        The matplotlib ``Figure``.
    """
    runs: dict[str, list[float]]
    if isinstance(info, Mapping) and "loss_history" not in info and info and \
            all(isinstance(v, (Mapping, Sequence)) and not isinstance(v, str) for v in info.values()):
        runs = {str(k): _history(v, f"info[{k!r}]") for k, v in info.items()}
    else:
        runs = {"": _history(info, "info")}
    fig, ax = _figure_and_ax(ax, figsize)
    for label, hist in runs.items():
        ax.plot(range(len(hist)), hist, marker="o" if len(hist) <= 30 else None, ms=3, label=label or None)
    if target_loss is not None:
        ax.axhline(float(target_loss), ls="--", c="gray", label="target loss")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title if title is not None else "Optimisation loss")
    ax.grid(True, alpha=0.3)
    if any(runs) or target_loss is not None:
        ax.legend(fontsize="small")
    return _finish(fig, save_path)


def _norms(obj: Any, name: str) -> dict[int, float]:
    if isinstance(obj, SteeringVector):
        return {k: float(v.float().norm()) for k, v in sorted(obj.layer_activations.items())}
    if isinstance(obj, Mapping) and "norms" in obj:
        obj = obj["norms"]
    if isinstance(obj, Mapping) and obj and all(isinstance(k, numbers.Integral) for k in obj):
        return {int(k): float(v.float().norm() if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                for k, v in sorted(obj.items())}
    raise TypeError(f"`{name}` must be optimize_vectors' info (with 'norms'), a {{layer: norm or vector}} dict or a "
                    f"SteeringVector; got {type(obj).__name__}")


def plot_layer_norms(
    source: Any,
    *,
    title: str | None = None,
    ax: Any = None,
    save_path: str | Path | None = None,
    figsize: tuple[float, float] = (8.0, 4.0),
) -> Any:
    """Bar chart of the steering norm at each layer.

    Args:
        source: :func:`~steering_opt.optimize.optimize_vectors`' ``info`` (``info['norms']``), a
            :class:`SteeringVector` (the norm of each layer's vector), a ``{layer: norm or vector}`` dict, or
            ``{label: any of these}`` for grouped bars comparing several.

    Returns:
        The matplotlib ``Figure``.
    """
    if isinstance(source, Mapping) and "norms" not in source and source and \
            all(isinstance(k, str) for k in source):
        series = {k: _norms(v, f"source[{k!r}]") for k, v in source.items()}
    else:
        series = {"": _norms(source, "source")}
    layers = sorted({layer for s in series.values() for layer in s})
    fig, ax = _figure_and_ax(ax, figsize)
    width = 0.8 / len(series)
    for i, (label, norms) in enumerate(series.items()):
        xs = [layers.index(layer) + (i - (len(series) - 1) / 2) * width for layer in norms]
        ax.bar(xs, list(norms.values()), width=width, label=label or None)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(layer) for layer in layers], fontsize="small" if len(layers) > 20 else None)
    ax.set_xlabel("layer")
    ax.set_ylabel("vector norm")
    ax.set_title(title if title is not None else "Steering norm per layer")
    ax.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _finish(fig, save_path)


def _sweep_metric(result: SweepResult, metric: str | None) -> str:
    """Check ``result`` and return the metric to plot (default: fluent success rate if measured, else success rate,
    else the criterion). A SweepResult is recognised by its fields, since steering_opt.sweep imports this module."""
    if not all(hasattr(result, name) for name in ("table", "best", "baseline")):
        raise TypeError(f"`result` must be a SweepResult, got {type(result).__name__}")
    if not result.table:
        raise ValueError("the sweep has no rows to plot")
    if not metric:
        metric = next((m for m in ("fluent_success_rate", "success_rate") if any(r.get(m) is not None
                                                                                for r in result.table)), "criterion")
    if not any(metric in r for r in result.table):
        raise ValueError(f"unknown metric {metric!r}; available: {sorted(result.table[0])}")
    return metric


def plot_sweep_heatmap(result: SweepResult, metric: str | None = None, *, variant: str | None = None,
                       ax: Any = None, save_path: str | Path | None = None, title: str | None = None) -> Any:
    """Heatmap of ``metric`` (default: fluent success rate if measured, else the criterion) over
    layer (rows) × multiplier (columns) for one variant (default: the best row's); the best cell is
    outlined in red. Draws on ``ax`` or a new pyplot-free Figure (as every plot here);
    returns the Figure; ``save_path`` also writes it (PNG, or the format of the suffix)."""
    metric = _sweep_metric(result, metric)
    variant = variant or (result.best["variant"] if result.best else result.table[0]["variant"])
    rows = [r for r in result.table if r["variant"] == variant]
    if not rows:
        raise ValueError(f"no rows for variant {variant!r}; variants: {sorted({r['variant'] for r in result.table})}")
    fig, ax = _figure_and_ax(ax, (1.6 + 0.9 * len({r["multiplier"] for r in rows}),
                                  1.2 + 0.5 * len({r["layer"] for r in rows})))
    layers = sorted({r["layer"] for r in rows})
    mults = sorted({r["multiplier"] for r in rows})
    grid = [[math.nan] * len(mults) for _ in layers]
    for r in rows:
        v = r.get(metric)
        # blank cells: not measured, or not rankable (e.g. -inf: over auto_steer's kl_budget)
        grid[layers.index(r["layer"])][mults.index(r["multiplier"])] = \
            float(v) if v is not None and math.isfinite(float(v)) else math.nan
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(mults)), [f"{m:g}" for m in mults])
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("multiplier (strength)")
    ax.set_ylabel("layer")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", color="w" if v < (im.norm.vmax + im.norm.vmin) / 2
                        else "k", fontsize=8)
    b = result.best
    if b is not None and b["variant"] == variant:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((mults.index(b["multiplier"]) - 0.5, layers.index(b["layer"]) - 0.5), 1, 1,
                               fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(title or f"{metric} ({variant})")
    return _finish(fig, save_path)


def plot_success_vs_strength(result: SweepResult, metric: str | None = None, *, layers: Sequence[int] | None = None,
                             ax: Any = None, save_path: str | Path | None = None, title: str | None = None) -> Any:
    """``metric`` (default: fluent success rate if measured, else the criterion) against the multiplier,
    one line per (layer, variant); the unsteered rate as a dashed line when known. Returns the Figure
    (pyplot-free, or ``ax``'s); ``save_path`` also writes it."""
    metric = _sweep_metric(result, metric)
    fig, ax = _figure_and_ax(ax, (6.0, 4.0))
    keys = sorted({(r["layer"], r["variant"]) for r in result.table if layers is None or r["layer"] in layers})
    for layer, variant in keys:
        pts = sorted((r["multiplier"], r.get(metric)) for r in result.table
                     if r["layer"] == layer and r["variant"] == variant and r.get(metric) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"layer {layer}" + ("" if variant == "additive" else f" {variant}"))
    base = result.baseline.get(metric)
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", label="unsteered")
    ax.set_xlabel("multiplier (strength)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs strength")
    ax.legend(fontsize=8)
    return _finish(fig, save_path)
